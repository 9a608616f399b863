"""kagglehub through the mirror: the three RPCs of Kaggle's models.ModelApiService that
kagglehub.model_download calls, answered for requests intercepted on their way to api.kaggle.com
and on the mirror's own port under the same paths.

    GetModelInstance               passed through, its answer reused for kaggle_metadata_ttl
    ListModelInstanceVersionFiles  a version's list stored for ever (without a version: the TTL)
    DownloadModelInstanceVersion   302 to the mirror's own stable URL of the file (kaggle_files)

Invariants: every body is checked whole first (kagglebody); answers are stored (cache/metadata)
only when upstream gave them to an anonymous request; a request carrying Authorization is
answered from the cache only for a scope upstream serves anonymously (kagglecreds), otherwise it
is passed through with its credentials and nothing is stored; a credential never reaches a log,
an error, a key, the index or a stored document; in offline mode upstream is never contacted (a
stored copy, or 504 naming the model); in fallback mode a failing upstream is answered from the
stored copy; the redirect never carries a signed URL, only the mirror's own.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from ..fetch.errors import FetchFailed
from ..fetch.upstream import Answer
from ..handles import KAGGLE_API
from . import forwarded
from .accesslog import HANDLE_KEY
from .components import ANONYMITY, METADATA, SETTINGS, STORE, UPSTREAM
from .intercept import tunnel_host
from .jsonbody import BadBody
from .kagglebody import DOWNLOAD, FIELDS, GET_INSTANCE, LIST_FILES, SERVICE_PATH, Call, read_call
from .kagglecreds import REFUSALS
from .replies import HIT, MISS, PASSED, STALE, X_CACHE

log = logging.getLogger(__name__)

ROUTE = SERVICE_PATH + "{rpc}"


def rpc_error(status: int, message: str, headers: dict | None = None) -> web.Response:
    """An error as Kaggle's API sends one (kagglesdk shows its message): one line of JSON."""
    body = json.dumps({"code": status, "message": message}) + "\n"
    return web.Response(status=status, body=body.encode(), content_type="application/json", headers=headers)


def rpc_url(request: web.Request, rpc: str) -> str:
    return request.app[SETTINGS].upstream_base(KAGGLE_API).rstrip("/") + SERVICE_PATH + rpc


def own_base_url(request: web.Request) -> str:
    """Where this client reaches the mirror: api.kaggle.com itself when intercepted (the redirect
    comes back through the same proxy), else the mirror's address as the client spelled it (to its
    load balancer, when that is a trusted proxy)."""
    host = tunnel_host(request.transport)
    if host is not None:
        return f"https://{host}"
    if not request.raw_path.startswith("/"):  # absolute-form, through HTTP_PROXY
        return f"http://{request.url.host}"
    return forwarded.base_url(request)


async def rpc_route(request: web.Request) -> web.Response:
    """POST /v1/models.ModelApiService/<Rpc> on the mirror's port."""
    return await serve_rpc(request, request.match_info["rpc"])


async def serve_rpc(request: web.Request, rpc: str) -> web.Response:
    if rpc not in FIELDS:
        return rpc_error(404, f"hubproxy serves {', '.join(FIELDS)} of models.ModelApiService, not {rpc[:60]!r}")
    if request.method != "POST":
        return rpc_error(405, f"{rpc} is called with POST", headers={"Allow": "POST"})
    try:
        call = await read_call(request, rpc)
    except BadBody as e:
        return rpc_error(e.status, str(e))
    request[HANDLE_KEY] = call.key
    authorization = request.headers.get("Authorization")
    if authorization is not None and not await anonymous(request, call):
        return await _pass_through(request, call, authorization)
    if rpc == DOWNLOAD:
        return await _redirect_to_mirror(request, call)
    return await _metadata(request, call)


# -- credentials -------------------------------------------------------------------------------

