"""The commonest request there is, answered at accept without aiohttp: tensorflow_hub's (urllib's)
GET of a cached archive, whole, as the only request of a new connection. Everything else is
declined, and aiohttp answers it as before.

Invariants: a connection is answered here only when its first bytes hold a whole head that is
`GET <target> HTTP/1.1` with no field but PLAIN_FIELDS (each at most once, printable ASCII),
Connection: close among them, a target that is a hub handle (never one of the mirror's own
routes) cached now, and a connection table with room (a drain closes the door as it begins, so
no quick answer starts during one); nothing here waits on the socket, which the door hands over
still blocking; a declined connection has had nothing read from it; the response is byte for
byte the head aiohttp's path sends (hits.py's headers, then Date, Server, Connection: close) and
the blob's bytes, counted, logged and kept from eviction alike
(tests/test_quick_hits_match_the_full_path.py holds both paths to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import re
import socket
import time
from typing import BinaryIO

from aiohttp import web

from ..cache.store import BareBlob, Entry
from ..handles import FILES_PATH, BadHandle, parse_request_target
from . import accesslog, wire
from .components import METRICS, SERVING, STORE
from .front import Table
from .hits import being_sent, body_headers, count_hit, validators
from .kagglebody import SERVICE_PATH
from .replies import HIT

MAX_HEAD = 8190  # aiohttp's limit on a request line or field (max_field_size); a longer head is aiohttp's
PLAIN_FIELDS = frozenset((b"host", b"user-agent", b"accept", b"accept-encoding", b"connection"))
_REQUEST_LINE = re.compile(rb"GET (/[!-~]*) HTTP/1\.1\r\n")
_FIELD = re.compile(rb"([A-Za-z-]+):[ \t]*([!-~](?:[ -~]*[!-~])?)?[ \t]*")
_NOT_HUB = ("/admin/", FILES_PATH + "/", SERVICE_PATH)  # hub() never answers these (app.py routes them)


@functools.lru_cache(maxsize=256)  # a client's requests for one archive are the same bytes each time
def plain_close_get(data: bytes) -> tuple[str, int] | None:
    """(target, length of the head) when data starts with a whole head of a plain GET that closes
    the connection after its response; None for anything else."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
    first = _REQUEST_LINE.match(data, 0, end + 2) if end >= 0 else None
    if first is None:
        return None
    seen = set()
    for field in data[first.end():end].split(b"\r\n") if end > first.end() else ():
        parsed = _FIELD.fullmatch(field)
        name = parsed and parsed.group(1).lower()
        if name not in PLAIN_FIELDS or name in seen:
            return None
        seen.add(name)
        if name == b"connection" and (parsed.group(2) or b"").lower() != b"close":
            return None
    if b"connection" not in seen:
        return None
    return first.group(1).decode("ascii"), end + 4


@functools.lru_cache(maxsize=4096)
def hub_key(target: str) -> str | None:
    """The cache key a target asks for, when hub() would answer it; else None."""
    if target.startswith(_NOT_HUB):
        return None
    try:
        return parse_request_target(target).key
    except BadHandle:
        return None


