"""The egress proxy (egress_proxy): the forward proxy a network's traffic must leave through, which
every upstream hop is dialled through; parents, being internal, are dialled directly.

Invariants: the proxy's credentials travel only inside the URL handed to aiohttp (which sends them
as Proxy-Authorization: on the request for http targets, on the CONNECT for https ones) and reach
no message, log line or metric: the proxy is `shown` as scheme://host:port; which hosts may be
reached is decided by HostPolicy before the proxy is asked, so it never widens what is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from yarl import URL

from ..config import Settings

PROXY_AUTHENTICATION_REQUIRED = 407


@dataclass(frozen=True)
class EgressProxy:
    url: URL  # credentials included: for aiohttp only
    shown: str  # for messages: no credentials

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressProxy | None:
        if settings.egress_proxy is None:
            return None
        url = URL(settings.egress_proxy)
        return cls(url=url, shown=f"{url.scheme}://{url.host_port_subcomponent}")

    def via(self) -> str:
        """What a message about a hop through this proxy adds."""
        return f" (through the egress proxy {self.shown})"

    def failure(self, error: aiohttp.ClientError, target: str) -> tuple[int, str, bool] | None:
        """(status, message, worth retrying) when error is the proxy's own doing, else None."""
        if isinstance(error, aiohttp.ClientProxyConnectionError):
            return 502, f"cannot reach the egress proxy {self.shown} ({type(error).__name__}) for {target}", True
        if isinstance(error, aiohttp.ClientHttpProxyError):
            return self.refusal(error.status, error.message, target)
        return None

    def refusal(self, status: int, reason: str, target: str) -> tuple[int, str, bool]:
        """The proxy answered `status` instead of reaching target: to a CONNECT (any status), or a 407 to a
        plain-http request (the only status there that cannot be the origin's; some proxies say 401)."""
        hint = " (check the credentials in egress_proxy)" if status in (401, PROXY_AUTHENTICATION_REQUIRED) else ""
        message = f"the egress proxy {self.shown} refused to reach {target}: {status} {ascii(reason[:80])[1:-1]}"
        return 502, message.rstrip() + hint, status >= 500
