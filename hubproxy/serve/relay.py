"""Signed storage URLs relayed: a GET for storage.googleapis.com that carries its own signature
(one a passed-through call handed out, such as a private Kaggle model's download) is sent to the
gcs upstream as it is and streamed back, through the HTTPS_PROXY door or HTTP_PROXY.

Invariants: nothing relayed is ever stored, and nothing is served from the cache for it (a signed
URL grants what its signer allowed, which an unsigned path must not inherit); only the gcs upstream
is asked (the host policy holds), with the client's Range and nothing else of its headers (never
its Authorization); the signature (the query) never reaches a log or an error; status, length,
range and checksums reach the client as upstream sent them, and a transfer cut upstream is cut for
the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse

import aiohttp
from aiohttp import web

from ..fetch.errors import FetchFailed
from ..handles import GCS
from . import wire
from .accesslog import BODY_BYTES_KEY
from .components import SETTINGS, UPSTREAM
from .replies import PASSED, X_CACHE, error

log = logging.getLogger(__name__)

SIGNATURES = ("X-Goog-Signature", "Signature")  # what V4 and V2 signed storage URLs carry
RELAYED_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified",
                   "x-goog-hash")
PIECE = 1 << 20


def is_signed(target: str) -> bool:
    """Whether an origin-form target is a signed storage URL."""
    query = urllib.parse.parse_qs(target.partition("?")[2], keep_blank_values=True)
    return any(name in query for name in SIGNATURES)


async def relay(request: web.Request, target: str) -> web.StreamResponse:
    url = request.app[SETTINGS].upstreams[GCS].rstrip("/") + target
    headers = {"Range": request.headers["Range"]} if "Range" in request.headers else {}
    try:
        answer = await request.app[UPSTREAM].get_as_is(url, headers)
    except FetchFailed as e:
        return error(e.status, e.message, headers={X_CACHE: PASSED})
    with contextlib.closing(answer):
        response = web.StreamResponse(status=answer.status, headers={
            X_CACHE: PASSED, **{name: answer.headers[name] for name in RELAYED_HEADERS if name in answer.headers}})
        request[BODY_BYTES_KEY] = 0
        try:
            await response.prepare(request)
            async for piece in answer.content.iter_chunked(PIECE):
                await response.write(piece)
                request[BODY_BYTES_KEY] += len(piece)
            await response.write_eof()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("cutting a relayed storage download short: upstream broke off (%s)", type(e).__name__)
            wire.cut(request)
        except ConnectionError:
            pass  # the client left
    return response
