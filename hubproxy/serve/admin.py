"""Admin HTTP API under /admin/: ls, purge, pin, unpin, evict, verify — the cache commands, live.

Invariants: the routes exist only when an admin token is configured (404 otherwise); every
request must carry it as a Bearer token, compared in constant time (401 otherwise); the token is
never logged or echoed; nothing in flight is ever purged or evicted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac

from aiohttp import web

from ..cache import plans, scrub
from ..cache.operations import carry_out, set_pinned
from ..handles import BadHandle
from ..units import parse_duration, parse_size
from .components import FLIGHTS, METRICS, SETTINGS, STORE


def add_routes(app: web.Application) -> None:
    for method, path, handler in (("GET", "ls", ls), ("POST", "purge", purge), ("POST", "pin", pin),
                                  ("POST", "unpin", unpin), ("POST", "evict", evict_), ("POST", "verify", verify_)):
        app.router.add_route(method, f"/admin/{path}", _guarded(handler))


def _guarded(handler):
    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[SETTINGS].admin_token
        if token is None:
            raise web.HTTPNotFound(text="the admin API is disabled (set admin_token or HUBPROXY_ADMIN_TOKEN)\n")
        offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(offered.encode(), token.encode()):
            raise web.HTTPUnauthorized(text="admin token missing or wrong\n", headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except (BadHandle, ValueError) as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from None
    return guarded


async def _body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="the body must be a JSON object\n") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object\n")
    return body


async def ls(request: web.Request) -> web.Response:
    entries = await asyncio.to_thread(request.app[STORE].entries)
    return web.json_response([dataclasses.asdict(e) for e in sorted(entries, key=lambda e: e.key)])


async def purge(request: web.Request) -> web.Response:
    body = await _body(request)
    plan = await _plan(request, lambda entries: plans.matching(entries, plans.patterns(body.get("handles", [])),
                                                                include_pinned=True))
    return await _apply(request, plan, bool(body.get("dry_run")))


async def evict_(request: web.Request) -> web.Response:
    body = await _body(request)
    if body.get("max_size") is not None:
        limit = parse_size(str(body["max_size"]))
        choose = lambda entries: plans.to_fit(entries, limit)  # noqa: E731
    elif body.get("older_than") is not None:
        age = parse_duration(str(body["older_than"]))
        choose = lambda entries: plans.older_than(entries, age)  # noqa: E731
    elif body.get("handles"):
        choose = lambda entries: plans.matching(entries, plans.patterns(body["handles"]),  # noqa: E731
                                                include_pinned=False)
    else:
        raise web.HTTPBadRequest(text="give max_size, older_than or handles\n")
    return await _apply(request, await _plan(request, choose), bool(body.get("dry_run")))


async def _plan(request: web.Request, choose) -> plans.Plan:
    """A plan over the entries that are not being fetched right now."""
    busy = request.app[FLIGHTS].keys()
    entries = [e for e in await asyncio.to_thread(request.app[STORE].entries) if e.key not in busy]
    return choose(entries)


async def _apply(request: web.Request, plan: plans.Plan, dry_run: bool) -> web.Response:
    if not dry_run:
        await asyncio.to_thread(carry_out, request.app[STORE], plan)
        request.app[METRICS].evictions.inc(len(plan.keys))
    return web.json_response({"removed": plan.keys, "freed_bytes": plan.freed, "dry_run": dry_run})


async def pin(request: web.Request) -> web.Response:
    return await _set_pinned(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _set_pinned(request, False)


async def _set_pinned(request: web.Request, pinned: bool) -> web.Response:
    body = await _body(request)
    keys = await asyncio.to_thread(set_pinned, request.app[STORE], plans.patterns(body.get("handles", [])), pinned)
    return web.json_response({"pinned" if pinned else "unpinned": keys})


async def verify_(request: web.Request) -> web.Response:
    store = request.app[STORE]
    findings = await asyncio.to_thread(scrub.scrub, store)
    await asyncio.to_thread(scrub.quarantine_all, store, findings)
    request.app[METRICS].verify_failures.inc(len(findings))
    return web.json_response({"bad": [dataclasses.asdict(f) for f in findings]})
