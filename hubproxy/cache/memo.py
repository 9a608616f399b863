"""A memo of index reads: key → value for a few seconds, so a hot key costs no index read per request.

Invariants: a value is given back only until its time is up; remembering a value drops every expired
one (oldest first, each in O(1)), so the memo holds only what was remembered in the last `seconds`,
and never more than `most` values, however many keys the cache has seen; safe to share between threads.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Generic, TypeVar

V = TypeVar("V")


class Memo(Generic[V]):
    def __init__(self, seconds: float, most: int):
        self._seconds, self._most = seconds, most
        self._values: collections.OrderedDict[str, tuple[V, float]] = collections.OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            remembered = self._values.get(key)
        if remembered is None or remembered[1] <= time.monotonic():
            return None
        return remembered[0]

    def put(self, key: str, value: V) -> None:
        now = time.monotonic()
        with self._lock:
            self._values.pop(key, None)
            self._drop_expired(now)
            if len(self._values) >= self._most:
                self._values.popitem(last=False)
            self._values[key] = (value, now + self._seconds)

    def forget(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def __len__(self) -> int:
        return len(self._values)

    def _drop_expired(self, now: float) -> None:
        while self._values:
            key, (_, until) = next(iter(self._values.items()))
            if until > now:
                return
            del self._values[key]
