"""The forward-proxy door (HTTPS_PROXY): a CONNECT to a hub host is answered 200 and terminated
with TLS under a leaf from our CA, and the requests inside are served by the same aiohttp app as
mirror requests; a CONNECT to a host the operator listed with --tunnel is a plain byte tunnel.

Invariants: only a connection whose first bytes spell "CONNECT " is held here, and only until its
request head ends; every other connection goes to aiohttp with every byte, at once. A CONNECT to
any other host gets 403 and nothing is dialled; the head has a size limit here, and the deadline
every head has (front.Connection), which bytes cannot extend. A --tunnel address or network admits
only addresses (in any spelling the resolver reads as one), a glob only names. This module parses
a CONNECT request line and nothing else of HTTP.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import ipaddress
import logging
import re
import socket
import ssl
import weakref
from typing import Callable

from ..handles import HUB_HOSTS
from ..metrics import Metrics
from .front import Connection

log = logging.getLogger(__name__)

CONNECT = b"CONNECT "
MAX_HEAD = 8192
TLS_HANDSHAKE_SECONDS = 30.0
TUNNEL_CONNECT_SECONDS = 30.0
_REQUEST_LINE = re.compile(rb"CONNECT ([A-Za-z0-9.-]{1,253}):([0-9]{1,5}) HTTP/1\.[01]")
_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_INET_ATON_SHAPE = re.compile(r"[0-9A-Fa-fXx.]{1,64}")

# The hub host each intercepted connection's TLS transport serves (see tunnel_host).
_TUNNEL_HOSTS: weakref.WeakKeyDictionary[asyncio.Transport, str] = weakref.WeakKeyDictionary()


def tunnel_host(transport: asyncio.Transport | None) -> str | None:
    """The hub host whose CONNECT this request's connection (request.transport) came through;
    None for a plain connection to the mirror."""
    return None if transport is None else _TUNNEL_HOSTS.get(transport)


class Doors:
    """What the front needs: aiohttp's protocol factory, TLS contexts for hub hosts, the tunnel
    allowlist and the metrics that count refusals and tunnels."""

    def __init__(self, http: Callable[[], asyncio.Protocol], tls_for: Callable[[str], ssl.SSLContext],
                 tunnel: tuple[str, ...], metrics: Metrics):
        self.http = http
        self.tls_for = tls_for
        self.tunnel = tunnel
        self.metrics = metrics


def tunnel_dial(tunnel: tuple[str, ...], host: str) -> str | None:
    """What to dial for `host` (lower case, no trailing dot) when the operator allowed it with --tunnel
    (any port), else None: an address, written canonically, when a network entry holds it; a name when
    a glob matches it (never the other way)."""
    networks, globs = _entries(tunnel)
    address = ip_literal(host)
    if address is not None:
        return str(address) if any(address in network for network in networks) else None
    return host if any(fnmatch.fnmatchcase(host, glob) for glob in globs) else None


@functools.cache
def _entries(tunnel: tuple[str, ...]) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                                               tuple[str, ...]]:
    """--tunnel's (networks, lower-case globs); config has refused globs that look like addresses."""
    networks, globs = [], []
    for entry in tunnel:
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError:
            globs.append(entry.lower())
    return tuple(networks), tuple(globs)


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` is, when the resolver would read it as one rather than look it up (127.1,
    2130706433 and 0x7f.1 are 127.0.0.1), an IPv4-mapped one as IPv4; None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _INET_ATON_SHAPE.fullmatch(host):
            return None  # inet_aton also takes "127.0.0.1 and anything after a space"
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return getattr(address, "ipv4_mapped", None) or address


class ProxyFront(asyncio.Protocol):
    """The first protocol of every connection when intercepting (behind front.Connection, which
    keeps the head deadline): it holds the connection only while its first bytes may spell CONNECT."""

    def __init__(self, doors: Doors, connection: Connection):
        self._doors = doors
        self._connection = connection
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._buffer.startswith(CONNECT[:len(self._buffer)]):
            self._connection.hand_to(self._doors.http(), self._buffer)  # aiohttp, from the first byte
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._refuse(431, "the CONNECT request head is too large")
            return
        head, early = self._buffer[:end], self._buffer[end + 4:]
        self._transport.pause_reading()
        asyncio.ensure_future(self._connect(head, early))

    async def _connect(self, head: bytes, early: bytes) -> None:
        line = _REQUEST_LINE.fullmatch(head.split(b"\r\n", 1)[0])
        if line is None or b"\n" in head.replace(b"\r\n", b""):
            self._refuse(400, "malformed CONNECT request: expected CONNECT host:port HTTP/1.1 and CRLF lines")
            return
        host, port = line.group(1).decode().lower().rstrip("."), int(line.group(2))
        if host in HUB_HOSTS and port == 443:
            await self._intercept(host, early)
        elif (dial := tunnel_dial(self._doors.tunnel, host)) is not None:
            await self._tunnel(dial, port, early)
        else:
            self._doors.metrics.connects.labels("refused").inc()
            self._refuse(403, f"{host}:{port} is not a hub host; hubproxy intercepts only "
                              f"{', '.join(sorted(HUB_HOSTS))} and tunnels only what --tunnel allows")

    async def _intercept(self, host: str, early: bytes) -> None:
        if early:
            self._refuse(400, "bytes arrived before the 200 to the CONNECT; send TLS after it")
            return
        self._transport.write(_ESTABLISHED)
        try:
            tls = await self._connection.start_tls(self._doors.tls_for(host), self._doors.http(),
                                                   TLS_HANDSHAKE_SECONDS)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            log.info("TLS with a client for %s failed: %s", host, type(e).__name__)
            return
        self._doors.metrics.connects.labels("intercepted").inc()
        _TUNNEL_HOSTS[tls] = host

    async def _tunnel(self, host: str, port: int, early: bytes) -> None:
        loop = asyncio.get_running_loop()
        client = self._transport
        try:
            upstream, pipe = await asyncio.wait_for(
                loop.create_connection(lambda: _Pipe(client), host, port), TUNNEL_CONNECT_SECONDS)
        except (OSError, asyncio.TimeoutError) as e:
            self._refuse(502, f"cannot reach {host}:{port} for the tunnel: {type(e).__name__}")
            return
        self._doors.metrics.connects.labels("tunnelled").inc()
        client.write(_ESTABLISHED)
        if early:
            upstream.write(early)
        self._connection.hand_to(_Pipe(upstream), http=False)
        client.resume_reading()

    def _refuse(self, status: int, reason: str) -> None:
        phrase = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large", 502: "Bad Gateway"}
        self._connection.answer(status, phrase[status], reason)


class _Pipe(asyncio.Protocol):
    """One side of a plain tunnel: what arrives on this side is written to the other, and this
    side stops reading while the other cannot take more (backpressure both ways)."""

    def __init__(self, other: asyncio.Transport):
        self._other = other

    def data_received(self, data: bytes) -> None:
        self._other.write(data)

    def pause_writing(self) -> None:  # this side's buffer is full: stop reading the other side
        self._other.pause_reading()

    def resume_writing(self) -> None:
        self._other.resume_reading()

    def eof_received(self) -> bool:
        if self._other.can_write_eof():
            self._other.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._other.close()
