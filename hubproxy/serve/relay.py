"""Signed storage URLs relayed: a GET for storage.googleapis.com that carries its own signature
(one a passed-through call handed out, such as a private Kaggle model's download) is sent to the
gcs upstream as it is and streamed back, through the HTTPS_PROXY door or HTTP_PROXY.

Invariants: nothing relayed is ever stored, and nothing is served from the cache for it (a signed
URL grants what its signer allowed, which an unsigned path must not inherit); only the gcs upstream
is asked (the host policy holds), with the client's Range and nothing else of its headers (never
its Authorization); the signature (the query) never reaches a log or an error; status, length,
range, encoding and checksums reach the client as upstream sent them (a header value that is not
visible ASCII, or a Content-Type that is no media type, is not), and a transfer cut upstream is
cut for the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import urllib.parse
from typing import Mapping

import aiohttp
from aiohttp import web

from ..fetch.errors import FetchFailed
from ..fetch.media_type import safe_media_type
from ..handles import GCS
from . import wire
from .accesslog import BODY_BYTES_KEY
from .components import SETTINGS, UPSTREAM
from .replies import PASSED, X_CACHE, error

log = logging.getLogger(__name__)

SIGNATURES = ("X-Goog-Signature", "Signature")  # what V4 and V2 signed storage URLs carry
RELAYED_HEADERS = ("Content-Length", "Content-Range", "Content-Encoding", "Accept-Ranges", "ETag", "Last-Modified",
                   "x-goog-hash")  # Content-Encoding too: the bytes pass as they came, framing and all
_VISIBLE_ASCII = re.compile(r"[\x20-\x7e]*")
PIECE = 1 << 20


def is_signed(target: str) -> bool:
    """Whether an origin-form target is a signed storage URL."""
    query = urllib.parse.parse_qs(target.partition("?")[2], keep_blank_values=True)
    return any(name in query for name in SIGNATURES)


def _relayed(upstream: Mapping[str, str]) -> dict[str, str]:
    """The headers sent on: those a download needs, when their values are plain visible ASCII, and
    a Content-Type only when it is a valid media type."""
    kept = {name: upstream[name] for name in RELAYED_HEADERS
            if name in upstream and _VISIBLE_ASCII.fullmatch(upstream[name])}
    return {"Content-Type": safe_media_type(upstream.get("Content-Type")), **kept}


async def relay(request: web.Request, target: str) -> web.StreamResponse:
    url = request.app[SETTINGS].upstreams[GCS].rstrip("/") + target
    headers = {"Range": request.headers["Range"]} if "Range" in request.headers else {}
    try:
        answer = await request.app[UPSTREAM].get_as_is(url, headers)
    except FetchFailed as e:
        return error(e.status, e.message, headers={X_CACHE: PASSED})
    with contextlib.closing(answer):
        response = web.StreamResponse(status=answer.status, headers={X_CACHE: PASSED, **_relayed(answer.headers)})
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
