"""Access log: one JSON object per request, on its own line.

Invariants: fields are the handle's cache key, the outcome (X-Cache), status, body bytes,
duration and client address; no header or query string is ever logged (tokens, signatures).
"""

from __future__ import annotations

import json
import logging

from aiohttp.abc import AbstractAccessLogger

HANDLE_KEY = "hubproxy.handle"  # where the hub handler leaves the parsed key on the request
BODY_BYTES_KEY = "hubproxy.body_bytes"  # archive bytes sent (sendfile bypasses aiohttp's count)


class JsonAccessLogger(AbstractAccessLogger):
    def log(self, request, response, time: float) -> None:
        self.logger.info(json.dumps({
            "handle": request.get(HANDLE_KEY),
            "path": request.path,
            "method": request.method,
            "outcome": response.headers.get("X-Cache"),
            "status": response.status,
            "bytes": request.get(BODY_BYTES_KEY, 0),
            "duration_s": round(time, 6),
            "client": request.remote,
        }))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def configure(logger: logging.Logger) -> None:
    """Access lines go to stderr bare, so each line is exactly one JSON object."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
