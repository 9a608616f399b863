"""Hits: a cached archive served from its blob on disk with the HTTP semantics download tools rely
on (RFC 9110): validators (ETag = sha256, Last-Modified, Repr-Digest), one byte Range, If-Range,
If-None-Match, HEAD.

Invariants: a hit never contacts upstream; HEAD answers with exactly the status and headers GET
would; the ETag is always the quoted sha256; a body comes from the blob the index names, opened
before anything is sent and protected from eviction while being sent; a Range is honoured only
when If-Range, if given, is that strong ETag.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import email.utils
import re
from collections.abc import Iterator

from aiohttp import web

from ..cache.store import Entry
from ..fetch.media_type import safe_media_type
from . import wire
from .accesslog import BODY_BYTES_KEY
from .components import METRICS, SERVING, STORE
from .replies import HIT, X_CACHE

IMMUTABLE = "public, max-age=31536000, immutable"
_EMPTY_SUFFIX = re.compile(r"bytes=-0+", re.IGNORECASE)


class _Unsatisfiable(Exception):
    pass


def range_problem(request: web.Request) -> str | None:
    """A one-line reason when a byte Range is malformed; None when absent, usable or ignored."""
    try:
        _byte_range(request)
    except ValueError:
        return f"malformed Range header {request.headers['Range'][:60]!r}; expected bytes=START-END"
    return None


def asks_for_range(request: web.Request) -> bool:
    """Whether the request asks for one byte range (a well-formed one: see range_problem)."""
    return _byte_range(request) is not None


def _byte_range(request: web.Request) -> slice | None:
    """The one byte range asked for; None for the whole archive (no Range, another unit, several
    ranges: RFC 9110 lets a server send the whole instead). Raises ValueError when malformed."""
    value = request.headers.get("Range")
    if value is None or value.partition("=")[0].strip().lower() != "bytes" or "," in value:
        return None
    if _EMPTY_SUFFIX.fullmatch(value):
        return slice(0, 0)  # the last zero bytes: nothing to send
    return request.http_range


def _span(wanted: slice, size: int) -> tuple[int, int]:
    """(start, stop) within the archive; raises _Unsatisfiable."""
    start, stop = wanted.start, size if wanted.stop is None else min(wanted.stop, size)
    if start < 0:
        start = max(0, size + start)
    if start >= stop:
        raise _Unsatisfiable
    return start, stop


def validators(entry: Entry, outcome: str) -> dict[str, str]:
    return {X_CACHE: outcome, "ETag": f'"{entry.sha256}"',
            "Last-Modified": email.utils.formatdate(entry.fetched, usegmt=True),
            "Repr-Digest": "sha-256=:" + base64.b64encode(bytes.fromhex(entry.sha256)).decode() + ":",
            "Cache-Control": IMMUTABLE}


def _matches_any(if_none_match: str, sha256: str) -> bool:
    """If-None-Match compares weakly: W/"x" matches "x"."""
    tags = [tag.strip().removeprefix("W/").strip('"') for tag in if_none_match.split(",")]
    return "*" in tags or sha256 in tags


async def serve_if_cached(request: web.Request, key: str) -> web.StreamResponse | None:
    """The hit for key; None when it is not cached (or its blob is gone since the index said so)."""
    store = request.app[STORE]
    entry = store.lookup(key)
    if entry is None:
        return None
    response = await serve_hit(request, entry)
    if response is None:
        store.forget(key)  # purged or evicted by another process since we looked
    return response


async def serve_hit(request: web.Request, entry: Entry, outcome: str = HIT) -> web.StreamResponse | None:
    """The response for a cached entry; None when its blob is gone since the lookup."""
    headers = validators(entry, outcome)
    if_none_match = ", ".join(request.headers.getall("If-None-Match", ()))  # several fields are one list
    if if_none_match and _matches_any(if_none_match, entry.sha256):
        _count(request, entry, outcome)
        return web.Response(status=304, headers=headers)
    wanted = _byte_range(request)
    if wanted is not None and request.headers.get("If-Range", headers["ETag"]) != headers["ETag"]:
        wanted = None  # a weak tag, another tag or a date: the client's partial copy may be of other bytes
    try:
        start, stop = (0, entry.size) if wanted is None else _span(wanted, entry.size)
    except _Unsatisfiable:
        return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{entry.size}"})
    status = 200 if wanted is None else 206
    headers.update(body_headers(entry, stop - start))
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{entry.size}"
    if request.method == "HEAD":
        if not request.app[STORE].has_blob(entry):
            return None  # as GET would learn at the open: a miss
        _count(request, entry, outcome)
        return web.Response(status=status, headers=headers)
    return await _send_blob(request, entry, outcome, web.StreamResponse(status=status, headers=headers), start, stop)


def body_headers(entry: Entry, length: int) -> dict[str, str]:
    """What a response with `length` bytes of the archive says of its body."""
    return {"Content-Type": safe_media_type(entry.content_type),  # an older version stored any
            "Accept-Ranges": "bytes", "Content-Length": str(length)}


async def _send_blob(request: web.Request, entry: Entry, outcome: str, response: web.StreamResponse,
                     start: int, stop: int) -> web.StreamResponse | None:
    blob = request.app[STORE].open_blob(entry)
    if blob is None:
        return None
    _count(request, entry, outcome)
    try:
        with blob, being_sent(request.app[SERVING], entry.sha256):
            await wire.send_whole(request, response, blob, start, stop - start)
    except ConnectionError:
        return response  # the client left; nothing of ours to clean up
    request[BODY_BYTES_KEY] = stop - start
    request.app[METRICS].cache_bytes_served.inc(stop - start)
    return response


@contextlib.contextmanager
def being_sent(serving: collections.Counter, sha256: str) -> Iterator[None]:
    """The blob counts as being sent (so it is not evicted) until the block ends; one no longer sent
    leaves no key behind, or the counter would grow by every blob ever served."""
    serving[sha256] += 1
    try:
        yield
    finally:
        serving[sha256] -= 1
        if serving[sha256] <= 0:
            del serving[sha256]


def _count(request: web.Request, entry: Entry, outcome: str) -> None:
    if outcome == HIT:
        count_hit(request.app, entry)


def count_hit(app: web.Application, entry: Entry) -> None:
    app[METRICS].hits.inc()
    app[STORE].record_hit(entry.key)
