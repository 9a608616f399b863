"""The HTTP face: hub routes answer from the store (HIT), a running fetch (JOIN) or a new one (MISS).

Invariants: a streamed (MISS/JOIN) response ends with its terminating chunk only after the
archive is verified (and committed, unless the disk refuses it), otherwise the connection is cut;
a HIT never contacts upstream; this module asks handles/store/flights and never builds a file path.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import logging
import re

from aiohttp import web

from . import admin, browse
from .accesslog import BODY_BYTES_KEY, HANDLE_KEY
from .appkeys import FLIGHTS, METRICS, SERVING, SETTINGS, STORE, UPSTREAM
from .config import Settings
from .fastfront import encode_header_lines
from .flight import FlightFailed, Flights
from .handles import BadHandle, Handle, parse_request_target
from .housekeeping import Housekeeper
from .metrics import Metrics
from .store import Entry, Store
from .units import parse_size
from .upstream import Evidence, Upstream, UpstreamError
from .writehealth import WriteHealth

log = logging.getLogger(__name__)

X_CACHE = "X-Cache"
HIT, MISS, JOIN = "HIT", "MISS", "JOIN"
_SINGLE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
MAX_MEMO_TARGET = 512  # longer request targets are never hub handles worth remembering


def create_app(settings: Settings) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 8190})
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", browse_page)
    admin.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", hub)
    app.cleanup_ctx.append(_components)
    return app


async def _components(app: web.Application):
    settings = app[SETTINGS]
    store = Store(settings.cache_path)
    removed = store.clear_temp()
    if removed:
        log.info("removed %d temp files left by interrupted fetches", removed)
    upstream = Upstream(settings)
    await upstream.start()
    app[STORE], app[UPSTREAM] = store, upstream
    health = WriteHealth(app[METRICS], store.root)
    app[FLIGHTS] = flights = Flights(store, upstream, app[METRICS], health)
    app[SERVING] = serving = collections.Counter()
    keeper = Housekeeper(store, app[METRICS], health, busy_keys=flights.keys, busy_blobs=lambda: set(+serving),
                         max_size=_size_or_none(settings.max_size), min_free=_size_or_none(settings.min_free))
    flights.on_commit = health.on_failure = keeper.poke  # the caps may need enforcing now
    upkeep = asyncio.create_task(keeper.run())
    yield
    upkeep.cancel()
    await flights.close()
    await upstream.close()
    store.close()


def _size_or_none(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def browse_page(request: web.Request) -> web.Response:
    entries = await asyncio.to_thread(request.app[STORE].entries)
    base_url = f"{request.scheme}://{request.host}"
    return browse.response(entries, base_url, _size_or_none(request.app[SETTINGS].max_size))


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    return web.Response(body=registry.exposition(), headers={"Content-Type": registry.content_type})


async def hub(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        return _error(405, f"method {request.method} is not allowed; hub archives are read-only",
                      headers={"Allow": "GET, HEAD"})
    if not request.raw_path.startswith("/"):
        return _error(400, "absolute-form request targets are refused: hubproxy is a mirror, not an open proxy")
    if request.raw_path.startswith("/admin/"):
        return _error(404, "no such admin endpoint (or wrong method)")
    try:
        handle = parse_request_target(request.raw_path)
    except BadHandle as e:
        return _error(400, str(e))
    request[HANDLE_KEY] = handle.key
    range_problem = _range_problem(request.headers.get("Range"))
    if range_problem:
        return _error(400, range_problem)
    store = request.app[STORE]
    entry = store.lookup(handle.key)
    if entry is not None and _sends_body(request, entry) and not store.has_blob(entry):
        store.forget(handle.key)  # purged or evicted by another process since we looked
        entry = None
    if entry is not None:
        return await _serve_hit(request, entry)
    if request.app[SETTINGS].mode == "offline":
        return _error(504, f"{handle.key} is not cached and this mirror is offline", headers={X_CACHE: MISS})
    if request.method == "HEAD":
        return await _head_upstream(request, handle)
    return await _serve_flight(request, handle)


# -- HIT -------------------------------------------------------------------------------------

def _sends_body(request: web.Request, entry: Entry) -> bool:
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


def quick_hit(app: web.Application, method: str, target: str, if_none_match: str | None
              ) -> tuple[int, bytes, str] | None:
    """(status, header lines, key) for a HEAD or a matching If-None-Match on a cached archive, the
    answers that need no body and no aiohttp request (see fastfront); None for anything else."""
    key = _key_of_target(target) if len(target) <= MAX_MEMO_TARGET else None
    entry = None if key is None else app[STORE].lookup(key)
    if entry is None:
        return None
    matched = _matches(if_none_match, entry.sha256)
    if method == "GET" and not matched:
        return None
    _count_hit(app, entry)
    status, header_lines = _encoded_bodiless_hit(entry.sha256, entry.size, entry.content_type, matched)
    return status, header_lines, key


@functools.lru_cache(maxsize=4096)
def _key_of_target(target: str) -> str | None:
    """The cache key a hub request target names (None for anything else, /admin/ included)."""
    if target.startswith("/admin/"):
        return None
    try:
        return parse_request_target(target).key
    except BadHandle:
        return None


@functools.lru_cache(maxsize=4096)
def _encoded_bodiless_hit(sha256: str, size: int, content_type: str, matched: bool) -> tuple[int, bytes]:
    status, headers = _bodiless_hit(sha256, size, content_type, HIT, matched)
    return status, encode_header_lines(headers)


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


async def _serve_hit(request: web.Request, entry: Entry, outcome: str = HIT) -> web.StreamResponse:
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


def _range_problem(value: str | None) -> str | None:
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


# -- MISS / JOIN -----------------------------------------------------------------------------

async def _serve_flight(request: web.Request, handle: Handle) -> web.StreamResponse:
    # A Range on a miss gets the whole archive (RFC 9110 lets a server ignore Range): ranges
    # are cut from verified blobs only.
    streaming = request.version >= (1, 1)
    async with request.app[FLIGHTS].join(handle.key, _upstream_url(request, handle), streaming=streaming) as (
            flight, joined):
        outcome = JOIN if joined else MISS
        request.app[METRICS].requests.labels(outcome).inc()
        try:
            await flight.ready()
        except FlightFailed as e:
            return _error(e.status, e.message, headers={X_CACHE: outcome})
        if not streaming:
            return await _serve_when_committed(request, flight)
        response = web.StreamResponse(headers={X_CACHE: outcome, "Content-Type": flight.evidence.content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            await _send_chunked(request, response, flight)
            await response.write_eof()
        except FlightFailed as e:
            log.warning("cutting %s short for a client: %s", handle.key, e.message)
            _cut(request)
        except ConnectionResetError:
            log.info("client left during %s; the fetch goes on", handle.key)
        return response


async def _send_chunked(request: web.Request, response: web.StreamResponse, flight) -> None:
    """Each span of the growing archive as one chunk, its bytes sent with sendfile (no copies
    through Python), or written from memory when the fetch is passing through. The terminating
    chunk is left to the caller: it is the promise of a complete, verified archive."""
    loop = asyncio.get_running_loop()
    request[BODY_BYTES_KEY] = 0
    with flight.open_file() or contextlib.nullcontext() as archive:
        async with contextlib.aclosing(flight.spans()) as spans:
            async for start, length, data in spans:
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away")
                if data is None:
                    transport.write(b"%x\r\n" % length)
                    await loop.sendfile(transport, archive, start, length)
                    transport.write(b"\r\n")
                else:
                    for view in data:
                        await response.write(view)  # framed as a chunk of its own, with flow control
                request[BODY_BYTES_KEY] += length


async def _serve_when_committed(request: web.Request, flight) -> web.StreamResponse:
    """HTTP/1.0 has no chunked encoding to withhold the end with: such clients wait for the
    verified archive and get it with a Content-Length, like a hit."""
    try:
        entry = await flight.finished()
    except FlightFailed as e:
        return _error(e.status, e.message, headers={X_CACHE: MISS})
    return await _serve_hit(request, entry, outcome=MISS)


def _cut(request: web.Request) -> None:
    """End the connection without the terminating chunk, so the client sees an incomplete body."""
    if request.transport is not None:
        request.transport.abort()


async def _head_upstream(request: web.Request, handle: Handle) -> web.Response:
    request.app[METRICS].requests.labels(MISS).inc()
    try:
        upstream_response = await request.app[UPSTREAM].open(_upstream_url(request, handle), method="HEAD")
    except UpstreamError as e:
        return _error(e.status, e.message, headers={X_CACHE: MISS})
    with contextlib.closing(upstream_response):
        evidence = Evidence.from_headers(upstream_response.headers)
    headers = {X_CACHE: MISS, "Content-Type": evidence.content_type}
    if evidence.content_length is not None:
        headers["Content-Length"] = str(evidence.content_length)
    return web.Response(status=200, headers=headers)


def _upstream_url(request: web.Request, handle: Handle) -> str:
    return handle.upstream_url(request.app[SETTINGS].upstreams[handle.upstream])


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)
