"""The Content-Type hubproxy passes on for an origin's bytes: a valid media type as the origin sent
it, else application/octet-stream.

Invariants: what `safe_media_type` returns (unless it is the caller's default) is printable ASCII
without CR or LF, at most MAX_LENGTH long: `type/subtype` of RFC 9110 tokens with `; name=value`
parameters (a token or a quoted-string of ASCII). An origin's bytes that are not latin-1 (raw
UTF-8, which aiohttp's client decodes, or undecodable bytes kept as surrogates) never reach a
stored entry or a response header, where they would break every response that carries them.
"""

from __future__ import annotations

import re

DEFAULT = "application/octet-stream"
MAX_LENGTH = 256
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))?)*")


def safe_media_type(value: str | None, default: str = DEFAULT) -> str:
    """value when it is a valid media type (surrounding blanks removed), else default."""
    value = (value or "").strip(" \t")
    if len(value) <= MAX_LENGTH and _MEDIA_TYPE.fullmatch(value):
        return value
    return default