async def anonymous(request: web.Request, call: Call) -> bool:
    """Whether upstream serves call's scope anonymously: remembered, or checked now with the same
    call sent without credentials (its answer kept, as any anonymous answer is)."""
    anonymity = request.app[ANONYMITY]
    known = await anonymity.known(call.scope)
    if known is not None or request.app[SETTINGS].mode == "offline":
        return bool(known)
    try:
        answer = await request.app[UPSTREAM].call(rpc_url(request, call.rpc), call.fields)
    except FetchFailed:
        return False  # undecided: the client's own credentials may fare better
    if answer.status in REFUSALS:
        anonymity.refused(call.scope)
        return False
    return await _keep(request, call, answer) is not None


async def _pass_through(request: web.Request, call: Call, authorization: str) -> web.Response:
    """The call sent upstream with the client's credentials, its answer relayed as it is (a
    download's signed URL too: nothing of a private model is stored)."""
    if request.app[SETTINGS].mode == "offline":
        return rpc_error(504, f"{call.described} is not served anonymously upstream and this mirror is offline: "
                              "nothing of it is stored")
    try:
        answer = await request.app[UPSTREAM].call(rpc_url(request, call.rpc), call.fields, authorization)
    except FetchFailed as e:
        return rpc_error(e.status, e.message, headers={X_CACHE: PASSED})
    headers = {X_CACHE: PASSED, "Content-Type": answer.content_type or "application/json"}
    if answer.location is not None:
        headers["Location"] = answer.location
    return web.Response(status=answer.status, body=answer.body, headers=headers)


# -- the answers ---------------------------------------------------------------------------------

async def _redirect_to_mirror(request: web.Request, call: Call) -> web.Response:
    file = call.file
    if request.app[SETTINGS].mode == "offline" and request.app[STORE].lookup(file.key) is None:
        return rpc_error(504, f"{file.key} is not cached and this mirror is offline", headers={X_CACHE: MISS})
    return web.Response(status=302, headers={"Location": own_base_url(request) + file.mirror_path})


async def _metadata(request: web.Request, call: Call) -> web.Response:
    """GetModelInstance and ListModelInstanceVersionFiles: a stored answer while it holds (a
    version's file list for ever), else upstream's, kept."""
    settings = request.app[SETTINGS]
    stored = await asyncio.to_thread(request.app[METADATA].read, call.key)
    lasting = call.rpc == LIST_FILES and call.version is not None
    if stored is not None and (settings.mode == "offline" or lasting
                               or stored.age() < settings.kaggle_metadata_ttl_seconds):
        return _json(stored.document, HIT)
    if settings.mode == "offline":
        return rpc_error(504, f"no stored {call.rpc} answer for {call.described} and this mirror is offline",
                         headers={X_CACHE: MISS})
    try:
        answer = await request.app[UPSTREAM].call(rpc_url(request, call.rpc), call.fields)
    except FetchFailed as e:
        if settings.mode == "fallback" and stored is not None:
            log.warning("answering %s from its stored copy: %s", call.key, e.message)
            return _json(stored.document, STALE)
        return rpc_error(e.status, e.message, headers={X_CACHE: MISS})
    document = await _keep(request, call, answer)
    if document is None:
        return web.Response(status=answer.status, body=answer.body, headers={
            X_CACHE: MISS, "Content-Type": answer.content_type or "application/json"})
    return _json(document, MISS)


async def _keep(request: web.Request, call: Call, answer: Answer) -> dict | None:
    """An anonymous call's good answer (a JSON object; for a download, a redirect) remembered:
    its scope is public, and a metadata answer is stored. The document, or None if not good."""
    if call.rpc == DOWNLOAD:
        good, document = answer.location is not None, {}  # set for redirects only
    else:
        document = _json_object(answer.body) if answer.status == 200 else None
        good = document is not None
    if not good:
        return None
    await request.app[ANONYMITY].served(call.scope)
    if call.rpc in (GET_INSTANCE, LIST_FILES):
        try:
            await asyncio.to_thread(request.app[METADATA].write, call.key, document)
        except OSError as e:
            log.warning("cannot store %s: %s", call.key, e.strerror or e)
    return document


def _json_object(body: bytes) -> dict | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _json(document: dict, outcome: str) -> web.Response:
    return web.Response(body=json.dumps(document).encode(), content_type="application/json",
                        headers={X_CACHE: outcome})
