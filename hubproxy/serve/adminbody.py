"""Admin request bodies, checked whole before anything acts on them: each endpoint declares the
fields it takes, each field how it is read, and a body passes only when every field is known,
well typed and well formed.

Invariants: a refusal is a BadBody with a 4xx status (400; 413 larger than jsonbody's
MAX_BODY_BYTES, never read further; 415 not sent as JSON) and a one-line reason naming the field
at fault, echoing at most a short, escaped prefix of what was sent; a body that passes
names at least one handle where the endpoint acts on handles, and exactly one selector for evict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from aiohttp import web

from ..cache import plans
from ..handles import BadHandle
from ..units import parse_duration, parse_size
from .jsonbody import BadBody, kind, read_object, refuse_unknown, sized

__all__ = ["BadBody", "Body", "read_body"]

MAX_HANDLES = 1000
MAX_HANDLE_CHARS = 512
MAX_VALUE_CHARS = 64


@dataclasses.dataclass(frozen=True)
class Body:
    """A body that passed: handles as match patterns, max_size in bytes, older_than in seconds."""

    handles: list[str] | None = None
    max_size: int | None = None
    older_than: float | None = None
    dry_run: bool = False
    include_pinned: bool = False


@dataclasses.dataclass(frozen=True)
class Endpoint:
    fields: tuple[str, ...]  # every field it takes
    one_of: tuple[str, ...] = ()  # exactly one of these must be given (one name: it is required)


ENDPOINTS = {
    "purge": Endpoint(("handles", "dry_run", "include_pinned"), one_of=("handles",)),
    "pin": Endpoint(("handles",), one_of=("handles",)),
    "unpin": Endpoint(("handles",), one_of=("handles",)),
    "evict": Endpoint(("max_size", "older_than", "handles", "dry_run"), one_of=("max_size", "older_than", "handles")),
    "verify": Endpoint(()),
}


async def read_body(request: web.Request, endpoint: str) -> Body:
    """The body of a request to /admin/<endpoint>, checked and parsed (BadBody if refused)."""
    spec = ENDPOINTS[endpoint]
    document = await read_object(request, '{"handles": ["tfhub:/google/x/1"]}')
    _check_names(document, endpoint, spec)
    return Body(**{name: FIELDS[name](name, value) for name, value in document.items()})


def _check_names(document: dict, endpoint: str, spec: Endpoint) -> None:
    refuse_unknown(document, spec.fields, f"/admin/{endpoint}")
    given = [name for name in spec.one_of if name in document]
    if spec.one_of and len(given) != 1:
        wanted = _alternatives(spec.one_of)
        if given:
            raise BadBody(f"give only one of {wanted}, not {' and '.join(given)}")
        raise BadBody(f"give {'one of ' if len(spec.one_of) > 1 else ''}{wanted} for /admin/{endpoint}")


def _handles(name: str, value: object) -> list[str]:
    sized(name, value, list, "a list of handle URLs, keys, paths or globs", MAX_HANDLES, "items")
    return [_pattern(f"{name}[{i}]", item) for i, item in enumerate(value)]


def _pattern(name: str, value: object) -> str:
    """One typed handle → its match pattern, checked as the CLI checks it (plans.pattern)."""
    sized(name, value, str, "a string", MAX_HANDLE_CHARS, "characters")
    try:
        return plans.pattern(value)
    except BadHandle as e:
        raise BadBody(f"{name}: {e}") from None


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BadBody(f"{name} must be true or false, not {kind(value)}")
    return value


def _text_read_by(parse: Callable[[str], float], example: str) -> Callable[[str, object], float]:
    def read(name: str, value: object) -> float:
        sized(name, value, str, f'a string such as "{example}"', MAX_VALUE_CHARS, "characters")
        try:
            return parse(value)
        except ValueError as e:
            raise BadBody(f"{name}: {e}") from None
    return read


FIELDS: dict[str, Callable[[str, object], object]] = {
    "handles": _handles,
    "max_size": _text_read_by(parse_size, "200G"),
    "older_than": _text_read_by(parse_duration, "30d"),
    "dry_run": _flag,
    "include_pinned": _flag,
}


def _alternatives(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
