"""JSON request bodies, read and checked before anything acts on them: the admin API's and
kagglehub's RPCs' (adminbody, kagglebody declare their fields on top of this).

Invariants: no more than MAX_BODY_BYTES are ever read; a refusal is a BadBody with a 4xx status
(400; 413 larger than MAX_BODY_BYTES; 415 not sent as JSON) and a one-line reason naming what is at
fault, echoing at most a short, escaped prefix of what was sent; a body that passes is a JSON
object whose every field the endpoint declares.
"""

from __future__ import annotations

import json

from aiohttp import web

MAX_BODY_BYTES = 64 * 1024
JSON_TYPE = "application/json"


class BadBody(ValueError):
    """A body refused; str() is the one-line reason, .status the HTTP status."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


async def read_object(request: web.Request, example: str) -> dict:
    """The body as a JSON object ({} when there is none); `example` shows a good one in the reason."""
    return _document(await _bytes(request), example)


async def _bytes(request: web.Request) -> bytes:
    if not request.can_read_body:
        return b""
    if request.content_type != JSON_TYPE:
        raise BadBody(f"send the body as Content-Type: {JSON_TYPE}, not {request.content_type[:60]!r}", 415)
    too_large = BadBody(f"the body is larger than {MAX_BODY_BYTES // 1024} KiB", 413)
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise too_large
    data = bytearray()
    async for chunk in request.content.iter_chunked(16 * 1024):
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise too_large
    return bytes(data)


def _document(data: bytes, example: str) -> dict:
    if not data:
        return {}
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise BadBody(f"the body is not JSON; send a JSON object such as {example}") from None
    if not isinstance(document, dict):
        raise BadBody(f"the body must be a JSON object, not {kind(document)}")
    return document


def refuse_unknown(document: dict, fields: tuple[str, ...], where: str) -> None:
    unknown = [name for name in document if name not in fields]
    if unknown:
        takes = f"takes {', '.join(fields)}" if fields else "takes no fields"
        raise BadBody(f"unknown field {names(unknown)}: {where} {takes}")


def sized(name: str, value: object, python_type: type, described: str, limit: int, units: str) -> None:
    """A string or list field is of its type, not empty, and at most `limit` long."""
    if not isinstance(value, python_type):
        raise BadBody(f"{name} must be {described}, not {kind(value)}")
    if not value:
        raise BadBody(f"{name} is empty")
    if len(value) > limit:
        raise BadBody(f"{name} has {len(value)} {units}; at most {limit}")


def kind(value: object) -> str:
    """A JSON value's type, for a reason: 'a string', 'a number', ..."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    for python_type, described in ((str, "a string"), ((int, float), "a number"), (list, "a list"),
                                   (dict, "an object")):
        if isinstance(value, python_type):
            return described
    return type(value).__name__


def names(given: list[str]) -> str:
    shown = ", ".join(repr(name[:40]) for name in given[:5])
    return shown + (f" and {len(given) - 5} more" if len(given) > 5 else "")
