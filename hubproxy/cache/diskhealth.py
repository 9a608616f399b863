"""Disk trouble: which write failures the disk is to blame for, and whether the cache takes writes
right now, told to operators once per burst of failures.

Invariants: every failed write the disk is to blame for is counted (by reason); only the first of
a burst is logged, and the next successful commit ends the burst with one line of its own; the
state is advisory: writers always try the disk again, which is how the proxy notices recovery.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from typing import Callable

from ..metrics import Metrics

log = logging.getLogger(__name__)

_DISK_ERRNOS = {errno.ENOSPC: "no_space", errno.EDQUOT: "quota", errno.EROFS: "read_only",
                errno.EFBIG: "too_big", errno.EIO: "io_error"}
_SQLITE_DISK_ERRORS = {"database or disk is full": "no_space", "readonly database": "read_only",
                       "disk i/o error": "io_error", "unable to open database file": "cannot_open"}


def disk_trouble(error: BaseException) -> str | None:
    """Why a write to the cache failed when the disk is to blame (full, quota, read-only, I/O),
    as a short label; None for any other failure."""
    if isinstance(error, OSError):
        return _DISK_ERRNOS.get(error.errno)
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        return next((label for words, label in _SQLITE_DISK_ERRORS.items() if words in text), None)
    return None


class WriteHealth:
    def __init__(self, metrics: Metrics, cache_root: object = "the cache"):
        self._metrics = metrics
        self._cache_root = cache_root
        self._failures_in_burst = 0
        self.on_failure: Callable[[], None] | None = None  # e.g. let eviction free space now
        metrics.cache_writable.set(1)

    @property
    def writable(self) -> bool:
        return self._failures_in_burst == 0

    def failed(self, reason: str, doing: str) -> None:
        """A write failed because of the disk (`reason` as from disk_trouble)."""
        self._metrics.cache_write_errors.labels(reason).inc()
        if self.writable:
            log.error("cannot write to %s (%s) while %s: serving by pass-through, storing nothing, "
                      "until a write succeeds again", self._cache_root, reason.replace("_", " "), doing)
            self._metrics.cache_writable.set(0)
        self._failures_in_burst += 1
        if self.on_failure is not None:
            self.on_failure()

    def succeeded(self) -> None:
        """A commit reached the disk."""
        if not self.writable:
            log.warning("%s takes writes again, after %d failed writes", self._cache_root, self._failures_in_burst)
            self._metrics.cache_writable.set(1)
        self._failures_in_burst = 0
