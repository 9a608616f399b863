"""The aiohttp application: its routes and the lifecycle of its components (store, upstream
client, flights, metadata, housekeeping), and the dispatch of a hub request to a hit or a flight;
a request on its way to api.kaggle.com goes to kagglehub's face (kaggle_api, kaggle_files), a
signed storage URL to the relay, an HTTP_PROXY request for a --tunnel host to forward.

Invariants: a request for a cached archive is a hit and never contacts upstream; in offline mode
nothing ever does; components open before the first request and close after the last, in
reverse order; this module asks handles and the store, and never builds a file path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from aiohttp import web, web_response

from ..cache.diskhealth import WriteHealth
from ..cache.housekeeping import Housekeeper
from ..cache.metadata import Metadata
from ..cache.store import Store
from ..config import Settings
from ..fetch.flights import Flights
from ..fetch.upstream import Upstream
from ..handles import FILES_PATH, GCS, HUB_HOSTS, KAGGLE_API, BadHandle, parse_request_target
from ..metrics import Metrics
from ..units import parse_size
from . import admin, browse, forward, forwarded, kaggle_api, kaggle_files, relay
from .accesslog import HANDLE_KEY
from .components import ANONYMITY, FLIGHTS, METADATA, METRICS, SERVING, SETTINGS, STORE, UPSTREAM
from .front import request_bounds
from .hits import range_problem, serve_if_cached
from .intercept import tunnel_host
from .kagglebody import SERVICE_PATH
from .kagglecreds import Anonymity
from .lifecycle import LIFECYCLE, Lifecycle, close_after_response_when_draining, readyz
from .misses import head_upstream, serve_flight, upstream_url
from .replies import MISS, X_CACHE, error

log = logging.getLogger(__name__)

SERVER = "hubproxy"


def create_app(settings: Settings) -> web.Application:
    behind_proxies = [forwarded.middleware(settings.trusted_networks)] if settings.trusted_proxies else []
    app = web.Application(handler_args={"max_field_size": 8190},  # request_bounds outermost (front.py)
                          middlewares=[request_bounds, *behind_proxies, _proxied_requests_are_hub_requests])
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    app.on_response_prepare.append(close_after_response_when_draining)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", browse_page)
    admin.add_routes(app)
    app.router.add_route("*", kaggle_api.ROUTE, kaggle_api.rpc_route)
    app.router.add_get(FILES_PATH + "/{tail:.*}", kaggle_files.file_route)
    app.router.add_route("*", "/{tail:.*}", hub)
    app.cleanup_ctx.append(_components)
    app.cleanup_ctx.append(forward.forwarder_context)
    _name_the_product_only()
    return app


def _name_the_product_only() -> None:
    """Every response's Server header says hubproxy, not the Python and aiohttp versions behind it.
    aiohttp has no setting for it, and its own error replies to unparseable requests pass no app
    hook, so its default is replaced (tests/test_hit_http_semantics.py fails loudly if that stops)."""
    web_response.SERVER_SOFTWARE = SERVER


async def _components(app: web.Application):
    settings = app[SETTINGS]
    store = Store(settings.cache_path, read_only=settings.read_only)
    removed = store.clear_temp()
    if removed:
        log.info("removed %d temp files left by interrupted fetches", removed)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(store.close)
        upstream = await stack.enter_async_context(Upstream(settings))
        app[STORE], app[UPSTREAM] = store, upstream
        health = WriteHealth(app[METRICS], store.root)
        app[METRICS].cache_read_only.set(store.read_only)
        app[METADATA] = metadata = Metadata(store)
        app[ANONYMITY] = Anonymity(metadata)
        app[FLIGHTS] = flights = Flights(store, upstream, app[METRICS], health)
        stack.push_async_callback(flights.close)
        app[SERVING] = serving = collections.Counter()
        keeper = Housekeeper(store, app[METRICS], health, busy_keys=flights.keys, busy_blobs=lambda: set(+serving),
                             max_size=_size_or_none(settings.max_size), min_free=_size_or_none(settings.min_free))
        flights.on_commit = health.on_failure = keeper.poke  # the caps may need enforcing now
        if not settings.read_only:  # read-only: no hit counts to write, nothing to reconcile or evict
            upkeep = asyncio.create_task(keeper.run())
            stack.callback(upkeep.cancel)
        app[LIFECYCLE].serving()
        yield


def _size_or_none(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers, draining or not (readiness is /readyz)."""
    return web.Response(text="ok\n")


async def browse_page(request: web.Request) -> web.Response:
    if not (request.host.isascii() and request.host.isprintable()):
        return error(400, "the Host header is not a host[:port]: it holds bytes outside printable ASCII")
    entries = await asyncio.to_thread(request.app[STORE].entries)
    return browse.response(entries, forwarded.base_url(request), _size_or_none(request.app[SETTINGS].max_size))


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    return web.Response(body=registry.exposition(), headers={"Content-Type": registry.content_type})


