"""The mirror's own stable URLs of kagglehub's downloads, where DownloadModelInstanceVersion
redirects: FILES_PATH/<owner>/<model>/<framework>/<variation>/<version>[/<path>], one member file
of a version, or (without a path) its archive.

Invariants: served from the cache like archives (content-addressed blob, the index key of the
KaggleFile, hits with RFC 9110 ranges); a miss is one flight per key whose first hop is the
anonymous POST of DownloadModelInstanceVersion upstream, whose redirect is checked against the
allowlist and followed, verified against x-goog-hash while it streams and committed atomically; a
Range on a miss or a join is answered 206 from the verified blob, never 200; a request carrying
Authorization is served only for a version upstream serves anonymously; offline, a miss is a 504.
"""

from __future__ import annotations

from aiohttp import web

from ..handles import BadHandle, parse_kaggle_file
from .accesslog import HANDLE_KEY
from .components import SETTINGS
from .hits import range_problem, serve_if_cached
from .kaggle_api import anonymous, rpc_error, rpc_url
from .kagglebody import DOWNLOAD, Call
from .misses import serve_flight
from .replies import MISS, X_CACHE


async def file_route(request: web.Request) -> web.StreamResponse:
    """GET FILES_PATH/... on the mirror's port."""
    return await serve_file(request, request.raw_path)


async def serve_file(request: web.Request, target: str) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        return rpc_error(405, f"method {request.method} is not allowed; files are read-only",
                         headers={"Allow": "GET, HEAD"})
    try:
        file = parse_kaggle_file(target)
    except BadHandle as e:
        return rpc_error(400, str(e))
    request[HANDLE_KEY] = file.key
    problem = range_problem(request)
    if problem:
        return rpc_error(400, problem)
    call = Call(DOWNLOAD, file.instance, file.version, file.path)
    if "Authorization" in request.headers and not await anonymous(request, call):
        return rpc_error(403, f"{call.described} is not served anonymously upstream, so the mirror keeps none of its "
                              "files: ask DownloadModelInstanceVersion, which passes it through")
    response = await serve_if_cached(request, file.key)
    if response is not None:
        return response
    if request.app[SETTINGS].mode == "offline":
        return rpc_error(504, f"{file.key} is not cached and this mirror is offline", headers={X_CACHE: MISS})
    return await serve_flight(request, file.key, rpc_url(request, DOWNLOAD), post_json=file.download_fields,
                              archive=file.path is None, resumable=True)
