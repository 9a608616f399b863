"""Following another process's fetch of a key (its lock held, cache/flightlocks.py): the leader's
growing temp file is tailed into a local Flight, whose readers it feeds as if it were fetched here.

Invariants: the readers get the final HOLDBACK bytes only once the leader's entry is in the index
and the file they read is that entry's blob (same inode, or the same sha256); a leader that ends
without a commit fails the readers that may have bytes (a cut, never a clean end), and lets the
others start over; a leader that died is taken over (its lock, then its temp file); nothing here
writes to the cache but the flight lock it takes from a dead leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from multidict import CIMultiDict

from ..cache.flightlocks import Lead, Watch
from ..cache.store import Entry, Store
from .errors import FetchFailed
from .evidence import Evidence
from .flight import Flight, State

POLL_SECONDS = 0.02  # how often the leader's file and lock are looked at (a stat and a flock each)
# The origin's headers a follower needs to answer its clients and a taker-over to go on verifying.
DESCRIBED_HEADERS = ("Content-Length", "ETag", "x-goog-hash", "Repr-Digest", "Content-Type", "Content-Encoding")


class Next(enum.Enum):
    ENDED = "ended"  # the flight has its verdict: committed here, or failed
    START_OVER = "start over"  # the leader ended without a commit before any byte was sent: try again
    ON_OUR_OWN = "on our own"  # the leader cannot share (it passes the archive through memory): fetch alone


@dataclass(frozen=True)
class Partial:
    """A leader's fetch as it describes it: its temp file, the origin's evidence, the final URL
    (what a follower tails, and what a process that takes over from a dead leader goes on with)."""
    temp: Path
    evidence: Evidence
    final: str

    @classmethod
    def from_record(cls, record: dict | None, store: Store) -> "Partial | None":
        if record is None:
            return None
        try:
            temp = store.temp_named(str(record.get("temp")))
            evidence = Evidence.from_headers(CIMultiDict(record.get("headers") or []))
        except (ValueError, TypeError):
            return None
        return cls(temp, evidence, str(record.get("final")))


def describe(temp_name: str, headers, final: str) -> dict:
    """What a leader publishes once its body flows (no query string: final is stripped of it)."""
    return {"temp": temp_name, "final": final,
            "headers": [[name, value] for name in DESCRIBED_HEADERS for value in headers.getall(name, [])]}


class Follow:
    """Drives flight from the leader watched by `watch` until the flight ends, the leader is gone,
    or this process must fetch on its own; run() says which, and hands over a taken lock."""

    def __init__(self, flight: Flight, watch: Watch, store: Store):
        self._flight, self._watch, self._store = flight, watch, store

    async def run(self) -> Next | Lead:
        """ENDED, START_OVER, ON_OUR_OWN, or the lock of a leader that died (its description kept)."""
        try:
            return await self._follow()
        finally:
            self._watch.close()

    async def _follow(self) -> Next | Lead:
        flight = self._flight
        while True:
            gone = self._watch.leader_gone()
            if gone:
                return await self._leader_gone(gone)
            if flight.state is State.CONNECTING:
                if self._watch.passing():
                    return Next.ON_OUR_OWN
                self._start_tailing(Partial.from_record(self._watch.record(), self._store))
            else:
                flight.advance(flight.on_disk())
            await asyncio.sleep(POLL_SECONDS)

    def _start_tailing(self, partial: Partial | None) -> None:
        """Once the leader's temp file holds bytes, the readers follow it (until then, no reader has
        a byte: a leader that fails on its first ones lets them start over rather than cuts them)."""
        flight = self._flight
        if partial is None:
            return
        if flight.temp_path != partial.temp:
            try:
                flight.readers_follow(partial.temp)
            except FileNotFoundError:
                return
        if flight.on_disk() > 0:
            flight.evidence = partial.evidence
            flight.streaming()

    async def _leader_gone(self, gone: Lead | bool) -> Next | Lead:
        """The leader let go: its entry (ours to serve), or its lock (it died: ours to go on with)."""
        flight = self._flight
        flight.advance(flight.on_disk() if flight.state is State.STREAMING else 0)
        entry = await asyncio.to_thread(committed_entry, self._store, flight.key)
        if entry is not None:
            if isinstance(gone, Lead):
                gone.end()  # the leader died after its commit, before it could clear its lock
            await end_with(flight, self._store, entry)
            return Next.ENDED
        if isinstance(gone, Lead):
            return gone  # it died: whoever holds its lock goes on with its temp file
        if flight.state is State.CONNECTING:  # it failed before any reader had a byte: begin afresh
            return Next.START_OVER
        flight.ended(State.FAILED, error=FetchFailed(502, f"the fetch of {flight.key} by another hubproxy process on "
                                                          "this cache failed"))
        return Next.ENDED


def committed_entry(store: Store, key: str) -> Entry | None:
    """key's entry as the index has it now (another process may have just committed it)."""
    store.forget(key)
    return store.lookup(key)


async def end_with(flight: Flight, store: Store, entry: Entry) -> None:
    """Another process committed entry: the readers go on to its end from the bytes they began on
    (or, none begun, from the blob)."""
    if flight.state is State.CONNECTING:
        try:
            flight.readers_follow(store.blob_path(entry.sha256))
        except FileNotFoundError:
            flight.ended(State.FAILED, error=FetchFailed(503, f"{flight.key} was purged as it was committed; "
                                                              "ask again"))
            return
        flight.evidence = Evidence(entry.size, None, None, entry.etag, entry.content_type)
        flight.streaming()
    elif not await asyncio.to_thread(_is_blob_of, flight, store, entry):
        flight.ended(State.FAILED, error=FetchFailed(502, f"{flight.key} was stored from other bytes than those "
                                                          "followed; ask again"))
        return
    flight.advance(entry.size)
    flight.ended(State.COMMITTED, entry)


def _is_blob_of(flight: Flight, store: Store, entry: Entry) -> bool:
    """Whether the file the readers follow holds exactly entry's blob: the renamed temp file itself
    (the usual case), else the same bytes."""
    with contextlib.suppress(FileNotFoundError):
        if flight.same_file(store.blob_path(entry.sha256)):
            return True
    with flight.open_file() as archive:
        return os.fstat(archive.fileno()).st_size == entry.size and \
            hashlib.file_digest(archive, "sha256").hexdigest() == entry.sha256