@web.middleware
async def _proxied_requests_are_hub_requests(request: web.Request, handler) -> web.StreamResponse:
    """A request for a hub host (inside an intercepted tunnel, or absolute-form through HTTP_PROXY)
    is never the mirror's own page, metrics or admin API, whatever its path. A CONNECT that reaches
    here is refused: on the mirror's port without --intercept, or inside a tunnel."""
    if request.method == "CONNECT":
        return error(405, "CONNECT is not allowed: this is a mirror (serve --intercept also makes it a proxy "
                          "for the hub hosts)", headers={"Allow": "GET, HEAD"})
    if tunnel_host(request.transport) is not None or not request.raw_path.startswith("/"):
        url = forward.forwarded_url(request)
        if url is not None:
            return await request.app[forward.FORWARDER].forward(request, url)
        host, target = _hub_target(request)
        if HUB_HOSTS[host] == KAGGLE_API:
            return await _kaggle_api_request(request, target)
        if HUB_HOSTS[host] == GCS and relay.is_signed(target):
            return await relay.relay(request, target)
        return await hub(request)
    return await handler(request)


async def _kaggle_api_request(request: web.Request, target: str) -> web.StreamResponse:
    """A request on its way to api.kaggle.com: kagglehub's RPCs, or the files they redirect to."""
    path = target.partition("?")[0]
    if path.startswith(SERVICE_PATH):
        return await kaggle_api.serve_rpc(request, path.removeprefix(SERVICE_PATH))
    if path.startswith(FILES_PATH + "/"):
        return await kaggle_files.serve_file(request, target)
    return kaggle_api.rpc_error(404, f"hubproxy answers kagglehub's model downloads on api.kaggle.com "
                                     f"({SERVICE_PATH}...), not {path[:80]!r}")


def _hub_target(request: web.Request) -> tuple[str | None, str]:
    """(the hub host the request was sent to, None on the mirror's own port; its origin-form
    target); raises web.HTTPException with a one-line reason for what is no hub request."""
    host = tunnel_host(request.transport)
    if host is not None:
        asked = (request.host or "").lower().removesuffix(":443")
        if asked != host:
            raise web.HTTPMisdirectedRequest(text=f"this tunnel is for {host}, not {asked[:80]!r}\n")
        return host, request.raw_path
    if request.raw_path.startswith("/"):
        return None, request.raw_path
    if not request.app[SETTINGS].intercept:
        raise web.HTTPBadRequest(text="absolute-form request targets are refused: hubproxy is a mirror, "
                                      "not an open proxy (serve --intercept makes it a proxy for the hub hosts)\n")
    url = forward.absolute_target(request)
    if url is None:
        raise web.HTTPBadRequest(text="the request target is neither a path nor a URL\n")
    if url.scheme != "http" or url.host not in HUB_HOSTS or url.explicit_port not in (None, 80):
        request.app[METRICS].proxy_requests.labels("refused").inc()
        raise web.HTTPForbidden(text=_refusal(f"{url.scheme}://{url.host_port_subcomponent}"))
    return url.host, url.raw_path_qs


def _refusal(asked: str) -> str:
    """Why an absolute-form request for `asked` (scheme://host[:port]) is neither served nor forwarded."""
    if asked.startswith("https://"):
        return (f"{asked} was asked for in the clear: an https:// target is never served or sent on without TLS; "
                "reach it through CONNECT (HTTPS_PROXY)\n")
    return (f"{asked} is not a hub host; hubproxy proxies only {', '.join(sorted(HUB_HOSTS))}, and other hosts only "
            "as --tunnel allows: http:// forwarded, https:// through CONNECT\n")


async def hub(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        return error(405, f"method {request.method} is not allowed; hub archives are read-only",
                     headers={"Allow": "GET, HEAD"})
    host, target = _hub_target(request)
    if host is None and target.startswith("/admin/"):
        return error(404, "no such admin endpoint (or wrong method)")
    try:
        handle = parse_request_target(target, host)
    except BadHandle as e:
        return error(400 if host is None else 404, str(e))
    request[HANDLE_KEY] = handle.key
    problem = range_problem(request)
    if problem:
        return error(400, problem)
    response = await serve_if_cached(request, handle.key)
    if response is not None:
        return response
    if request.app[SETTINGS].mode == "offline":
        return error(504, f"{handle.key} is not cached and this mirror is offline", headers={X_CACHE: MISS})
    if request.method == "HEAD":
        return await head_upstream(request, handle)
    return await serve_flight(request, handle.key, upstream_url(request, handle))
