"""Misses: a request for an archive not yet cached joins the flight for its key (JOIN) or starts
one (MISS), and follows the growing archive as it arrives.

Invariants: a streamed response ends with its terminating chunk only after the archive is
verified (and committed, unless the disk refuses it), otherwise the connection is cut; HTTP/1.0
clients, which cannot be told of a cut, get only verified, stored archives, and so does a request
for a byte range, answered 206 from the committed blob (never a 200: a resuming client appends
what it gets), fetched again as a miss when that blob is purged as it is committed; a reader whose
client has left is detached within CLIENT_CHECK_SECONDS, however long the fetch it waits on takes;
this module asks the flight for spans and never builds a file path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, TypeVar

from aiohttp import web

from ..fetch.errors import FetchFailed
from ..fetch.evidence import Evidence
from ..fetch.flight import Flight
from ..handles import Handle
from . import wire
from .accesslog import BODY_BYTES_KEY
from .components import FLIGHTS, METRICS, SETTINGS, UPSTREAM
from .hits import asks_for_range, serve_hit, serve_if_cached
from .replies import JOIN, MISS, X_CACHE, error

log = logging.getLogger(__name__)

CLIENT_CHECK_SECONDS = 1.0  # how often a reader waiting on its fetch looks whether its client is still there
CLIENT_LEFT = 499  # logged for a request whose client left before it had an answer (as nginx does)
FETCHES_AFTER_A_PURGE = 1  # times a request whose archive was purged as it was committed fetches it again
T = TypeVar("T")


async def serve_flight(request: web.Request, key: str, url: str, *, post_json: dict | None = None,
                       archive: bool = True, resumable: bool = False) -> web.StreamResponse:
    """Join (or start) the flight for key, whose first hop is url (a POST of post_json when given).
    resumable: the client may resume what it got (kagglehub), so a miss is sent with the
    Content-Length, x-goog-hash and Accept-Ranges the origin gave, not chunked; a cut still leaves
    it short of that length. A request that waits for the committed archive (HTTP/1.0, a Range)
    and finds it purged as it was committed is a miss again: a vanished blob is a miss, not an error."""
    for attempt in range(1 + FETCHES_AFTER_A_PURGE):
        if attempt:
            log.info("%s was purged as it was committed; fetching it again", key)
            response = await serve_if_cached(request, key)  # unless another request has fetched it since
            if response is not None:
                return response
        response = await _follow_flight(request, key, url, post_json, archive, resumable)
        if response is not None:
            return response
    return error(503, f"{key} was purged each time it was committed; ask again", headers={X_CACHE: MISS})


async def _follow_flight(request: web.Request, key: str, url: str, post_json: dict | None, archive: bool,
                         resumable: bool) -> web.StreamResponse | None:
    """serve_flight's answer from one flight; None when the archive it committed was purged at once."""
    streaming = request.version >= (1, 1) and request.method != "HEAD" and not asks_for_range(request)
    async with request.app[FLIGHTS].join(key, url, streaming=streaming, post_json=post_json, archive=archive) as (
            flight, joined):
        outcome = JOIN if joined else MISS
        request.app[METRICS].requests.labels(outcome).inc()
        try:
            await _unless_client_leaves(request, flight.ready())
        except FetchFailed as e:
            return error(e.status, e.message, headers={X_CACHE: outcome})
        except ConnectionError:
            return error(CLIENT_LEFT, "the client left before the fetch began", headers={X_CACHE: outcome})
        if not streaming:
            return await _serve_when_committed(request, flight, outcome)
        response = web.StreamResponse(headers={X_CACHE: outcome, "Content-Type": flight.evidence.content_type})
        chunked = not resumable or flight.evidence.content_length is None
        if chunked:
            response.enable_chunked_encoding()
            if flight.evidence.x_goog_hash is not None:  # a child hubproxy verifies against it
                response.headers["x-goog-hash"] = flight.evidence.x_goog_hash
        else:
            _announce_length(response, flight.evidence)
        try:
            await wire.start(request, response)
            await _unless_client_leaves(request, _send_spans(request, response, flight, chunked))
            await response.write_eof()
        except FetchFailed as e:
            log.warning("cutting %s short for a client: %s", key, e.message)
            wire.cut(request)
        except ConnectionError:
            log.info("client left during %s; the fetch goes on", key)
        return response


async def _unless_client_leaves(request: web.Request, work: Awaitable[T]) -> T:
    """The result of work, or ConnectionResetError once the client's connection is gone (work is
    then cancelled): aiohttp does not cancel a handler whose client left, so without this a reader
    waiting for the bytes of a stalled fetch would stay attached to it for as long as it lasts."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=CLIENT_CHECK_SECONDS)
            if not task.done() and (request.transport is None or request.transport.is_closing()):
                raise ConnectionResetError("the client left")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _announce_length(response: web.StreamResponse, evidence: Evidence) -> None:
    response.content_length = evidence.content_length
    response.headers["Accept-Ranges"] = "bytes"
    if evidence.x_goog_hash is not None:
        response.headers["x-goog-hash"] = evidence.x_goog_hash


async def _send_spans(request: web.Request, response: web.StreamResponse, flight: Flight, chunked: bool) -> None:
    """Each span of the growing archive (one chunk of its own when chunked), its bytes sent with
    sendfile (no copies through Python), or written from memory when the fetch is passing through.
    The end (the terminating chunk, or the last bytes of a Content-Length) is the promise of a
    complete, verified archive: spans withhold it until then."""
    request[BODY_BYTES_KEY] = 0
    send = wire.send_file_chunk if chunked else wire.send_file
    with flight.open_file() or contextlib.nullcontext() as archive:
        async with contextlib.aclosing(flight.spans()) as spans:
            async for start, length, data in spans:
                if data is None:
                    await send(request, response, archive, start, length)
                else:
                    for view in data:
                        await response.write(view)  # framed as a chunk of its own, with flow control
                request[BODY_BYTES_KEY] += length


async def _serve_when_committed(request: web.Request, flight: Flight, outcome: str) -> web.StreamResponse | None:
    """HTTP/1.0 has no chunked encoding to withhold the end with, and a range is cut from a
    verified blob only: such requests wait for the committed archive and are answered like a hit
    (Content-Length, 206 for a range); None when its blob is gone (purged as it was committed)."""
    try:
        entry = await _unless_client_leaves(request, flight.finished())
    except FetchFailed as e:
        return error(e.status, e.message, headers={X_CACHE: outcome})
    except ConnectionError:
        return error(CLIENT_LEFT, "the client left before the fetch ended", headers={X_CACHE: outcome})
    return await serve_hit(request, entry, outcome=outcome)


async def head_upstream(request: web.Request, handle: Handle) -> web.Response:
    request.app[METRICS].requests.labels(MISS).inc()
    try:
        upstream_response = await request.app[UPSTREAM].open(upstream_url(request, handle), method="HEAD")
    except FetchFailed as e:
        return error(e.status, e.message, headers={X_CACHE: MISS})
    with contextlib.closing(upstream_response):
        evidence = Evidence.from_headers(upstream_response.headers)
    headers = {X_CACHE: MISS, "Content-Type": evidence.content_type}
    if evidence.content_length is not None:
        headers["Content-Length"] = str(evidence.content_length)
    return web.Response(status=200, headers=headers)


def upstream_url(request: web.Request, handle: Handle) -> str:
    """Where a handle's archive is fetched from (its upstream's configured base URL)."""
    return handle.upstream_url(request.app[SETTINGS].upstream_base(handle.upstream))
