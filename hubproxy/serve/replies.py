"""What every hub response shares: the X-Cache outcome header and the one-line error reply.

Invariants: an error body is one line ending in a newline, fit for a person and a log; it never
carries a signed URL's query string or a credential.
"""

from __future__ import annotations

from aiohttp import web

X_CACHE = "X-Cache"
HIT, MISS, JOIN = "HIT", "MISS", "JOIN"
PASSED = "PASS"  # relayed as upstream answered it, nothing stored (private models, signed URLs)
STALE = "STALE"  # a stored copy, answered because upstream failed (mode fallback)


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)
