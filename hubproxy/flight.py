"""Single flight per key: one upstream fetch into a growing temp file that any number of readers tail.

Invariants: at most one fetch per key at a time, and it runs to the end even if every reader
leaves; an entry is committed only when the byte count and every checksum the origin gave match;
readers never receive the final HOLDBACK bytes of an archive before it is verified, so a bad
fetch always ends their stream short of a complete archive. When the disk refuses the bytes
(full, read-only) the fetch goes on in memory for the readers it has, paced by the slowest, and
stores nothing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import functools
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import AsyncIterator, BinaryIO, Callable

import aiohttp
import google_crc32c

from .handles import strip_query
from .metrics import Metrics
from .store import Entry, Store, disk_trouble
from .upstream import Evidence, Upstream, UpstreamError
from .window import Window
from .writehealth import WriteHealth

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
MIN_SPAN = 8 * 1024 * 1024
MAX_SPAN_DELAY = 0.05  # seconds
MAX_PENDING_CHUNKS = 4  # received but not yet written and hashed: bounds memory per flight
# The tar end-of-archive marker is encoded in the last few hundred bytes of a .tar.gz; while a
# reader lacks them, tensorflow_hub cannot finish extracting, so it fails if we then hang up.
HOLDBACK = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
# In pass-through, what one fetch may hold in memory for its slowest reader (> HOLDBACK + a batch).
PASS_THROUGH_LIMIT = 16 * 1024 * 1024


class FlightFailed(Exception):
    """The fetch failed; `status` is what a client that has not yet had headers should see."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class State(enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    COMMITTED = "committed"
    PASSED = "passed through"  # verified and delivered, but the cache could not store it
    FAILED = "failed"


VERIFIED = (State.COMMITTED, State.PASSED)
ENDED = (State.COMMITTED, State.PASSED, State.FAILED)


