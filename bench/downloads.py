"""One download by a real HTTP client (http.client, a socket of its own), hashed as it arrives, that
can hang up at a chosen byte and says whether the server presented the body as complete.

Invariants: `complete` is true only when the framing said the body ended there (the terminating
chunk of a chunked body, every byte of a Content-Length); a download never raises, its trouble is
in `error`; the bytes are never kept, only counted and hashed.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import urllib.parse
from dataclasses import dataclass

PIECE = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    status: int | None  # None: no status line came (refused, reset, the server was killed)
    received: int  # body bytes
    sha256: str  # of the body bytes received
    complete: bool  # the server's framing said the body ended here
    aborted: bool  # this client hung up on purpose, mid-body
    error: str | None = None

    def served_whole(self, sha256: str) -> bool:
        """A 200 whose framing said complete, with the right bytes."""
        return self.status == 200 and self.complete and self.sha256 == sha256

    def served_wrong(self, sha256: str) -> bool:
        """The hazard: a body presented as a complete archive whose bytes are not the origin's."""
        return self.status == 200 and self.complete and self.sha256 != sha256


class Progress:
    """Body bytes received so far by one download, for a driver that acts at a point in it."""

    def __init__(self) -> None:
        self.received = 0
        self.ended = False
        self._changed = threading.Condition()

    def add(self, count: int) -> None:
        with self._changed:
            self.received += count
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 60) -> int:
        """Until `count` bytes arrived or the download ended; returns what arrived."""
        with self._changed:
            self._changed.wait_for(lambda: self.ended or self.received >= count, timeout)
            return self.received


def download(url: str, *, abort_after: int | None = None, progress: Progress | None = None,
             timeout: float = 120) -> Fetched:
    """GET url; hang up once `abort_after` body bytes arrived, when given."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    status, received, digest, complete, aborted, error = None, 0, hashlib.sha256(), False, False, None
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        status = response.status
        declared, chunked = response.length, response.chunked
        while piece := response.read(PIECE if abort_after is None else max(1, min(PIECE, abort_after - received))):
            received += len(piece)
            digest.update(piece)
            if progress is not None:
                progress.add(len(piece))
            if abort_after is not None and received >= abort_after:
                aborted = True
                break
        complete = not aborted and (chunked or declared is not None and received == declared)
    except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a chunk size line cut off
        error = f"{type(e).__name__}: {e}"[:200]
    finally:
        connection.close()
        if progress is not None:
            progress.end()
    return Fetched(status, received, digest.hexdigest(), complete, aborted, error)
