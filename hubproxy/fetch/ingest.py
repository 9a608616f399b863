"""The ingest of one flight: upstream bytes received on the event loop (one body across cuts and
stalls, resume.py), hashed in one thread and written to the temp file in another (around the page
cache where the filesystem allows: cache/appender.py), checked against the origin's evidence, then
committed.

Invariants: an entry is committed only when the byte count and every checksum the origin gave
match (an archive it gave none for must prove itself sound: fetch/archive_integrity.py); at most
MAX_PENDING_BATCHES received batches wait for the hasher and the writer, which bounds memory;
when the disk refuses the bytes (full, read-only) the fetch goes on in memory for the readers it
has, paced by the slowest, and stores nothing; every ending reaches the flight.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp

from ..cache.appender import Appender
from ..cache.diskhealth import WriteHealth, disk_trouble
from ..cache.flightlocks import Lead
from ..cache.store import Store
from ..handles import strip_query
from .errors import FetchFailed
from .evidence import Digests, Evidence, check_archive_start, check_complete, refuse_unverifiable
from .flight import Flight, State
from .follow import Partial, describe
from .resume import ResumableBody, resume_from
from .upstream import Upstream

log = logging.getLogger(__name__)

BATCH_SIZE = 1024 * 1024
BATCH_WAIT_SECONDS = 0.05  # as the readers' span delay: a paused origin still streams what it sent
MAX_PENDING_BATCHES = 4
# In pass-through, what one fetch may hold in memory for its slowest reader (> HOLDBACK + a batch).
PASS_THROUGH_LIMIT = 16 * 1024 * 1024


class _Batch:
    """Received pieces on their way to the hasher and the disk."""

    def __init__(self, start: int, pieces: list[bytes], hashed: asyncio.Future):
        self.start, self.pieces, self.hashed = start, pieces, hashed
        self.size = sum(map(len, pieces))
        self.write: asyncio.Future | None = None

    def cancel(self) -> None:
        for future in (self.hashed, self.write):
            if future is not None:
                future.cancel()


class Ingest:
    def __init__(self, flight: Flight, store: Store, upstream: Upstream, health: WriteHealth,
                 on_resume: Callable[[str], None] | None = None, lead: Lead | None = None,
                 partial: Partial | None = None):
        """lead: this process holds the key's lock (other processes follow what it describes);
        partial: the fetch of a leader that died, to go on with (its temp file, then the rest)."""
        self._on_resume = on_resume
        self._flight = flight
        self._store = store
        self._upstream = upstream
        self._health = health
        self._lead, self._partial = lead, partial
        self._temp: Path | None = None
        self._write_fd: int | None = None
        self._disk_failed = False
        self._stopped = False  # cancelled: this process is stopping

    async def run(self) -> None:
        flight = self._flight
        flight.fetched_here = True
        state, entry, error = State.FAILED, None, None
        try:
            body, digests, source = await (self._begin() if self._partial is None else self._go_on(self._partial))
            with contextlib.closing(body):
                await self._stream(body, self._write_fd, digests, start=flight.received)
            # the write fd stays open (and so the temp file locked) until the commit has renamed it
            check_complete(flight.evidence, flight.received, digests)
            if flight.window is None:
                entry = await self._commit(digests.sha256.hexdigest(), source)
            if entry is not None:
                state = State.COMMITTED
                log.info("committed %s: %d bytes, sha256 %s", flight.key, flight.written, entry.sha256)
            else:
                state = State.PASSED
                log.info("delivered %s (%s) without storing it", flight.key, digests.sha256.hexdigest())
        except FetchFailed as e:
            error = e
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            error = FetchFailed(502, f"upstream transfer broke after {flight.received} bytes: {type(e).__name__}")
        except asyncio.CancelledError:
            error = FetchFailed(503, "hubproxy is shutting down")
            self._stopped = True
            raise
        except Exception as e:  # a bug or a disk error must still end every reader's stream
            log.exception("flight %s crashed", flight.key)
            error = FetchFailed(500, f"internal error while fetching: {type(e).__name__}")
        finally:
            if self._write_fd is not None:
                os.close(self._write_fd)
            if state is not State.COMMITTED and self._temp is not None and not self._left_to_a_successor():
                with contextlib.suppress(OSError):  # a read-only disk keeps it until clear_temp at start
                    self._store.discard(self._temp)
            if error is not None:
                log.warning("fetch of %s failed: %s", flight.key, error.message)
            flight.ended(state, entry, error)

    def _left_to_a_successor(self) -> bool:
        """Stopping mid-fetch (cancelled) with other processes told of the temp file: it stays, for
        one of them to take the fetch over (flights.py abandons the lock as a dead process would)."""
        return self._stopped and self._lead is not None and self._lead.described

    async def _begin(self) -> tuple[ResumableBody, Digests, str]:
        """Ask upstream; once its answer may be vouched for, open the temp file and describe the
        fetch for other processes. Returns (body, digests to fill, the final URL without its query)."""
        flight = self._flight
        response = await self._upstream.open(flight.url, json=flight.post_json)
        flight.evidence = Evidence.from_headers(response.headers)
        body = ResumableBody(self._upstream, response, flight.evidence, flight.url, flight.post_json, self._on_resume)
        source = strip_query(str(response.url))  # the final hop, without its signature
        try:
            refuse_unverifiable(flight.evidence, archive=flight.archive, framed=self._upstream.is_parent(response.url))
            self._write_fd = self._open_temp()
        except BaseException:
            body.close()
            raise
        if self._lead is not None and self._temp is not None:
            self._lead.describe(describe(self._temp.name, response.headers, source))
        return body, Digests(flight.evidence, archive=flight.archive), source

    async def _go_on(self, partial: Partial) -> tuple[ResumableBody, Digests, str]:
        """Take over a dead leader's fetch: its temp file (hashed again from the start), then the
        rest from upstream with Range + If-Match, so its followers' readers go on undisturbed."""
        flight = self._flight
        try:
            if flight.state is State.CONNECTING:
                flight.readers_follow(partial.temp)
            self._write_fd = self._store.reopen_temp(partial.temp)
        except OSError:
            if flight.state is not State.CONNECTING:
                raise FetchFailed(502, f"the fetch of {flight.key} by a hubproxy process that died left no file "
                                       "to go on from") from None
            return await self._begin()  # no reader has a byte of it: begin afresh
        self._temp, flight.evidence = partial.temp, partial.evidence
        digests = Digests(partial.evidence, archive=flight.archive)
        with flight.open_file() as archive:
            have = await asyncio.to_thread(digests.update_from, archive)
        log.warning("taking over the fetch of %s from a hubproxy process that died, at byte %d", flight.key, have)
        if flight.state is State.CONNECTING:
            flight.streaming()
        flight.advance(have)
        body = await resume_from(self._upstream, flight, partial.final, have, self._on_resume)
        return body, digests, partial.final

    def _open_temp(self) -> int | None:
        """The temp file's write descriptor, or None (pass-through) when the disk refuses one."""
        try:
            write_fd, self._temp = self._store.new_temp_file()
        except OSError as e:
            if (reason := disk_trouble(e)) is None:
                raise
            self._pass_through(reason, at=0, batches=())
            return None
        self._flight.readers_follow(self._temp)
        return write_fd

    async def _commit(self, sha256: str, source: str):
        flight = self._flight
        try:
            entry = await asyncio.to_thread(
                self._store.commit, flight.key, self._temp, sha256, flight.written,
                etag=flight.evidence.etag, content_type=flight.evidence.content_type, source=source)
        except Exception as e:
            if (reason := disk_trouble(e)) is None:
                raise
            self._health.failed(reason, f"committing {flight.key}")
            return None
        self._health.succeeded()
        return entry

    async def _stream(self, body: ResumableBody, write_fd: int | None, digests: Digests, start: int = 0) -> None:
        """Receive on the event loop while one thread writes and another hashes earlier batches
        (each single-threaded, so in order); readers are woken as each batch reaches the file,
        or the window once the disk has refused a write."""
        flight, loop = self._flight, asyncio.get_running_loop()
        pending: collections.deque[_Batch] = collections.deque()
        received = start
        appender = None if write_fd is None else Appender(write_fd, start)
        if appender is not None:
            flight.keep_recent(start)
        with _single_thread("hubproxy-writer") as writer, _single_thread("hubproxy-hasher") as hasher:
            try:
                async for pieces in _batches(body, BATCH_SIZE):
                    if flight.state is State.CONNECTING:
                        if flight.archive:
                            check_archive_start(b"".join(pieces[:2]))
                        flight.streaming()
                    batch = _Batch(received, pieces, loop.run_in_executor(hasher, digests.update_all, pieces))
                    received += batch.size
                    pending.append(batch)
                    if flight.window is None:
                        flight.arrived(pieces)
                        batch.write = loop.run_in_executor(writer, appender.append, pieces)
                        batch.write.add_done_callback(functools.partial(self._on_written, batch, pending))
                    else:
                        await self._hold(pieces)
                    while len(pending) > MAX_PENDING_BATCHES:
                        await self._settle(pending)
                while pending:
                    await self._settle(pending)
            finally:
                for batch in pending:
                    batch.cancel()
        if flight.window is None:
            flight.advance(received)  # the last callbacks may not have run yet
        if flight.state is State.CONNECTING:
            if flight.archive:
                raise FetchFailed(502, "upstream sent an empty body")
            flight.streaming()  # an empty file, which its length and checksum vouch for

    async def _settle(self, pending: collections.deque[_Batch]) -> None:
        """Wait for the oldest batch to be hashed and written; a write the disk refused has already
        turned the fetch into pass-through (_on_written), which needs a reader to stream to."""
        batch = pending[0]
        await batch.hashed
        if batch.write is not None:
            try:
                await batch.write
            except OSError as e:
                if disk_trouble(e) is None:
                    raise
                self._disk_refused(batch, pending, e)  # its done callback may not have run yet
        if self._flight.window is not None:
            self._require_streamers()
        pending.popleft()

    def _pass_through(self, reason: str, at: int, batches) -> None:
        """The disk refused bytes from `at` on: keep them (and later ones) in memory instead. A cache
        opened read-only refuses by design, which is no disk failure to report."""
        if not self._store.read_only:
            self._health.failed(reason, f"fetching {self._flight.key}")
        if self._lead is not None:
            self._lead.passing()  # other processes cannot tail memory: they fetch on their own
        window = self._flight.hold_in_memory(at, PASS_THROUGH_LIMIT)
        for batch in batches:
            if batch.write is not None:
                batch.write.cancel()
                batch.write = None
            window.append(batch.pieces)
        self._flight.release_window()  # readers may be past these bytes already (sent from the recent ones)
        self._flight.notify()

    async def _hold(self, pieces: list[bytes]) -> None:
        flight = self._flight
        flight.window.append(pieces)
        flight.notify()
        flight.release_window()
        self._require_streamers()
        await flight.window.wait_for_room()

    def _require_streamers(self) -> None:
        if self._flight.streamers == 0:
            raise FetchFailed(503, f"the cache cannot store {self._flight.key} now and no client is left "
                                   "to stream it to")

    def _on_written(self, batch: _Batch, pending: collections.deque[_Batch], write: asyncio.Future) -> None:
        """Readers follow each batch that reaches the file. The first batch the disk refuses turns the
        fetch into pass-through at once: waiting until that batch is settled would keep the bytes
        already in memory from the readers for as long as the origin takes to send
        MAX_PENDING_BATCHES more (all the while it pauses)."""
        if not write.cancelled() and write.exception() is None:
            if not self._disk_failed:
                self._flight.advance(batch.start + batch.size)
            return
        self._disk_refused(batch, pending, None if write.cancelled() else write.exception())

    def _disk_refused(self, batch: _Batch, pending: collections.deque[_Batch], error: BaseException | None) -> None:
        """batch's write failed: from its first byte on, the fetch passes through (once, whichever
        of the done callback and _settle sees the failure first)."""
        self._disk_failed = True  # later writes land after a short one: never trust them
        reason = None if error is None else disk_trouble(error)
        if reason is not None and self._flight.window is None and self._flight.state is State.STREAMING:
            self._pass_through(reason, at=batch.start, batches=itertools.dropwhile(lambda b: b is not batch, pending))


async def _batches(content: ResumableBody, size: int) -> AsyncIterator[list[bytes]]:
    """The body as lists of received pieces totalling about `size` bytes: few thread hand-offs
    per GB, and no copy to join them. A batch is never held back waiting to fill: when the origin
    pauses or trickles, what arrived goes on after BATCH_WAIT_SECONDS, so readers are not kept
    from bytes already here (the wait is armed only when nothing more is buffered)."""
    batch: list[bytes] = []
    filled = 0
    while True:
        piece = content.read_nowait(size - filled) if batch else b""
        if not piece:
            piece = await (_readany_within(content, BATCH_WAIT_SECONDS) if batch else content.readany())
        if piece is None:  # nothing more came in time: send on what is here
            yield batch
            batch, filled = [], 0
            continue
        if not piece:
            break
        batch.append(piece)
        filled += len(piece)
        if filled >= size:
            yield batch
            batch, filled = [], 0
    if batch:
        yield batch


async def _readany_within(content: ResumableBody, seconds: float) -> bytes | None:
    try:
        async with asyncio.timeout(seconds):
            return await content.readany()
    except TimeoutError:
        return None


def _single_thread(name: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