class Digests:
    """sha256 always (it names the blob); the origin's crc32c when given, else its md5.

    Either catches transfer corruption; crc32c runs at ~15 GB/s where md5 manages ~0.8 GB/s,
    which would make md5 the slowest step of every miss.
    """

    def __init__(self, evidence: Evidence):
        self.sha256 = hashlib.sha256()
        self.crc32c = google_crc32c.Checksum() if evidence.crc32c is not None else None
        wants_md5 = evidence.md5 is not None and self.crc32c is None
        self.md5 = hashlib.md5(usedforsecurity=False) if wants_md5 else None

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        if self.crc32c is not None:
            self.crc32c.update(data)

    def update_all(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.update(piece)

    def mismatch(self, evidence: Evidence) -> str | None:
        if self.md5 is not None and self.md5.digest() != evidence.md5:
            return "md5"
        if self.crc32c is not None and int.from_bytes(self.crc32c.digest(), "big") != evidence.crc32c:
            return "crc32c"
        return None


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


class Flight:
    def __init__(self, key: str, url: str, store: Store, upstream: Upstream, health: WriteHealth,
                 on_done: Callable[["Flight"], None]):
        self.key = key
        self.url = url
        self.state = State.CONNECTING
        self.evidence: Evidence | None = None
        self.entry: Entry | None = None
        self.error: FlightFailed | None = None
        self.written = 0  # bytes [0, written) are in the temp file
        self._store = store
        self._upstream = upstream
        self._health = health
        self._on_done = on_done
        self._readers = 0
        self._streamers = 0  # readers that will follow spans(), as opposed to waiting for the end
        self._positions: dict[object, int] = {}  # each running spans() → the offset it has sent up to
        self._window: Window | None = None  # the bytes past `written`, once the disk refused them
        self._disk_failed = False
        self._read_fd: int | None = None
        self._temp: Path | None = None
        self.started = asyncio.get_running_loop().time()
        self._wave = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"flight {key}")

    # -- readers ---------------------------------------------------------------------------

    @property
    def received(self) -> int:
        """Archive bytes received so far (on disk, or past `written` in the window)."""
        return self.written if self._window is None else self._window.end

    @property
    def joinable(self) -> bool:
        """A new reader can still get every byte (pass-through drops what its readers have sent)."""
        return self._window is None or self._window.start == self.written

    def attach(self, streaming: bool) -> None:
        self._readers += 1
        self._streamers += streaming

    def detach(self, streaming: bool) -> None:
        self._readers -= 1
        self._streamers -= streaming
        self._release_window()
        self._close_read_fd_if_unused()

    async def ready(self) -> None:
        """Return once bytes are flowing (headers for clients are known), or raise FlightFailed."""
        while self.state is State.CONNECTING:
            await asyncio.shield(self._wave)
        if self.state is State.FAILED:
            raise self.error

    async def spans(self, offset: int = 0) -> AsyncIterator[tuple[int, int, list[memoryview] | None]]:
        """(start, length, data) of archive bytes as they become safe to send; raises FlightFailed.
        `data` is None for bytes in the file (send them from open_file()), else the bytes themselves.

        Spans are coalesced: one sendfile (and one wake-up) per MiB per reader would spend the
        event loop when many clients follow a fetch, so a reader woken by new bytes sends at once
        only when MIN_SPAN are ready, and otherwise sleeps until MAX_SPAN_DELAY has passed since
        its last send, then sends what is ready."""
        me = object()
        self._positions[me] = offset
        try:
            await self.ready()
            loop = asyncio.get_running_loop()
            last_send = -math.inf
            while True:
                limit = self._sendable()
                ready = limit - offset
                overdue = loop.time() - last_send >= MAX_SPAN_DELAY
                if ready > 0 and (ready >= MIN_SPAN or overdue or self.state is not State.STREAMING):
                    span = self._span(offset, limit)
                    yield span
                    offset, last_send = offset + span[1], loop.time()
                    self._positions[me] = offset
                    self._release_window()
                elif self.state in VERIFIED:
                    return
                elif self.state is State.FAILED:
                    raise self.error
                elif ready > 0:  # sleep out the delay: waking for every MiB that lands costs more
                    await asyncio.sleep(last_send + MAX_SPAN_DELAY - loop.time())
                else:
                    await asyncio.shield(self._wave)
        finally:
            del self._positions[me]
            self._release_window()

    def open_file(self) -> BinaryIO | None:
        """A private read-only file object on the archive (for sendfile), None when the disk took
        none of it; needs ready(); caller closes."""
        if self._read_fd is None:
            return None
        return os.fdopen(os.dup(self._read_fd), "rb", buffering=0)

    async def finished(self) -> Entry:
        """Wait for the fetch to end: its committed entry, or FlightFailed."""
        while self.state not in ENDED:
            await asyncio.shield(self._wave)
        if self.state is State.FAILED:
            raise self.error
        if self.state is State.PASSED:
            raise FlightFailed(503, f"{self.key} was fetched and verified, but the cache cannot store it now")
        return self.entry

    def _sendable(self) -> int:
        if self.state in VERIFIED:
            return self.received
        if self.state is State.STREAMING:
            return max(0, self.received - HOLDBACK)
        return 0

    def _span(self, offset: int, limit: int) -> tuple[int, int, list[memoryview] | None]:
        """The next span from offset: from the file up to `written`, from the window after it."""
        if self._window is None or limit <= self.written:
            return offset, limit - offset, None
        if offset < self.written:
            return offset, self.written - offset, None
        return offset, limit - offset, self._window.read(offset, limit - offset)

    def _release_window(self) -> None:
        """Let the window drop what every streaming reader has sent (all of it when none is left)."""
        if self._window is None or len(self._positions) < self._streamers:
            return  # an attached reader has not started yet: it will need the bytes from its start
        self._window.drop_before(min(self._positions.values(), default=self._window.end))

    def _notify(self) -> None:
        wave, self._wave = self._wave, asyncio.get_running_loop().create_future()
        wave.set_result(None)

    def _close_read_fd_if_unused(self) -> None:
        if self._readers == 0 and self.state in ENDED and self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    # -- the fetch -------------------------------------------------------------------------

    async def _run(self) -> None:
        write_fd = None
        try:
            response = await self._upstream.open(self.url)
            with contextlib.closing(response):
                source = strip_query(str(response.url))  # the final hop, without its signature
                self.evidence = Evidence.from_headers(response.headers)
                _refuse_unverifiable(self.evidence)
                write_fd = self._open_temp()
                digests = Digests(self.evidence)
                await self._stream(response, write_fd, digests)
            if write_fd is not None:
                os.close(write_fd)
                write_fd = None
            self._check(digests)
            if self._window is None:
                await self._commit(digests.sha256.hexdigest(), source)
            if self.entry is not None:
                self.state = State.COMMITTED
                log.info("committed %s: %d bytes, sha256 %s", self.key, self.written, self.entry.sha256)
            else:
                self.state = State.PASSED
                log.info("delivered %s (%s) without storing it", self.key, digests.sha256.hexdigest())
        except UpstreamError as e:
            self._fail(FlightFailed(e.status, e.message))
        except FlightFailed as e:
            self._fail(e)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self._fail(FlightFailed(502, f"upstream transfer broke after {self.received} bytes: {type(e).__name__}"))
        except asyncio.CancelledError:
            self._fail(FlightFailed(503, "hubproxy is shutting down"))
            raise
        except Exception as e:  # a bug or a disk error must still end every reader's stream
            log.exception("flight %s crashed", self.key)
            self._fail(FlightFailed(500, f"internal error while fetching: {type(e).__name__}"))
        finally:
            if write_fd is not None:
                os.close(write_fd)
            if self.state is not State.COMMITTED and self._temp is not None:
                with contextlib.suppress(OSError):  # a read-only disk keeps it until clear_temp at start
                    self._store.discard(self._temp)
            self._on_done(self)
            self._notify()
            self._close_read_fd_if_unused()

    def _open_temp(self) -> int | None:
        """The temp file's write descriptor, or None (pass-through) when the disk refuses one."""
        try:
            write_fd, self._temp = self._store.new_temp_file()
        except OSError as e:
            if (reason := disk_trouble(e)) is None:
                raise
            self._pass_through(reason, at=0, batches=())
            return None
        self._read_fd = os.open(self._temp, os.O_RDONLY)
        return write_fd

    async def _commit(self, sha256: str, source: str) -> None:
        try:
            self.entry = await asyncio.to_thread(
                self._store.commit, self.key, self._temp, sha256, self.written,
                etag=self.evidence.etag, content_type=self.evidence.content_type, source=source)
        except Exception as e:
            if (reason := disk_trouble(e)) is None:
                raise
            self._health.failed(reason, f"committing {self.key}")
        else:
            self._health.succeeded()

    async def _stream(self, response: aiohttp.ClientResponse, write_fd: int | None, digests: Digests) -> None:
        """Receive on the event loop while one thread writes and another hashes earlier chunks
        (each single-threaded, so in order); readers are woken as each chunk reaches the file,
        or the window once the disk has refused a write."""
        loop = asyncio.get_running_loop()
        pending: collections.deque[_Batch] = collections.deque()
        received = 0
        with _single_thread("hubproxy-writer") as writer, _single_thread("hubproxy-hasher") as hasher:
            try:
                async for pieces in _batches(response.content, CHUNK_SIZE):
                    if self.state is State.CONNECTING:
                        if not b"".join(pieces[:2]).startswith(GZIP_MAGIC):
                            raise FlightFailed(502, "upstream did not send a gzip archive")
                        self.state = State.STREAMING
                    batch = _Batch(received, pieces, loop.run_in_executor(hasher, digests.update_all, pieces))
                    received += batch.size
                    pending.append(batch)
                    if self._window is None:
                        batch.write = loop.run_in_executor(writer, _write_all, write_fd, pieces)
                        batch.write.add_done_callback(functools.partial(self._on_written, received))
                    else:
                        await self._hold(pieces)
                    while len(pending) > MAX_PENDING_CHUNKS:
                        await self._settle(pending)
                while pending:
                    await self._settle(pending)
            finally:
                for batch in pending:
                    batch.cancel()
        if self._window is None:
            self._advance(received)  # the last callbacks may not have run yet
        if self.state is State.CONNECTING:
            raise FlightFailed(502, "upstream sent an empty body")

    async def _settle(self, pending: collections.deque[_Batch]) -> None:
        """Wait for the oldest batch to be hashed and written; a write the disk refuses turns the
        fetch into pass-through from that batch on."""
        batch = pending[0]
        await batch.hashed
        if batch.write is not None:
            try:
                await batch.write
            except OSError as e:
                if (reason := disk_trouble(e)) is None:
                    raise
                self._pass_through(reason, at=batch.start, batches=pending)
                self._require_streamers()
        pending.popleft()

    def _pass_through(self, reason: str, at: int, batches) -> None:
        """The disk refused bytes from `at` on: keep them (and later ones) in memory instead."""
        self._health.failed(reason, f"fetching {self.key}")
        self._window = Window(at, PASS_THROUGH_LIMIT)
        for batch in batches:
            if batch.write is not None:
                batch.write.cancel()
                batch.write = None
            self._window.append(batch.pieces)
        self._notify()

    async def _hold(self, pieces: list[bytes]) -> None:
        self._window.append(pieces)
        self._notify()
        self._release_window()
        self._require_streamers()
        await self._window.wait_for_room()

    def _require_streamers(self) -> None:
        if self._streamers == 0:
            raise FlightFailed(503, f"the cache cannot store {self.key} now and no client is left to stream it to")

    def _on_written(self, end: int, write: asyncio.Future) -> None:
        if write.cancelled() or write.exception() is not None:
            self._disk_failed = True  # later writes land after a short one: never trust them
        elif not self._disk_failed:
            self._advance(end)

    def _advance(self, end: int) -> None:
        """Bytes [0, end) are on disk: wake the readers."""
        if end > self.written:
            self.written = end
            self._notify()

    def _check(self, digests: Digests) -> None:
        expected = self.evidence.content_length
        if expected is not None and self.received != expected:
            raise FlightFailed(502, f"upstream sent {self.received} of {expected} bytes")
        bad = digests.mismatch(self.evidence)
        if bad:
            raise FlightFailed(502, f"upstream bytes do not match its own {bad} checksum")

    def _fail(self, error: FlightFailed) -> None:
        self.state = State.FAILED
        self.error = error
        log.warning("fetch of %s failed: %s", self.key, error.message)


