"""Every client connection but those quickhits.py answers at accept, to its close: the protocol in
front of aiohttp's (and of the forward-proxy door when intercepting), which sees every byte before it
and keeps these rules (the connection cap counts quick answers too).

Invariants:
- a request head has a deadline, from the connection's start (accepted, or a TLS tunnel's
  handshake done) or, on a kept-alive connection, from the next head's first byte; bytes never
  extend it; when it passes the client gets a 408 with a one-line reason and the connection closes;
- a connection closed on a refusal (408, 503) is half-closed after it and drops what the client still
  sends until the client's end or LINGER_SECONDS: no reset (a close with bytes unread) overtakes it;
- at most `cap` connections are open: one more closes the longest-idle connection (between
  requests) first, or, when every other is busy, is itself answered 503 and closed;
- an HTTP/1.0 request with Transfer-Encoding has faulty framing (RFC 9112 6.1): the connection
  closes after its response;
- draining (a stop signal, drain.py): an idle connection closes at once, a busy one after the
  response it is answering (or one whose head is arriving); cut() aborts whatever is left.
This module finds where a head ends ("\\r\\n\\r\\n") and parses nothing else of HTTP: when a request
starts and ends it learns from the app's outermost middleware (request_bounds).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

from aiohttp import web

from .fdtable import Burst

HEAD_END = b"\r\n\r\n"
# How long a closing TLS connection waits for the client's close_notify (asyncio's default, 30s, would
# hold a drain that long for every intercepted client that never sends one).
TLS_CLOSE_SECONDS = 5.0
# How long a connection closing on a refusal (408, 503) reads and drops what the client still sends:
# closed with its bytes unread, it would be reset, and a reset can overtake the refusal.
LINGER_SECONDS = 2.0
IDLE, HEAD, REQUEST = "idle", "head", "request"  # between requests; a head arriving; a request being answered


class Table:
    """The open connections, the idle ones in the order they became idle."""

    def __init__(self, cap: int):
        self.cap = cap
        self._open: set[Connection] = set()
        self._idle: dict[Connection, None] = {}  # insertion order: the longest idle first
        self._full = Burst(f"refusing connections: all {cap} allowed are busy (max_connections)")
        self.slow_heads = Burst("closing connections whose request head is late", logging.INFO)
        self._all_closed: asyncio.Event | None = None  # made by drain()

    def admit(self, connection: Connection) -> bool:
        if len(self._open) >= self.cap:
            longest_idle = next(iter(self._idle), None)
            if longest_idle is None:
                self._full.happened("answered 503")
                return False
            self.leave(longest_idle)
            longest_idle.close()
        self._open.add(connection)
        return True

    def leave(self, connection: Connection) -> None:
        self._open.discard(connection)
        self._idle.pop(connection, None)
        if not self._open and self._all_closed is not None:
            self._all_closed.set()

    def idle(self, connection: Connection) -> None:
        if connection in self._open:
            self._idle.pop(connection, None)
            self._idle[connection] = None

    def busy(self, connection: Connection) -> None:
        self._idle.pop(connection, None)

    def drain(self) -> int:
        """Close the idle connections now and the busy ones after their current response; returns
        how many are busy."""
        self._all_closed = asyncio.Event()
        busy = [connection for connection in list(self._open) if not connection.drain()]
        if not self._open:
            self._all_closed.set()
        return len(busy)

    async def all_closed(self) -> None:
        """After drain(): return once no connection is open."""
        while self._open:
            self._all_closed.clear()
            await self._all_closed.wait()

    def cut(self) -> int:
        """Abort every connection still open (mid-transfer: its client sees an incomplete body);
        returns how many."""
        left = list(self._open)
        for connection in left:
            connection.abort()
        return len(left)


class Connection(asyncio.Protocol):
    """One client connection. `first` makes the protocol that gets its bytes first (aiohttp's, or
    the forward-proxy door, which may hand it on with hand_to or start_tls)."""

    def __init__(self, table: Table, header_timeout: float, first: Callable[[Connection], asyncio.Protocol]):
        self._table = table
        self._header_timeout = header_timeout
        self._first = first
        self._inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self._http = True  # False once a plain tunnel carries the bytes: they are not ours to read
        self._state = IDLE
        self._tail = b""  # the last bytes seen, so a head's end split across reads is found
        self._carried = False  # bytes arrived while a request was answered: the next head may have begun
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False  # refused: what arrives now is dropped

    # -- asyncio.Protocol: everything is passed on to the inner protocol -------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        accepted = self.transport is None  # else the TLS transport of an intercepted tunnel (start_tls)
        self.transport = transport
        if accepted:
            if not self._table.admit(self):
                self.answer(503, "Service Unavailable", "the mirror is at its connection limit; try again")
                return
            self._inner = self._first(self)
        self._between_requests(head_deadline=True)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None or self._lingering:
            return
        if self._http:
            self._watch(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None or self._lingering:
            return None  # the transport closes
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # -- for the forward-proxy door ------------------------------------------------------

    def hand_to(self, inner: asyncio.Protocol, data: bytes = b"", *, http: bool = True) -> None:
        """From now on `inner` gets the connection, starting with `data` (bytes already read);
        http=False: a plain tunnel, whose bytes have no heads or deadlines."""
        self._inner, self._http = inner, http
        if not http:
            self._stop_deadline()
            self._table.busy(self)
        inner.connection_made(self.transport)
        if data:
            inner.data_received(data)

    async def start_tls(self, context: ssl.SSLContext, inner: asyncio.Protocol, handshake_timeout: float
                        ) -> asyncio.Transport:
        """Terminate TLS on this connection; `inner` gets the plaintext, with heads watched as
        before. Raises what start_tls raises, having aborted the connection."""
        self._inner = inner
        raw = self.transport
        try:
            tls = await asyncio.get_running_loop().start_tls(raw, self, context, server_side=True,
                                                             ssl_handshake_timeout=handshake_timeout,
                                                             ssl_shutdown_timeout=TLS_CLOSE_SECONDS)
        except BaseException:
            raw.abort()
            self._leave()  # the TLS layer never reports a loss for a handshake that failed
            raise
        self.connection_made(tls)  # start_tls leaves that to its caller
        return tls

    def close(self) -> None:
        self._stop_deadline()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._stop_deadline()
        if self.transport is not None:
            self.transport.abort()

    def drain(self) -> bool:
        """Stopping: an idle connection closes now (True). A busy one stays open (False) until its
        current response is sent, then aiohttp closes it: told so here when that response may be
        under way already, or by the Connection: close its response gets (lifecycle.py) when its
        head is still arriving. A plain tunnel stays open until its client closes it or it is cut."""
        if self._http and self._state == IDLE:
            # Idle since its last response left the handler: aiohttp writes such a response to the
            # transport without waiting on anything but the buffer, and close() sends the buffer first.
            self.close()
            return True
        if self._state == REQUEST and isinstance(self._inner, web.RequestHandler):
            self._inner.close()
        return False

    # -- heads and their deadline --------------------------------------------------------

    def request_started(self) -> None:
        self._state = REQUEST
        self._stop_deadline()
        self._table.busy(self)

    def request_done(self) -> None:
        if self._state == REQUEST:
            self._between_requests(head_deadline=False)

    def _between_requests(self, head_deadline: bool) -> None:
        """Waiting for a head: the deadline starts now (a new connection) or with its first byte."""
        self._state = IDLE
        self._stop_deadline()
        if head_deadline:
            self._tail, self._carried = b"", False
            self._deadline = asyncio.get_running_loop().call_later(self._header_timeout, self._too_slow)
        self._table.idle(self)

    def _watch(self, data: bytes) -> None:
        if self._state == REQUEST:
            self._carried = True
            self._tail = (self._tail + data[-3:])[-3:]  # no copy of the whole body chunk
            return
        if self._state == IDLE:
            if not self._carried:
                data = data.lstrip(b"\r\n")  # a head may follow empty lines (RFC 9112 2.2); they are no head
                self._tail = b""
                if not data:
                    return
            self._state = HEAD
            self._table.busy(self)
            if self._deadline is None:
                self._deadline = asyncio.get_running_loop().call_later(self._header_timeout, self._too_slow)
        seen = self._tail + data
        end = seen.find(HEAD_END)
        if end < 0:
            self._tail = seen[-3:]
            return
        self._state = REQUEST
        self._stop_deadline()
        rest = seen[end + len(HEAD_END):]
        self._tail, self._carried = rest[-3:], bool(rest)

    def _too_slow(self) -> None:
        self._deadline = None
        self._table.slow_heads.happened(f"none arrived whole within {self._header_timeout:g}s (header_timeout)")
        self.answer(408, "Request Timeout", f"the request head did not arrive within {self._header_timeout:g}s")

    def answer(self, status: int, phrase: str, reason: str) -> None:
        body = reason.encode() + b"\n"
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), body))
        self._close_after_lingering()

    def _close_after_lingering(self) -> None:
        """Close without losing what was just written: half-close now (the client reads the answer,
        then its end), drop what the client still sends, and close on its end or LINGER_SECONDS."""
        if not self.transport.can_write_eof():  # TLS: its close_notify ends the answer cleanly
            self.close()
            return
        self._stop_deadline()
        self._lingering = True
        self.transport.write_eof()
        self._deadline = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _leave(self) -> None:
        self._stop_deadline()
        self._table.leave(self)


def _connection_of(request: web.Request) -> Connection | None:
    """The Connection a request came on (None when served without one, as in-process tests do)."""
    protocol = request.transport.get_protocol() if request.transport is not None else None
    return protocol if isinstance(protocol, Connection) else None


@web.middleware
async def request_bounds(request: web.Request, handler) -> web.StreamResponse:
    """Tells the request's connection when a request starts and ends: bytes after its end begin
    the next head. Must be the app's outermost middleware."""
    connection = _connection_of(request)
    if connection is not None:
        connection.request_started()
    try:
        response = await handler(request)
    except web.HTTPException as e:
        _close_after_faulty_framing(request, e)
        raise
    finally:
        if connection is not None:
            connection.request_done()
    _close_after_faulty_framing(request, response)
    return response


def _close_after_faulty_framing(request: web.Request, response: web.StreamResponse) -> None:
    if request.version < (1, 1) and "Transfer-Encoding" in request.headers:
        response.force_close()
