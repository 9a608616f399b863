"""The process's file descriptor table: its soft limit raised to the hard one at start, the cap on
client connections that keeps them from filling it, and accept() failing for want of descriptors
logged once per burst (door.py).

Invariants: the cap leaves RESERVE descriptors for the index, logs, upstream connections,
temporary files and the sockets one burst of accept() calls takes before any is closed, and one
more descriptor per connection for the blob or partial archive it is sent from; trouble that
repeats (a failed accept(), retried each second) is one line per burst, never one per attempt.
"""

from __future__ import annotations

import logging
import resource
import time

log = logging.getLogger(__name__)

RESERVE = 64 + 128  # the index, logs, upstream connections, temp files; and a burst of accepts (the backlog)
BURST_GAP_SECONDS = 60.0  # trouble this long after the last of its kind starts a new burst


def raise_soft_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (as far as the kernel allows); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:  # an unlimited hard limit is above what Linux allows (nr_open)
            log.info("kept the open-file limit at %d: raising it to %s failed: %s", soft, hard, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(fd_limit: int) -> int:
    """How many client connections fit in a table of fd_limit descriptors."""
    return max(1, (fd_limit - RESERVE) // 2)


class Burst:
    """Trouble that repeats (each retry, each refused client) is logged when it starts, and then
    once more with its count if it starts again after a quiet BURST_GAP_SECONDS."""

    def __init__(self, what: str, level: int = logging.WARNING):
        self._what = what
        self._level = level
        self._count = 0
        self._last = float("-inf")

    def happened(self, detail: str) -> None:
        now = time.monotonic()
        if now - self._last > BURST_GAP_SECONDS:
            since = f" ({self._count} times in the burst before)" if self._count > 1 else ""
            log.log(self._level, "%s: %s%s; logged once per burst", self._what, detail, since)
            self._count = 0
        self._count += 1
        self._last = now
