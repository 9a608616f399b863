"""The registry of flights under way: single flight per key, so any number of requests for one
archive cost one upstream fetch, across every process on the cache (cache/flightlocks.py).

Invariants: at most one joinable flight per key at a time in a process, and it runs to the end
even if every reader leaves; across processes, only the holder of the key's lock fetches it and
the others follow its temp file (fetch/follow.py), taking over when it dies; a key is listed as
busy (never to be evicted or purged) while its flight runs; the registry forgets a flight before
its readers learn how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

from ..cache.diskhealth import WriteHealth, disk_trouble
from ..cache.flightlocks import Lead, Watch
from ..cache.store import Store
from ..metrics import Metrics
from .errors import FetchFailed
from .flight import ENDED, Flight, State
from .follow import Follow, Next, Partial, committed_entry, end_with
from .ingest import Ingest
from .upstream import Upstream

log = logging.getLogger(__name__)


class Flights:
    def __init__(self, store: Store, upstream: Upstream, metrics: Metrics, health: WriteHealth | None = None):
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self.health = health or WriteHealth(metrics, store.root)
        self._active: dict[str, Flight] = {}  # the flight a newcomer for the key joins
        self._tasks: dict[Flight, asyncio.Task] = {}  # including pass-through flights no newcomer can join
        self.on_commit: Callable[[], None] | None = None
        self._locks_refused = False  # said once: a flight lock could not be taken

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
            flight, joined = self._start(key, url, post_json, archive)
        flight.attach(streaming)
        self._metrics.flight_readers.inc()
        try:
            yield flight, joined
        finally:
            flight.detach(streaming)
            self._metrics.flight_readers.dec()

    def _start(self, key: str, url: str, post_json: dict | None, archive: bool) -> tuple[Flight, bool]:
        """A new flight for key: (it, whether it follows another process's fetch of key)."""
        alone = key in self._active  # its flight here passes through memory, so it cannot be joined: fetch alone
        claim = None if alone else self._claim(key)
        flight = Flight(key, url, post_json, archive)
        flight.on_end = self._ended
        self._active[key] = flight
        self._tasks[flight] = asyncio.create_task(self._run(flight, claim), name=f"flight {key}")
        return flight, isinstance(claim, Watch)

    def _claim(self, key: str) -> Lead | Watch | None:
        """key's lock (lead its fetch), a watch on the process that has it (follow), or None: the
        cache keeps no locks (read-only), or they cannot be had (a full disk, flights/ gone or not
        ours, no file descriptor left): fetch alone, as a single process does."""
        if self._store.flights is None:
            return None
        try:
            return self._store.flights.try_lead(key)
        except OSError as e:
            if not self._locks_refused:
                log.warning("cannot take the flight lock of %s (%s): fetching without single flight across "
                            "processes until it can", key, disk_trouble(e) or e.strerror or type(e).__name__)
            self._locks_refused = True
            return None

    async def _run(self, flight: Flight, claim: Lead | Watch | None) -> None:
        """Follow the process that leads key's fetch until the flight ends or this one must lead
        (the leader died, or ended without a commit before a byte was sent), then lead it; whatever
        goes wrong, the flight ends (its readers are never left waiting)."""
        try:
            while isinstance(claim, Watch):
                outcome = await Follow(flight, claim, self._store).run()
                if outcome is Next.ENDED:
                    return
                claim = self._claim(flight.key) if outcome is Next.START_OVER else \
                    None if outcome is Next.ON_OUR_OWN else outcome
            try:
                await self._lead(flight, claim)
            except asyncio.CancelledError:
                if claim is not None and claim.described:
                    claim.abandon()  # stopping mid-fetch: a follower elsewhere takes it over, as from a crash
                raise
            finally:
                if claim is not None:
                    claim.end()
        except asyncio.CancelledError:
            if isinstance(claim, Watch):
                claim.close()
            self._end_unless_ended(flight, FetchFailed(503, "hubproxy is shutting down"))
            raise
        except Exception as e:  # a bug or a disk error must still end every reader's stream
            log.exception("the flight of %s crashed", flight.key)
            self._end_unless_ended(flight, FetchFailed(500, f"internal error while fetching: {type(e).__name__}"))

    async def _lead(self, flight: Flight, lead: Lead | None) -> None:
        """Fetch key (lead: holding its lock), going on from a dead leader's temp file if it left one."""
        if lead is not None and (entry := await asyncio.to_thread(committed_entry, self._store, flight.key)):
            await end_with(flight, self._store, entry)  # another process stored it since the caller looked
            return
        partial = None if lead is None else Partial.from_record(lead.record(), self._store)
        if partial is None and flight.state is not State.CONNECTING:  # its readers have bytes of that file
            flight.ended(State.FAILED, error=FetchFailed(502, f"the fetch of {flight.key} by a hubproxy process "
                                                              "that died left nothing to go on from"))
            return
        self._metrics.flights_in_progress.inc()  # upstream fetches: a flight that follows another process's is none
        await Ingest(flight, self._store, self._upstream, self.health, lead=lead, partial=partial,
                     on_resume=lambda reason: self._metrics.upstream_resumes.labels(reason).inc()).run()

    @staticmethod
    def _end_unless_ended(flight: Flight, error: FetchFailed) -> None:
        if flight.state not in ENDED:
            flight.ended(State.FAILED, error=error)

    def _ended(self, flight: Flight) -> None:
        self._tasks.pop(flight, None)
        if self._active.get(flight.key) is flight:
            del self._active[flight.key]
        if not flight.fetched_here:
            return  # followed from another process, which counts its own fetch
        self._metrics.flights_in_progress.dec()
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
