"""Hits: a cached archive served from its blob on disk, with the HTTP semantics download tools
rely on (Content-Length, ETag = sha256, Repr-Digest, Range, If-None-Match, HEAD).

Invariants: a hit never contacts upstream; its bytes come from the blob the index names, which
cannot be evicted while it is being sent; HEAD and 304 answer from the index alone.
"""

from __future__ import annotations

import base64
import re

from aiohttp import web

from ..cache.store import Entry
from .accesslog import BODY_BYTES_KEY
from .components import METRICS, SERVING, STORE
from .replies import HIT, X_CACHE

_SINGLE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def sends_body(request: web.Request, entry: Entry) -> bool:
    """Whether a hit will read the blob (HEAD and 304 answer from the index alone)."""
    return request.method == "GET" and not _matches(request.headers.get("If-None-Match"), entry.sha256)


class _BlobResponse(web.FileResponse):
    """FileResponse (sendfile, Range, HEAD) whose ETag is the blob's sha256, not mtime-size."""

    def __init__(self, path, sha256: str, **kwargs):
        super().__init__(path, **kwargs)
        self._sha256_etag = sha256

    @property
    def etag(self):
        return web.StreamResponse.etag.fget(self)

    @etag.setter
    def etag(self, _ignored):
        web.StreamResponse.etag.fset(self, self._sha256_etag)

    async def prepare(self, request):
        # We prepare with a request whose conditionals we already handled; aiohttp then calls
        # prepare again with the original one, which must not send the file twice.
        if self.prepared:
            return self._payload_writer
        return await super().prepare(request)


def _count_hit(app: web.Application, entry: Entry) -> None:
    app[METRICS].hits.inc()
    app[STORE].record_hit(entry.key)


def _hit_headers(sha256: str, outcome: str) -> dict[str, str]:
    return {X_CACHE: outcome, "ETag": f'"{sha256}"', "Repr-Digest": _repr_digest(sha256),
            "Cache-Control": "public, max-age=31536000, immutable"}


def _bodiless_hit(sha256: str, size: int, content_type: str, outcome: str, matched: bool
                  ) -> tuple[int, dict[str, str]]:
    """A 304 when If-None-Match matched, else the headers a HEAD gets."""
    headers = _hit_headers(sha256, outcome)
    if matched:
        return 304, headers
    return 200, {**headers, "Content-Type": content_type, "Accept-Ranges": "bytes", "Content-Length": str(size)}


async def serve_hit(request: web.Request, entry: Entry, outcome: str = HIT) -> web.StreamResponse:
    original = request  # the one the access log sees; clones below carry only adjusted headers
    store = request.app[STORE]
    if outcome == HIT:
        _count_hit(request.app, entry)
    matched = _matches(request.headers.get("If-None-Match"), entry.sha256)
    if matched or (request.method == "HEAD" and "Range" not in request.headers):
        status, headers = _bodiless_hit(entry.sha256, entry.size, entry.content_type, outcome, matched)
        return web.Response(status=status, headers=headers)
    headers = _hit_headers(entry.sha256, outcome)
    del headers["ETag"]  # FileResponse sets it, through _BlobResponse
    # Our own ETag rules above replace FileResponse's mtime-based conditionals; a stale If-Range
    # means the whole archive.
    dropped = ["If-None-Match", "If-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range", "Accept-Encoding"]
    if request.headers.get("If-Range") and not _matches(request.headers["If-Range"], entry.sha256):
        dropped.append("Range")
    request = request.clone(headers=_without(request.headers, *dropped))
    headers["Content-Type"] = entry.content_type
    response = _BlobResponse(store.blob_path(entry.sha256), entry.sha256, headers=headers)
    serving = request.app[SERVING]
    serving[entry.sha256] += 1  # not evicted while being sent
    try:
        await response.prepare(request)
    finally:
        serving[entry.sha256] -= 1
    if request.method == "GET" and response.status in (200, 206):
        original[BODY_BYTES_KEY] = response.content_length or 0
        request.app[METRICS].cache_bytes_served.inc(original[BODY_BYTES_KEY])
    return response


def _repr_digest(sha256_hex: str) -> str:
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha256_hex)).decode() + ":"


def _matches(header: str | None, sha256: str) -> bool:
    if not header:
        return False
    tags = [tag.strip().removeprefix("W/").strip('"') for tag in header.split(",")]
    return "*" in tags or sha256 in tags


def _without(headers, *names: str):
    drop = {name.lower() for name in names}
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def range_problem(value: str | None) -> str | None:
    """A one-line reason when a Range header is malformed; None when absent or usable."""
    if value is None:
        return None
    if "," in value:
        return "multiple ranges are not supported; ask for one byte range"
    match = _SINGLE_RANGE.fullmatch(value.strip())
    if not match or match.groups() == ("", ""):
        return f"malformed Range header {value[:60]!r}; expected bytes=START-END"
    start, end = match.groups()
    if start and end and int(end) < int(start):
        return f"malformed Range header {value[:60]!r}: end before start"
    return None
