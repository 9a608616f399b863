"""Admin HTTP API under /admin/: ls, purge, pin, unpin, evict, verify — the cache commands, live.

Invariants: the routes exist only when an admin token is configured (404 otherwise); every
request must carry it as a Bearer token (the scheme in any case; a bare token is refused),
compared in constant time (401 otherwise); the token is never logged or echoed; a body is
checked whole (adminbody) before anything is done, and a refused one changes nothing; nothing
in flight is ever purged or evicted, and a pinned entry is purged only when the body says
"include_pinned": true.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac

from aiohttp import web

from ..cache import plans, scrub
from ..cache.operations import carry_out, set_pinned
from ..cache.store import Entry
from .adminbody import BadBody, read_body
from .components import FLIGHTS, METRICS, SETTINGS, STORE
from .replies import error


def add_routes(app: web.Application) -> None:
    for method, path, handler in (("GET", "ls", ls), ("POST", "purge", purge), ("POST", "pin", pin),
                                  ("POST", "unpin", unpin), ("POST", "evict", evict_), ("POST", "verify", verify_)):
        app.router.add_route(method, f"/admin/{path}", _guarded(handler))


def _guarded(handler):
    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[SETTINGS].admin_token
        if token is None:
            raise web.HTTPNotFound(text="the admin API is disabled (set admin_token or HUBPROXY_ADMIN_TOKEN)\n")
        if not hmac.compare_digest(_bearer_token(request), token.encode()):
            raise web.HTTPUnauthorized(text="admin token missing or wrong\n", headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except BadBody as e:
            return error(e.status, str(e))
    return guarded


def _bearer_token(request: web.Request) -> bytes:
    """The token of an `Authorization: Bearer TOKEN` header (the scheme in any case, RFC 9110), as
    the bytes sent; b"" when there is none or the scheme is another."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return token.strip().encode("utf-8", "surrogateescape")  # aiohttp keeps bytes that are not UTF-8 so


async def ls(request: web.Request) -> web.Response:
    entries = await asyncio.to_thread(request.app[STORE].entries)
    return web.json_response([dataclasses.asdict(e) for e in sorted(entries, key=lambda e: e.key)])


async def purge(request: web.Request) -> web.Response:
    body = await read_body(request, "purge")
    plan = plans.matching(await _idle_entries(request), body.handles, include_pinned=True)
    if plan.pinned and not body.include_pinned:
        return error(409, f"{plan.pinned} of the {len(plan.keys)} matching entries pinned, so nothing was purged: "
                          'add "include_pinned": true to purge pinned entries too')
    return await _apply(request, plan, body.dry_run)


async def evict_(request: web.Request) -> web.Response:
    body = await read_body(request, "evict")
    entries = await _idle_entries(request)
    if body.max_size is not None:
        plan = plans.to_fit(entries, body.max_size)
    elif body.older_than is not None:
        plan = plans.older_than(entries, body.older_than)
    else:
        plan = plans.matching(entries, body.handles, include_pinned=False)
    return await _apply(request, plan, body.dry_run)


async def _idle_entries(request: web.Request) -> list[Entry]:
    """The entries that are not being fetched right now: the only ones a plan may name."""
    busy = request.app[FLIGHTS].keys()
    return [e for e in await asyncio.to_thread(request.app[STORE].entries) if e.key not in busy]


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
    body = await read_body(request, "pin" if pinned else "unpin")
    keys = await asyncio.to_thread(set_pinned, request.app[STORE], body.handles, pinned)
    return web.json_response({"pinned" if pinned else "unpinned": keys})


async def verify_(request: web.Request) -> web.Response:
    await read_body(request, "verify")  # it takes no fields: refuse any rather than ignore them
    store = request.app[STORE]
    findings = await asyncio.to_thread(scrub.scrub, store)
    await asyncio.to_thread(scrub.quarantine_all, store, findings)
    request.app[METRICS].verify_failures.inc(len(findings))
    return web.json_response({"bad": [dataclasses.asdict(f) for f in findings]})
