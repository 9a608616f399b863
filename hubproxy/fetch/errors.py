"""The one failure a fetch can end in, whichever step failed (upstream, transfer, checks, disk).

Invariants: `status` is what a client that has not yet had headers should see; `message` is one
line fit for that client and for logs: it never carries a signed URL's query string.
"""

from __future__ import annotations


class FetchFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
