"""Access log: one JSON object per request, on its own line (stderr).

Invariants: fields are the handle's cache key, the outcome (X-Cache), status, body bytes,
duration and client address (behind a trusted proxy, the one it forwarded for); no header or query
string is ever logged (tokens, signatures); lines are buffered for at most FLUSH_SECONDS and flushed
at shutdown, in request order.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from typing import TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import forwarded

HANDLE_KEY = web.RequestKey("hubproxy.handle", str)  # where the hub handler leaves the parsed key
BODY_BYTES_KEY = web.RequestKey("hubproxy.body_bytes", int)  # archive bytes sent (sendfile bypasses aiohttp's count)
FLUSH_SECONDS = 0.2
MAX_PENDING = 512


def line(*, handle: str | None, path: str, method: str, outcome: str | None, status: int, body_bytes: int,
         seconds: float, client: str | None) -> str:
    return _line_start(handle, path, method, outcome, status, body_bytes, client) + f"{seconds:.6f}}}"


@functools.lru_cache(maxsize=4096)
def _line_start(handle, path, method, outcome, status, body_bytes, client) -> str:
    """Everything but the duration, which goes last: the same request's lines differ only there."""
    fields = {"handle": handle, "path": path, "method": method, "outcome": outcome, "status": status,
              "bytes": body_bytes, "client": client}
    return json.dumps(fields)[:-1] + ', "duration_s": '


class AccessLog:
    """Where access lines go. Not through the logging module: a record per request costs more
    than answering a HEAD, so lines are batched into one write per FLUSH_SECONDS."""

    def __init__(self, enabled: bool, stream: TextIO = sys.stderr):
        self.enabled = enabled
        self._stream = stream
        self._pending: list[str] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    def write(self, text: str) -> None:
        self._pending.append(text)
        if len(self._pending) >= MAX_PENDING:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending:
            self._stream.write("\n".join(self._pending) + "\n")
            self._stream.flush()
            self._pending.clear()

    def aiohttp_logger_class(self) -> type[AbstractAccessLogger]:
        """An aiohttp access logger class writing here (aiohttp wants a class, not an instance)."""
        sink = self

        class JsonAccessLogger(AbstractAccessLogger):
            def log(self, request, response, time: float) -> None:
                sink.write(line(handle=request.get(HANDLE_KEY), path=request.path, method=request.method,
                                outcome=response.headers.get("X-Cache"), status=response.status,
                                body_bytes=request.get(BODY_BYTES_KEY, 0), seconds=time,
                                client=forwarded.client(request)))

            @property
            def enabled(self) -> bool:
                return sink.enabled

        return JsonAccessLogger