def _refuse_unverifiable(evidence: Evidence) -> None:
    if evidence.content_type.split(";")[0].strip().lower() == "text/html":
        raise FlightFailed(502, "upstream answered with an HTML page, not a model archive")
    if evidence.content_length is None and evidence.md5 is None and evidence.crc32c is None:
        raise FlightFailed(502, "upstream gave neither Content-Length nor a checksum; refusing to vouch for it")


async def _batches(content: aiohttp.StreamReader, size: int) -> AsyncIterator[list[bytes]]:
    """The body as lists of received pieces totalling about `size` bytes: few thread hand-offs
    per GB, and no copy to join them."""
    batch: list[bytes] = []
    filled = 0
    while piece := await content.readany():
        batch.append(piece)
        filled += len(piece)
        if filled >= size:
            yield batch
            batch, filled = [], 0
    if batch:
        yield batch


def _single_thread(name: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)


def _write_all(fd: int, pieces: list[bytes]) -> None:
    views = [memoryview(piece) for piece in pieces]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


class Flights:
    """The registry of fetches under way, keyed by cache key."""

    def __init__(self, store: Store, upstream: Upstream, metrics: Metrics, health: WriteHealth | None = None):
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self.health = health or WriteHealth(metrics, store.root)
        self._active: dict[str, Flight] = {}  # the flight a newcomer for the key joins
        self._running: set[Flight] = set()  # including pass-through flights no newcomer can join
        self.on_commit: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._active)

    def keys(self) -> set[str]:
        """Keys being fetched right now (never to be evicted or purged)."""
        return set(self._active)

    @contextlib.asynccontextmanager
    async def join(self, key: str, url: str, *, streaming: bool = True) -> AsyncIterator[tuple[Flight, bool]]:
        """Attach to the fetch for key, starting it if none runs (or the running one can no longer
        give a newcomer every byte); yields (flight, joined_existing). A streaming reader must
        follow flight.spans(); others wait for flight.finished()."""
        flight = self._active.get(key)
        joined = flight is not None and flight.joinable
        if not joined:
            flight = Flight(key, url, self._store, self._upstream, self.health, on_done=self._finished)
            self._active[key] = flight
            self._running.add(flight)
            self._metrics.flights_in_progress.inc()
        flight.attach(streaming)
        self._metrics.flight_readers.inc()
        try:
            yield flight, joined
        finally:
            flight.detach(streaming)
            self._metrics.flight_readers.dec()

    def _finished(self, flight: Flight) -> None:
        self._metrics.flights_in_progress.dec()
        self._running.discard(flight)
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
        tasks = [flight._task for flight in self._running]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
