"""Plain HTTP forwarding for the hosts the operator allowed with --tunnel: an absolute-form request
(HTTP_PROXY) for such a host is sent on and its answer streamed back, the HTTP twin of the plain
CONNECT tunnel.

Invariants: only an http:// target whose host (not a hub host) --tunnel allows is forwarded
(intercept.tunnel_dial), on any port, as CONNECT allows; nothing is cached or read from the cache,
no redirect is followed, no cookie kept, no body decoded; hop-by-hop headers (RFC 9110 7.6.1: Connection and
the fields it names, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade) are dropped both
ways and Via added; a body cut upstream, or silent for read_timeout_seconds, is cut for the client;
an upstream that cannot be reached is a 502, one whose answer's headers are later than
upstream_headers_deadline after the whole request was sent on a 504, each a one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Self

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import Settings
from ..handles import HUB_HOSTS
from ..metrics import Metrics
from . import wire
from .accesslog import BODY_BYTES_KEY
from .components import METRICS, SETTINGS
from .intercept import tunnel_dial
from .replies import error

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade"))
VIA = "1.1 hubproxy"
CONNECT_SECONDS = 30.0  # as for a CONNECT tunnel
# What aiohttp's client would add of its own: a forwarded request carries the client's, or none.
_NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def absolute_target(request: web.Request) -> URL | None:
    """The URL an absolute-form request target names, scheme included, as the client sent it (aiohttp's
    request.url takes its scheme from the connection, so https://... on a plain one reads as http://);
    None for an origin-form target, or one that does not parse."""
    if request.raw_path.startswith("/"):
        return None
    try:
        return URL(request.raw_path, encoded=True)
    except ValueError:
        return None


def forwarded_url(request: web.Request) -> URL | None:
    """The URL an absolute-form request names, when it is one to forward: http://, not a hub host,
    a host --tunnel allows (an address written canonically)."""
    settings = request.app[SETTINGS]
    url = absolute_target(request) if settings.intercept and settings.tunnel else None
    if url is None:
        return None
    host = (url.host or "").lower().rstrip(".")
    dial = None if url.scheme != "http" or host in HUB_HOSTS else tunnel_dial(settings.tunnel, host)
    if dial is None:
        return None
    return url if dial == host else url.with_host(dial)  # an address, as aiohttp takes it: canonical


class Forwarder:
    """The client side of forwarding: its own aiohttp session (no cookie jar, no proxy from the
    environment, bodies as they are), apart from Upstream's, whose host policy it must not widen."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self._headers_deadline = settings.upstream_headers_deadline_seconds or None
        self._read_timeout = settings.read_timeout_seconds
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            trust_env=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_SECONDS,
                                                           sock_read=self._read_timeout),
            skip_auto_headers=_NOT_ADDED)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._session.close()

    async def forward(self, request: web.Request, url: URL) -> web.StreamResponse:
        if url.raw_user is not None:
            self._metrics.proxy_requests.labels("refused").inc()
            return error(400, "an absolute-form target with user information is not forwarded; send the "
                              "credentials in a header")
        self._metrics.proxy_requests.labels("tunnelled").inc()
        where = f"{url.host}:{url.port}"
        try:
            async with asyncio.timeout(None) as deadline:
                answer = await self._session.request(
                    request.method, url, headers=end_to_end(request.headers, "Host"), allow_redirects=False,
                    data=self._upload(request, deadline))
        except (aiohttp.ClientError, OSError) as e:  # TimeoutError is an OSError
            if deadline.expired():
                return error(504, f"{where} did not answer within {self._headers_deadline:g}s of the request "
                                  "(upstream_headers_deadline)")
            if isinstance(e, aiohttp.SocketTimeoutError):
                return error(504, f"{where} sent nothing for {self._read_timeout:g}s (read_timeout_seconds)")
            return error(502, f"forwarding to {where} failed: {type(e).__name__}")
        with contextlib.closing(answer):
            return await _stream(request, answer, where)

    def _upload(self, request: web.Request, deadline: asyncio.Timeout) -> AsyncIterator[bytes] | None:
        """The client's body, to send on; the headers deadline starts once it has all been sent (now,
        when there is none), so that a slow or large upload is not taken for a late answer."""

        def sent() -> None:
            if self._headers_deadline is not None:
                with contextlib.suppress(RuntimeError):  # the answer came first: there is no deadline left to start
                    deadline.reschedule(asyncio.get_running_loop().time() + self._headers_deadline)

        if not request.body_exists:
            sent()
            return None
        return _then(request.content, sent)


async def _then(body: aiohttp.StreamReader, sent: Callable[[], None]) -> AsyncIterator[bytes]:
    """body's pieces as they arrive; sent() once the last has been handed on."""
    async for piece in body.iter_any():
        yield piece
    sent()


async def _stream(request: web.Request, answer: aiohttp.ClientResponse, where: str) -> web.StreamResponse:
    response = web.StreamResponse(status=answer.status, headers=end_to_end(answer.headers))  # the standard phrase
    request[BODY_BYTES_KEY] = 0
    try:
        await response.prepare(request)
        async for piece in answer.content.iter_any():
            await response.write(piece)
            request[BODY_BYTES_KEY] += len(piece)
        await response.write_eof()
    except (aiohttp.ClientError, TimeoutError) as e:
        why = "it fell silent (read_timeout_seconds)" if isinstance(e, aiohttp.SocketTimeoutError) else "it broke off"
        log.info("cutting a forwarded answer from %s short: %s (%s)", where, why, type(e).__name__)
        wire.cut(request)
    except ConnectionError:
        pass  # the client left
    return response


def end_to_end(headers: CIMultiDictProxy[str], *also_dropped: str) -> CIMultiDict[str]:
    """The fields a proxy passes on (every one, repeated ones too), with its Via added."""
    named = {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")}
    dropped = HOP_BY_HOP | named | {name.lower() for name in also_dropped}
    kept = CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in dropped)
    kept.add("Via", VIA)
    return kept


FORWARDER = web.AppKey("forwarder", Forwarder)


async def forwarder_context(app: web.Application):
    """The app's Forwarder while it serves, when the operator allowed tunnels."""
    settings = app[SETTINGS]
    if not (settings.intercept and settings.tunnel):
        yield
        return
    async with Forwarder(settings, app[METRICS]) as forwarder:
        app[FORWARDER] = forwarder
        yield
