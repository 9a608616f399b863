"""A fetch's body as one stream across cuts and stalls: where the upstream connection breaks, or its
bytes trickle below the floor, the same object is asked for again from the byte it broke at.

Invariants: the bytes handed on are the object's, once each and in order, so the hashes that follow
them see one body; a resume asks the final (signed storage) URL for `bytes=N-` with If-Match of the
origin's strong ETag, N being every byte handed on so far, and goes on only with a 206 whose
Content-Range starts at N and has the same total, under the same ETag; anything else (412, a 200,
another ETag or range) fails the fetch as the cut would have; a signed URL refused at resume time
(400, 401, 403) is signed afresh by following the chain again from its first hop, once per resume;
at most `upstream_resumes` resumes per fetch, and none without a strong ETag and a length. The
pace floor counts only time spent waiting for upstream, never time the pipeline took elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Callable

import aiohttp

from ..handles import strip_query
from ..units import format_size
from .errors import FetchFailed
from .evidence import Evidence
from .flight import Flight
from .upstream import Upstream

log = logging.getLogger(__name__)

CUT, STALL = "cut", "stall"  # why a body was resumed (the metric's label values)
_REFUSED_SIGNATURE = {400, 401, 403}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class _Stalled(Exception):
    pass


class PaceFloor:
    """Judges upstream's pace over windows of time spent waiting for it: fewer than `rate` bytes a
    second over a whole window is a stall. A rate or window of 0 judges nothing."""

    def __init__(self, rate: int, window: float):
        self.rate, self.window = rate, window
        self.restart()

    def restart(self) -> None:
        self._waited, self._got = 0.0, 0

    def count(self, received: int) -> None:
        self._got += received

    async def read(self, content: aiohttp.StreamReader) -> bytes:
        """content.readany(), or _Stalled once a window has passed below the floor."""
        if not self.rate or not self.window:
            return await content.readany()
        loop = asyncio.get_running_loop()
        while True:
            began, piece = loop.time(), None
            deadline = asyncio.timeout(max(0.0, self.window - self._waited))
            try:
                async with deadline:
                    piece = await content.readany()
            except TimeoutError:
                if not deadline.expired():
                    raise  # the connection's own read timeout: a cut
            finally:
                self._waited += loop.time() - began
            if piece is not None:
                self.count(len(piece))
            if self._waited >= self.window:
                self._judge()
            if piece is not None:
                return piece

    def _judge(self) -> None:
        if self._got < self.rate * self.window:
            raise _Stalled(f"upstream sent {format_size(self._got)} in {self.window:g}s, below the floor of "
                           f"{format_size(self.rate)}/s")
        self.restart()


class ResumableBody:
    """The body of `response` (the chain's final 200, from flight url `first_url`), read as
    `readany()` / `read_nowait(n)` like aiohttp's StreamReader; it resumes on cuts and stalls and
    raises FetchFailed when it may not. on_resume(reason) is told of each resume."""

    def __init__(self, upstream: Upstream, response: aiohttp.ClientResponse, evidence: Evidence, first_url: str,
                 post_json: dict | None = None, on_resume: Callable[[str], None] | None = None):
        settings = upstream.settings
        self._upstream, self._response, self._evidence = upstream, response, evidence
        self._url, self._first_url, self._post_json = str(response.url), first_url, post_json
        self._resumes_left = settings.upstream_resumes
        self._pace = PaceFloor(settings.upstream_min_rate_bytes, settings.upstream_rate_window_seconds)
        self._on_resume = on_resume or (lambda reason: None)
        self._resuming: asyncio.Future | None = None
        self.received = 0
        self.resumed = 0

    async def readany(self) -> bytes:
        """The next bytes, b"" at the end. Cancel-safe: a resume under way outlives a cancelled wait."""
        while True:
            if self._resuming is not None:
                response = await asyncio.shield(self._resuming)
                self._response, self._resuming = response, None
                self._pace.restart()
            try:
                piece = await self._pace.read(self._response.content)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                self._resume(CUT, FetchFailed(502, f"upstream transfer broke after {self.received} bytes: "
                                                   f"{type(e).__name__}"))
                continue
            except _Stalled as e:
                self._resume(STALL, FetchFailed(504, f"{e} after {self.received} bytes"))
                continue
            if not piece and self.received < (self._evidence.content_length or 0):
                self._resume(CUT, FetchFailed(502, f"upstream transfer ended after {self.received} bytes"))
                continue
            self.received += len(piece)
            return piece

    def read_nowait(self, n: int) -> bytes:
        """Bytes already here (at most n), b"" when none are (or trouble waits for readany)."""
        if self._resuming is not None or self._response.content.exception() is not None:
            return b""
        piece = self._response.content.read_nowait(n)
        self.received += len(piece)
        self._pace.count(len(piece))
        return piece

    def close(self) -> None:
        if self._resuming is not None:
            self._resuming.cancel()
        self._response.close()

    def _resume(self, reason: str, failure: FetchFailed) -> None:
        """Ask again from byte `received`, in the background; raise `failure` when that may not be."""
        self._response.close()
        etag, length = self._evidence.etag, self._evidence.content_length
        if self._resumes_left == 0 or length is None or etag is None or etag.startswith("W/"):
            if self.resumed:
                failure.message += f" (resumed {self.resumed} times)"
            raise FetchFailed(failure.status, failure.message)
        self._resumes_left -= 1
        self.resumed += 1
        self._on_resume(reason)
        log.warning("%s; resuming %s at byte %d", failure.message, strip_query(self._url), self.received)
        self._resuming = asyncio.ensure_future(self._resumed({"Range": f"bytes={self.received}-", "If-Match": etag}))

    async def _resumed(self, headers: dict) -> aiohttp.ClientResponse:
        response = await self._upstream.get_resumed(self._url, headers)
        if response.status in _REFUSED_SIGNATURE:
            response.release()  # most likely the signed URL has expired: ask the chain for a fresh one
            self._url = await self._upstream.relocate(self._first_url, strip_query(self._url), self._post_json)
            response = await self._upstream.get_resumed(self._url, headers)
        problem = _resume_problem(response, self.received, self._evidence)
        if problem is not None:
            response.release()
            raise FetchFailed(502, f"upstream {strip_query(self._url)} {problem} after {self.received} bytes; "
                                   "the transfer cannot be resumed")
        return response


async def resume_from(upstream: Upstream, flight: Flight, final: str, start: int,
                      on_resume: Callable[[str], None] | None = None) -> "ResumableBody | _Ended":
    """The rest of flight's object from byte `start` (a fetch taken over from a process that died):
    the chain followed again to a freshly signed URL for `final`, asked for `bytes=start-` with
    If-Match, and checked as any resume; the end of the body at once when nothing is left."""
    evidence = flight.evidence
    if evidence.content_length is not None and start == evidence.content_length:
        return _Ended()
    etag = evidence.etag
    if evidence.content_length is None or etag is None or etag.startswith("W/"):
        raise FetchFailed(502, f"the fetch of {flight.key} broke off after {start} bytes and cannot be resumed "
                               "(upstream gave no strong ETag and length)")
    url = flight.url
    if strip_query(url) != final:
        url = await upstream.relocate(flight.url, final, flight.post_json)
    response = await upstream.get_resumed(url, {"Range": f"bytes={start}-", "If-Match": etag})
    problem = _resume_problem(response, start, evidence)
    if problem is not None:
        response.release()
        raise FetchFailed(502, f"upstream {final} {problem} after {start} bytes; the transfer cannot be resumed")
    body = ResumableBody(upstream, response, evidence, flight.url, flight.post_json, on_resume)
    body.received = start
    return body


class _Ended:
    """A body with nothing left in it."""

    async def readany(self) -> bytes:
        return b""

    def read_nowait(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _resume_problem(response: aiohttp.ClientResponse, start: int, evidence: Evidence) -> str | None:
    """What makes response no continuation of the object from byte `start`, or None."""
    if response.status == 412:
        return "changed (412 to If-Match)"
    if response.status != 206:
        return f"answered a resume with {response.status} {response.reason or ''}".rstrip()
    if response.headers.get("ETag") != evidence.etag:
        return "changed (another ETag)"
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    total = evidence.content_length
    if match is None or (int(match[1]), int(match[2]), int(match[3])) != (start, total - 1, total):
        return f"answered a resume with Content-Range {response.headers.get('Content-Range')!r}"
    return None
