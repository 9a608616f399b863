"""Behind a load balancer (trusted_proxies): the client's own address, and the scheme and host it used,
read from X-Forwarded-For/-Proto/-Host, believed only when the connection's peer is a trusted proxy.

Invariants: from any other peer, and inside an intercepted tunnel (whose headers only the client wrote),
the headers are ignored; X-Forwarded-For is walked from the right past trusted addresses, and the first
untrusted one is the client, or, where the walk meets an element that is no IP address, the last one it
passed (the peer, if none); any other value that does not parse (a proto other than http or https, a
host that is no host[:port], several values where the proxy sets one) is ignored; none is an error; the
request is never cloned (aiohttp's access log sees the original), so `client` and `base_url` read what
the middleware left on it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from .intercept import tunnel_host

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Public:
    """What the client used, as its trusted proxies tell it."""
    client: str
    scheme: str
    host: str


PUBLIC = web.RequestKey("hubproxy.public", Public)


def middleware(networks: tuple[Network, ...]):
    """An aiohttp middleware believing X-Forwarded-* from peers in `networks`."""

    @web.middleware
    async def believe_trusted_proxies(request: web.Request, handler) -> web.StreamResponse:
        peer = _address(request.remote or "")
        if peer is not None and _trusted(peer, networks) and tunnel_host(request.transport) is None:
            request[PUBLIC] = _public(request, networks)
        return await handler(request)

    return believe_trusted_proxies


def client(request: web.BaseRequest) -> str | None:
    """The client's address: its trusted proxies' word for it, else the connection's peer."""
    public = request.get(PUBLIC)
    return request.remote if public is None else public.client


def base_url(request: web.Request) -> str:
    """scheme://host[:port] as the client reached the mirror (through its trusted proxies)."""
    public = request.get(PUBLIC)
    return f"{request.scheme}://{request.host}" if public is None else f"{public.scheme}://{public.host}"


def _public(request: web.Request, networks: tuple[Network, ...]) -> Public:
    headers = request.headers
    scheme = _one(headers.getall("X-Forwarded-Proto", ()))
    host = _one(headers.getall("X-Forwarded-Host", ()))
    return Public(client=_client(_items(headers.getall("X-Forwarded-For", ())), request.remote, networks),
                  scheme=scheme.lower() if scheme and scheme.lower() in _SCHEMES else request.scheme,
                  host=host if host and _HOST.fullmatch(host) else request.host)


def _client(hops: list[str], peer: str, networks: tuple[Network, ...]) -> str:
    """The right-most address not in networks; where a hop does not parse, the last one that did."""
    found = peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        found = str(address)
        if not _trusted(address, networks):
            break
    return found


def _items(values: Iterable[str]) -> list[str]:
    """An HTTP list's elements across its field lines, empty elements dropped (RFC 9110, 5.6.1)."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _one(values: Iterable[str]) -> str | None:
    """The single value a proxy sets; None for none or several (appended: no telling whose is whose)."""
    items = _items(values)
    return items[0] if len(items) == 1 else None


def _address(text: str) -> Address | None:
    """An IP address, with or without a port ("192.0.2.1:80", "[2001:db8::1]:80"); IPv4-mapped as IPv4."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _trusted(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)
