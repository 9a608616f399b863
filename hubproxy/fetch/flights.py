"""The registry of flights under way: single flight per key, so any number of requests for one
archive cost one upstream fetch.

Invariants: at most one joinable flight per key at a time, and it runs to the end even if every
reader leaves; a key is listed as busy (never to be evicted or purged) while its flight runs; the
registry forgets a flight before its readers learn how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable

from ..cache.diskhealth import WriteHealth
from ..cache.store import Store
from ..metrics import Metrics
from .flight import Flight, State
from .ingest import Ingest
from .upstream import Upstream


class Flights:
    def __init__(self, store: Store, upstream: Upstream, metrics: Metrics, health: WriteHealth | None = None):
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self.health = health or WriteHealth(metrics, store.root)
        self._active: dict[str, Flight] = {}  # the flight a newcomer for the key joins
        self._tasks: dict[Flight, asyncio.Task] = {}  # including pass-through flights no newcomer can join
        self.on_commit: Callable[[], None] | None = None

    def keys(self) -> set[str]:
        """Keys being fetched right now (never to be evicted or purged)."""
        return set(self._active)

    @contextlib.asynccontextmanager
    async def join(self, key: str, url: str, *, streaming: bool = True, post_json: dict | None = None,
                   archive: bool = True) -> AsyncIterator[tuple[Flight, bool]]:
        """Attach to the fetch for key, starting it if none runs (or the running one can no longer
        give a newcomer every byte); yields (flight, joined_existing). A streaming reader must
        follow flight.spans(); others wait for flight.finished(). A new flight's first hop is a
        POST of post_json when given; archive=False fetches a file (no gzip check, a checksum
        required)."""
        flight = self._active.get(key)
        joined = flight is not None and flight.joinable
        if not joined:
            flight = self._start(key, url, post_json, archive)
        flight.attach(streaming)
        self._metrics.flight_readers.inc()
        try:
            yield flight, joined
        finally:
            flight.detach(streaming)
            self._metrics.flight_readers.dec()

    def _start(self, key: str, url: str, post_json: dict | None, archive: bool) -> Flight:
        flight = Flight(key, url, post_json, archive)
        flight.on_end = self._ended
        self._active[key] = flight
        ingest = Ingest(flight, self._store, self._upstream, self.health,
                        on_resume=lambda reason: self._metrics.upstream_resumes.labels(reason).inc())
        self._tasks[flight] = asyncio.create_task(ingest.run(), name=f"flight {key}")
        self._metrics.flights_in_progress.inc()
        return flight

    def _ended(self, flight: Flight) -> None:
        self._metrics.flights_in_progress.dec()
        self._tasks.pop(flight, None)
        if self._active.get(flight.key) is flight:
            del self._active[flight.key]
        if flight.state is State.PASSED:
            self._metrics.passthrough_fetches.inc()
        if flight.error is not None:
            self._metrics.upstream_failures.labels(str(flight.error.status)).inc()
        elif flight.entry is not None:
            if self.on_commit is not None:
                self.on_commit()
            self._metrics.upstream_bytes.inc(flight.entry.size)
            self._metrics.fetch_seconds.observe(asyncio.get_running_loop().time() - flight.started)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