class QuickHits:
    """Door's `quick`: answers a plain close-after GET of a cached archive, or declines."""

    def __init__(self, app: web.Application, table: Table, access_log: accesslog.AccessLog):
        self._app, self._table, self._access_log = app, table, access_log
        self._date = _HttpDate()
        self._store = app[STORE]

    def __call__(self, conn: socket.socket, peer: tuple) -> bool:
        started = time.monotonic()
        found = self._cached_archive_asked(conn)
        if found is None:
            return False
        target, head_length, entry, bare = found
        sending = _Sending(conn)
        if not self._table.admit(sending):
            bare.close()
            return False  # aiohttp's path answers the 503
        self._table.busy(sending)
        unsent, blob = self._send_first(conn, entry, bare)
        conn.setblocking(False)
        with contextlib.suppress(OSError):  # a reset: the sending finds out
            conn.recv(head_length)  # the head, peeked whole before (read now, after the answer's start)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the body's last segment goes at once
        # The first bytes are on their way; the rest of the bookkeeping runs before the loop does
        # again, so no eviction can come between the open and the blob counting as busy.
        held = contextlib.ExitStack()  # until the send ends: the blob open, and busy (never evicted)
        held.enter_context(blob)
        held.enter_context(being_sent(self._app[SERVING], entry.sha256))
        count_hit(self._app, entry)
        sending.task = asyncio.get_running_loop().create_task(
            self._send(sending, held, blob, entry, unsent, target.partition("?")[0], peer, started))
        return True

    def _cached_archive_asked(self, conn: socket.socket) -> tuple[str, int, Entry, BareBlob] | None:
        """(target, head length, entry, its blob open bare) when the connection's first bytes are a
        plain close-after GET of a cached archive; None, having read nothing."""
        try:
            asked = plain_close_get(conn.recv(MAX_HEAD + 4, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return None
        key = hub_key(asked[0]) if asked else None
        entry = self._store.lookup(key) if key else None
        bare = self._store.open_bare_blob(entry) if entry else None
        if bare is None:
            return None  # aiohttp's path answers, and forgets an entry whose blob is gone
        return asked[0], asked[1], entry, bare

    def _send_first(self, conn: socket.socket, entry: Entry, bare: BareBlob) -> tuple[bytes | None, BinaryIO]:
        """Send the head and first bytes without waiting: (what the socket did not take, or None when
        the blob could not be read; the blob as a file, positioned after them)."""
        try:
            body = bare.read_start(min(entry.size, wire.FIRST_BYTES))
        except OSError:  # the disk's trouble: the sending ends at once
            return None, bare.as_file(0)
        first = self._head(entry) + body
        unsent = first[_send_now(conn, first):]
        return unsent, bare.as_file(len(body))

    def _head(self, entry: Entry) -> bytes:
        return _head_before_date(entry) + self._date.now() + _HEAD_AFTER_DATE

    async def _send(self, sending: _Sending, held: contextlib.ExitStack, blob: BinaryIO, entry: Entry,
                    unsent: bytes | None, path: str, peer: tuple, started: float) -> None:
        """The rest of the response after what _send_now sent: `unsent`, then the blob from its
        current position (past the first bytes read); unsent None: the head could not be made, and
        the connection closes without an answer."""
        sent = 0
        try:
            with held:
                if unsent is None:
                    raise EOFError("no head to send")
                await _send_rest(sending.conn, unsent, blob, entry.size)
            sent = entry.size
            self._app[METRICS].cache_bytes_served.inc(sent)
        except (OSError, EOFError):
            pass  # the client left, or the blob was cut short: either way the body ends incomplete
        finally:
            sending.conn.close()
            sending.task = None  # no cycle through this task's frame once it ends
            self._table.leave(sending)
            if self._access_log.enabled:
                self._access_log.write(accesslog.line(
                    handle=entry.key, path=path, method="GET", outcome=HIT, status=200, body_bytes=sent,
                    seconds=time.monotonic() - started, client=peer[0]))


_HEAD_AFTER_DATE = b"\r\nServer: hubproxy\r\nConnection: close\r\n\r\n"  # as aiohttp ends a head


@functools.lru_cache(maxsize=1024)
def _head_before_date(entry: Entry) -> bytes:
    """The head of a whole archive's 200 up to the Date's value: the same for every answer of an entry."""
    fields = {**validators(entry, HIT), **body_headers(entry, entry.size)}
    return ("HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "Date: ").encode()


def _send_now(conn: socket.socket, data: bytes) -> int:
    """Send what the socket takes without waiting (the head and first bytes: one segment, before
    the loop runs again); how many bytes it took."""
    try:
        return conn.send(data, socket.MSG_DONTWAIT)
    except OSError:  # full, or the client left: the rest of the sending finds out which
        return 0


async def _send_rest(conn: socket.socket, unsent: bytes, blob: BinaryIO, size: int) -> None:
    loop = asyncio.get_running_loop()
    if unsent:
        await loop.sock_sendall(conn, unsent)
    offset = blob.tell()
    if size > offset and await loop.sock_sendfile(conn, blob, offset, size - offset) < size - offset:
        raise EOFError("the blob ended early")


class _Sending:
    """A quick answer as the connection table sees it: busy until it ends, and cut by abort()."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.task: asyncio.Task | None = None

    def drain(self) -> bool:
        return False  # busy: it closes when its response is sent

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()

    close = abort  # the table closes only idle connections, which this never is


class _HttpDate:
    """The Date field's value, formatted once a second as aiohttp does."""

    def __init__(self) -> None:
        self._second, self._text = -1, b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second, self._text = second, email.utils.formatdate(second, usegmt=True).encode()
        return self._text
