"""A front on each connection for the hottest small requests: HEAD and If-None-Match revalidations
of cached archives, answered straight off the wire, at about five times aiohttp's rate.

Invariants: the front answers only requests it fully understands (GET or HEAD, HTTP/1.x, no body,
none of the headers that change an answer but If-None-Match) and only when `answer` gives one; at
the first request it does not answer, the connection and every byte not yet answered pass to aiohttp
for good, so responses keep request order and everything else behaves exactly as aiohttp makes it.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import http
import re
import time
import urllib.parse
from collections.abc import Callable

from aiohttp.http import SERVER_SOFTWARE

from . import accesslog

# (method, target, If-None-Match) → (status, encoded header lines, cache key), or None: not ours.
Answer = Callable[[str, str, "str | None"], "tuple[int, bytes, str] | None"]

MAX_HEAD = 8190  # aiohttp refuses longer header lines; longer heads go to it to be refused
KEEPALIVE_SECONDS = 75.0  # as aiohttp's keep-alive timeout
_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.([01])")
# The header lines, each with the CRLF before it: well-formed fields only (no obs-fold, no bare CR/LF).
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*")
# Headers whose presence means a body, a protocol switch or a conditional only aiohttp's path handles.
_NOT_OURS = re.compile(rb"\r\n(?:content-length|transfer-encoding|expect|upgrade|te|trailer|range|if-range|if-match"
                       rb"|if-modified-since|if-unmodified-since):", re.IGNORECASE)
_IF_NONE_MATCH = re.compile(rb"\r\nif-none-match:[ \t]*([^\r]*?)[ \t]*(?=\r|$)", re.IGNORECASE)
_CONNECTION = re.compile(rb"\r\nconnection:([^\r]*)", re.IGNORECASE)
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_CLOSE, _KEEP_ALIVE = b"Connection: close\r\n", b"Connection: keep-alive\r\n"


class FastFront(asyncio.Protocol):
    def __init__(self, answer: Answer, fallback: Callable[[], asyncio.Protocol], access_log: accesslog.AccessLog,
                 connections: set[asyncio.Transport]):
        self._answer = answer
        self._fallback = fallback
        self._access_log = access_log if access_log.enabled else None
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        self._buffer = b""
        self._reading_paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._connections.add(transport)
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if peer else None
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._idle_timer = self._loop.call_later(KEEPALIVE_SECONDS, self._close_if_idle)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        buffer = self._buffer + data if self._buffer else data
        responses, start, close, ours = [], 0, False, True
        while not close:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                ours = len(buffer) - start <= MAX_HEAD
                break
            answered = self._respond(buffer[start:end])
            if answered is None:
                ours = False
                break
            response, keep_alive = answered
            close = not keep_alive
            responses.append(response)
            start = end + 4
        if responses:
            self._transport.write(b"".join(responses))
        if close:
            self._transport.close()
        elif ours:
            self._buffer = buffer[start:]
        else:
            self._hand_over(buffer[start:])

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def pause_writing(self) -> None:
        self._transport.pause_reading()
        self._reading_paused = True

    def resume_writing(self) -> None:
        self._transport.resume_reading()
        self._reading_paused = False

    # -- requests --------------------------------------------------------------------------

    def _respond(self, head: bytes) -> tuple[bytes, bool] | None:
        """(response bytes, keep the connection) when the front answers this request head, else None."""
        started = time.perf_counter()
        line_end = head.find(b"\r\n")
        request = _REQUEST_LINE.fullmatch(head, 0, len(head) if line_end < 0 else line_end)
        fields = b"" if line_end < 0 else head[line_end:]
        if request is None or not _HEADER_LINES.fullmatch(fields) or _NOT_OURS.search(fields):
            return None
        tags = _IF_NONE_MATCH.findall(fields)
        if len(tags) > 1:
            return None
        if_none_match = tags[0].decode("latin-1") if tags else None
        connection = b",".join(_CONNECTION.findall(fields)).lower()
        method, target, minor = request.group(1).decode(), request.group(2).decode(), request.group(3)
        answer = self._answer(method, target, if_none_match)
        if answer is None:
            return None
        status, header_lines, key = answer
        if minor == b"1":
            keep_alive = b"close" not in connection
            connection_line = b"" if keep_alive else _CLOSE
        else:  # HTTP/1.0 keeps a connection only when asked to, and is told so
            keep_alive = b"keep-alive" in connection
            connection_line = _KEEP_ALIVE if keep_alive else b""
        if self._access_log is not None:
            self._access_log.write(accesslog.line(
                handle=key, path=_path_of(target), method=method, outcome="HIT", status=status, body_bytes=0,
                seconds=time.perf_counter() - started, client=self._client))
        status_line = b"HTTP/1.%s %d %s\r\n" % (minor, status, _REASONS[status])
        return status_line + header_lines + _date_and_server() + connection_line + b"\r\n", keep_alive

    def _hand_over(self, unanswered: bytes) -> None:
        """aiohttp takes the connection from here on, starting with the bytes not yet answered."""
        self._forget()
        inner = self._fallback()
        self._transport.set_protocol(inner)
        inner.connection_made(self._transport)
        if self._reading_paused:
            self._transport.resume_reading()
        if unanswered:
            inner.data_received(unanswered)

    def _close_if_idle(self) -> None:
        idle = self._loop.time() - self._last_activity
        if idle >= KEEPALIVE_SECONDS:
            self._transport.close()
        else:
            self._idle_timer = self._loop.call_later(KEEPALIVE_SECONDS - idle, self._close_if_idle)

    def _forget(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._connections.discard(self._transport)


def encode_header_lines(headers: dict[str, str]) -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())


@functools.lru_cache(maxsize=4096)
def _path_of(target: str) -> str:
    """What the access log calls the path: decoded, without the query (never logged)."""
    return urllib.parse.unquote(target.split("?", 1)[0])


_date_cache: tuple[int, bytes] = (0, b"")


def _date_and_server() -> bytes:
    """The Date and Server lines, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, f"Date: {email.utils.formatdate(now, usegmt=True)}\r\nServer: {SERVER_SOFTWARE}\r\n"
                       .encode())
    return _date_cache[1]
