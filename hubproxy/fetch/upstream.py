"""Upstream fetches: follow tfhub.dev → Kaggle → signed GCS redirects by hand, with retries; and
single JSON calls (kagglehub's RPCs) answered as they are.

Invariants: no request ever goes to a host that is neither a configured upstream nor on the
redirect allowlist (checked before each hop, https never downgraded); every URL is parsed once,
by yarl, and the object checked is the object fetched (a Location that does not parse, or that
carries userinfo, is a 502); bodies are never decompressed and only identity is asked for;
signed URLs (their query strings) and a caller's Authorization never appear in errors or logs;
waiting for an answer's headers has one deadline, redirects, retries and their waits included (a
504 after it); a POST first hop is followed by GETs (its 301/302/303 redirects, as browsers do),
so its JSON body is sent to the first host only, and Authorization only ever by `call`; with
parents (configured, so allowed hosts), a request for the first one's URL goes to the next one when a
parent is down, and never to the upstreams; with an egress proxy every hop but a parent's is dialled
through it, after the same checks (fetch/egress).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import aiohttp
from yarl import URL

from ..config import Settings
from ..handles import strip_query
from .egress import PROXY_AUTHENTICATION_REQUIRED, EgressProxy
from .errors import FetchFailed
from .media_type import safe_media_type

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a JSON answer larger than this is no metadata we keep
MAX_RETRY_AFTER_SECONDS = 30.0
_REDIRECTS = {301, 302, 303, 307, 308}
_RETRYABLE = {429, 500, 502, 503, 504}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_AUTHORITY = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:)?//([^/?#]*)")  # RFC 3986, appendix B
T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """An upstream's answer to one call, whatever its status; `location` only for a redirect."""
    status: int
    body: bytes
    content_type: str
    location: str | None


class HostPolicy:
    """Which hosts we may talk to: the configured upstreams plus the redirect allowlist. It judges
    yarl URLs, the very objects then handed to aiohttp, so what is checked is what is fetched."""

    def __init__(self, settings: Settings):
        self._allowed: set[tuple[str, int | None]] = set()
        for url in (*settings.upstreams.values(), *settings.parents):  # parents are configuration too
            parsed = URL(url)
            self._allowed.add((parsed.host or "", parsed.port))
        for entry in settings.allow_redirect_hosts:
            host, _, port = entry.lower().partition(":")
            self._allowed.add((host, int(port) if port else None))

    def check(self, url: URL, previous: URL | None = None) -> None:
        if url.scheme not in _DEFAULT_PORTS:
            raise FetchFailed(502, f"upstream redirected to a non-http URL scheme {url.scheme!r}")
        if previous is not None and previous.scheme == "https" and url.scheme != "https":
            raise FetchFailed(502, f"upstream redirected from https to plain http ({_shown(url)})")
        if not url.host:
            raise FetchFailed(502, f"upstream redirected to a URL without a host ({_shown(url)})")
        host, port = url.host.lower(), url.port
        default_port = port == _DEFAULT_PORTS[url.scheme]
        if (host, port) in self._allowed or (default_port and (host, None) in self._allowed):
            return
        raise FetchFailed(502, f"upstream redirected to {url.raw_authority!r}, which is not an allowed host")


# A Location already percent-encoded as RFC 3986 allows is fetched byte for byte: a signed storage
# URL's signature covers its exact query (%2F, %40), which yarl would otherwise decode.
_URI = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


def redirect_target(current: URL, location: str) -> URL:
    """The URL a redirect's Location names, resolved against the hop that sent it: parsed once, by
    yarl, as aiohttp will fetch it. FetchFailed(502) when yarl cannot parse it (a bad port or host, a
    backslash in the authority, which other parsers read otherwise) or it carries userinfo, which
    no storage redirect needs and which parsers have disagreed on."""
    authority = _AUTHORITY.match(location)
    if authority and "@" in authority.group(1):
        raise FetchFailed(502, f"upstream redirected to a URL with userinfo ({_shown(location)}); refused")
    try:
        location.encode()  # undecodable bytes (kept as surrogates) yarl would silently drop
        target = _checked(current.join(_verbatim(location)))
    except (ValueError, TypeError) as e:
        raise FetchFailed(502, f"upstream redirected to an unparseable URL ({_shown(location)}): {e}") from None
    return target


def _verbatim(text: str) -> URL:
    """text as yarl's URL, keeping its bytes when it is already percent-encoded as RFC 3986 allows."""
    return URL(text, encoded=_URI.fullmatch(text) is not None)


def _checked(url: URL) -> URL:
    url.host, url.port  # noqa: B018 — an encoded URL's authority is parsed lazily: parse it now
    return url


