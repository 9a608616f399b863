"""Where the process is in its life, as /readyz tells a load balancer: starting (components not up
yet), serving, or draining (a stop signal arrived; see drain.py).

Invariants: readiness is lifecycle only (a cache that refuses writes still serves, passing misses
through: that is /metrics' business, not a reason to leave the pool); once draining, never ready
again; every response prepared while draining says Connection: close, so no connection outlives
the request it is answering.
"""

from __future__ import annotations

from aiohttp import hdrs, web


class Lifecycle:
    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.reason = "starting: the cache and the upstream client are not up yet"

    def serving(self) -> None:
        if not self.draining:
            self.ready, self.reason = True, "ready"

    def drain(self, why: str) -> None:
        self.ready, self.draining = False, True
        self.reason = f"draining: {why}; new connections are refused"


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    return web.Response(status=200 if lifecycle.ready else 503, text=lifecycle.reason + "\n")


async def close_after_response_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: while draining, the connection closes after this response, and the
    response says so (aiohttp has set its Connection header by the time this runs)."""
    if request.app[LIFECYCLE].draining:
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"