def _own_url(url: str) -> URL:
    """A URL of our own making (a configured upstream's, a relayed target), parsed as for a redirect."""
    try:
        return _checked(_verbatim(url))
    except (ValueError, TypeError) as e:
        raise FetchFailed(502, f"cannot parse the upstream URL {_shown(url)}: {e}") from None


def _shown(url: URL | str) -> str:
    """A URL fit for a one-line message: no query (signatures), no userinfo, bounded, escaped."""
    text = str(url).split("?", 1)[0].split("#", 1)[0]
    authority = _AUTHORITY.match(text)
    if authority and "@" in authority.group(1):
        text = text[:authority.start(1)] + "...@" + text[authority.start(1):].split("@", 1)[1]
    return ascii(text[:200])[1:-1] + ("..." if len(text) > 200 else "")


class Upstream:
    """An aiohttp client that yields a 200 response for a handle's URL, or raises FetchFailed.
    Use it as `async with Upstream(settings) as upstream:`."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._policy = HostPolicy(settings)
        self._egress = EgressProxy.from_settings(settings)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Upstream":
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._settings.connect_timeout_seconds,
            sock_read=self._settings.read_timeout_seconds,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout, auto_decompress=False, trust_env=False,
            headers={"User-Agent": "hubproxy", "Accept-Encoding": "identity"},
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._session.close()

    @property
    def settings(self) -> Settings:
        return self._settings

    async def open(self, url: str, method: str = "GET", json: dict | None = None) -> aiohttp.ClientResponse:
        """Follow the redirect chain to a 200, retrying transient trouble; caller closes it. With
        `json`, the first hop is a POST of it (kagglehub's DownloadModelInstanceVersion)."""
        return await self._via_parents(url, lambda url: self._retrying(
            url, lambda: self._follow(url, "POST" if json is not None else method, json)))

    async def get_resumed(self, url: str, headers: dict) -> aiohttp.ClientResponse:
        """A GET of url (a resume: its Range and If-Match in headers), retrying transient trouble as
        open does; any other status is returned as it is, no redirect followed; caller closes."""
        return await self._retrying(url, lambda: self._get_once(url, headers))

    async def relocate(self, url: str, final: str, json: dict | None = None) -> str:
        """Follow url's chain again (as open does) to its redirect to `final`, a URL without its
        query: that URL, freshly signed, not yet requested; FetchFailed when the chain leads elsewhere."""
        return await self._retrying(url, lambda: self._follow(url, "POST" if json is not None else "GET", json,
                                                              until=final))

    async def call(self, url: str, json: dict, authorization: str | None = None) -> Answer:
        """POST `json` to url once (retrying transient trouble: connection errors, 429, 5xx) and
        return the answer as it is, any status, no redirect followed; raises FetchFailed when
        upstream cannot be reached or keeps failing."""
        headers = {} if authorization is None else {"Authorization": authorization}
        return await self._via_parents(url, lambda url: self._retrying(
            url, lambda: self._call_once(url, json, headers)))

    def is_parent(self, url: URL) -> bool:
        """Whether url is on one of the configured parent hubproxies."""
        return any(url.origin() == URL(parent).origin() for parent in self._settings.parents)

    async def _via_parents(self, url: str, attempt: Callable[[str], Awaitable[T]]) -> T:
        """attempt(url); when url is the first parent's and that parent is down (unreachable, 5xx,
        no answer in time), attempt the same path at each next parent in turn. A 404 is an answer."""
        parents = [p.rstrip("/") for p in self._settings.parents]
        if not parents or not url.startswith(parents[0] + "/"):
            return await attempt(url)
        tail = url[len(parents[0]):]
        for number, parent in enumerate(parents, 1):
            try:
                return await attempt(parent + tail)
            except FetchFailed as e:
                if e.status not in (502, 503, 504) or number == len(parents):
                    raise
                log.warning("parent %s is down, trying the next: %s", parent, e.message)
        raise AssertionError("unreachable")

    async def get_as_is(self, url: str, headers: dict) -> aiohttp.ClientResponse:
        """One GET of url as it is (its query kept), answered with any status, no redirect
        followed, nothing retried (a relayed request); caller closes it."""
        parsed = _own_url(url)
        self._policy.check(parsed)
        try:
            return await self._request("GET", parsed, headers=headers)
        except _Transient as trouble:
            raise FetchFailed(trouble.status, trouble.message) from None

    async def _retrying(self, url: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """attempt_once, retried on transient trouble, all within the headers deadline."""
        seconds = self._settings.upstream_headers_deadline_seconds
        deadline = asyncio.timeout(seconds or None)
        try:
            async with deadline:
                return await self._attempts(attempt_once)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise FetchFailed(504, f"upstream {strip_query(url)} gave no answer within {seconds:g}s "
                                   "(redirects and retries included)") from None

    async def _attempts(self, attempt_once: Callable[[], Awaitable[T]]) -> T:
        attempts = self._settings.retries + 1
        delay = self._settings.backoff_seconds
        for attempt in range(1, attempts + 1):
            try:
                return await attempt_once()
            except _Transient as trouble:
                if attempt == attempts:
                    raise FetchFailed(trouble.status, f"{trouble.message} (after {attempts} attempts)") from None
                wait = min(trouble.retry_after or delay, MAX_RETRY_AFTER_SECONDS)
                log.warning("upstream trouble, retrying in %.2fs: %s", wait, trouble.message)
                await asyncio.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    async def _follow(self, url: str, method: str, json: dict | None, until: str | None = None):
        """The 200 response at the chain's end; with `until`, the URL of the hop it names instead."""
        assert self._session is not None, "use Upstream as an async context manager"
        previous, url = None, _own_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            self._policy.check(url, previous)
            if until is not None and previous is not None and strip_query(str(url)) == until:
                return str(url)
            response = await self._request(method, url, json=json)
            if response.status in _REDIRECTS and "Location" in response.headers:
                response.release()
                previous, url = url, redirect_target(url, response.headers["Location"])
                if method == "POST" and response.status in (301, 302, 303):
                    method, json = "GET", None  # as browsers do; a HEAD stays a HEAD all the way
                continue
            if response.status == 200 and until is not None:
                response.release()
                raise FetchFailed(502, f"upstream {_shown(url)} no longer redirects to {until}")
            if response.status == 200:
                return response
            raise _status_error(response, url)
        raise FetchFailed(502, f"upstream redirected more than {MAX_REDIRECTS} times")

    async def _get_once(self, url: str, headers: dict) -> aiohttp.ClientResponse:
        parsed = _own_url(url)
        self._policy.check(parsed)
        response = await self._request("GET", parsed, headers=headers)
        if response.status in _RETRYABLE:
            raise _status_error(response, url)
        return response

    async def _call_once(self, url: str, json: dict, headers: dict) -> Answer:
        parsed = _own_url(url)
        self._policy.check(parsed)
        response = await self._request("POST", parsed, json=json, headers=headers)
        try:
            if response.status in _RETRYABLE:
                raise _status_error(response, url)
            body = await _capped_body(response, url)
            location = response.headers.get("Location") if response.status in _REDIRECTS else None
            return Answer(response.status, body, safe_media_type(response.headers.get("Content-Type"), default=""),
                          location)
        finally:
            response.release()

    async def _request(self, method: str, url: URL, json: dict | None = None,
                       headers: dict | None = None) -> aiohttp.ClientResponse:
        """One request to url (already checked), through the egress proxy unless url is a parent's."""
        proxy = None if self._egress is None or self.is_parent(url) else self._egress
        where, via = strip_query(str(url)), "" if proxy is None else proxy.via()
        try:
            response = await self._session.request(method, url, allow_redirects=False, json=json, headers=headers,
                                                   proxy=None if proxy is None else proxy.url)
        except asyncio.TimeoutError:
            raise _Transient(504, f"upstream {where} timed out{via}") from None
        except aiohttp.ClientError as e:
            failure = None if proxy is None else proxy.failure(e, where)
            if failure is not None:
                raise _proxy_error(*failure) from None
            raise _Transient(502, f"cannot reach upstream {where}: {type(e).__name__}{via}") from None
        if proxy is not None and response.status == PROXY_AUTHENTICATION_REQUIRED:  # a plain-http hop's answer
            response.release()
            raise _proxy_error(*proxy.refusal(response.status, response.reason or "", where))
        return response


async def _capped_body(response: aiohttp.ClientResponse, url: URL) -> bytes:
    body = bytearray()
    try:
        async for piece in response.content.iter_chunked(64 * 1024):
            body += piece
            if len(body) > MAX_ANSWER_BYTES:
                raise FetchFailed(502, f"upstream {strip_query(str(url))} answered more than {MAX_ANSWER_BYTES} bytes")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise _Transient(502, f"upstream {strip_query(str(url))} broke off its answer: {type(e).__name__}") from None
    return bytes(body)


def _proxy_error(status: int, message: str, transient: bool) -> Exception:
    return _Transient(status, message) if transient else FetchFailed(status, message)


class _Transient(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def _status_error(response: aiohttp.ClientResponse, url: URL) -> Exception:
    status, reason, where = response.status, response.reason or "", strip_query(str(url))
    response.release()
    if status in _RETRYABLE:
        retry_after = response.headers.get("Retry-After", "")
        wait = float(retry_after) if retry_after.isdigit() else None
        return _Transient(502, f"upstream {where} answered {status} {reason}".strip(), wait)
    if status in (404, 410):
        return FetchFailed(404, f"not found upstream: {where} answered {status} {reason}".strip())
    return FetchFailed(502, f"upstream {where} refused: {status} {reason}".strip())
