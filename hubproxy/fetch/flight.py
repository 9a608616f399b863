"""One fetch under way and the readers that tail it: a growing temp file, whose last RECENT bytes
received are also kept in memory (or, when the disk refuses it, a window in memory), that any
number of readers follow as the bytes become safe to send.

Invariants: readers never receive the final HOLDBACK bytes of an archive before it is verified, so
a bad fetch always ends their stream short of a complete archive; recent bytes leave memory only
once on disk; in pass-through, the window only lets go of bytes every streaming reader has sent;
the ingest (ingest.py) is the only writer of the state here, and every change of it wakes readers.
"""

from __future__ import annotations

import asyncio
import enum
import math
import os
from typing import AsyncIterator, BinaryIO, Callable

from ..cache.store import Entry
from .errors import FetchFailed
from .evidence import Evidence
from .window import Window

MIN_SPAN = 8 * 1024 * 1024
MAX_SPAN_DELAY = 0.05  # seconds
# The tar end-of-archive marker is encoded in the last few hundred bytes of a .tar.gz; while a
# reader lacks them, tensorflow_hub cannot finish extracting, so it fails if we then hang up.
HOLDBACK = 1024 * 1024
# What a fetch keeps in memory of the bytes it last received, also on their way to the file: readers
# close behind send from it, so none waits for the disk or reads back what was just written.
RECENT = 8 * 1024 * 1024
MIN_RECENT_SPAN = 1024 * 1024  # a batch (ingest.BATCH_SIZE): readers close behind keep up with each one

Span = tuple[int, int, "list[memoryview] | None"]  # (start, length, bytes or None: in the file)


class State(enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    COMMITTED = "committed"
    PASSED = "passed through"  # verified and delivered, but the cache could not store it
    FAILED = "failed"


VERIFIED = (State.COMMITTED, State.PASSED)
ENDED = (State.COMMITTED, State.PASSED, State.FAILED)


class Flight:
    def __init__(self, key: str, url: str, post_json: dict | None = None, archive: bool = True):
        self.key = key
        self.url = url
        self.post_json = post_json  # the first hop is a POST of it (see Upstream.open)
        self.archive = archive  # a gzip archive, checked as one; else a file, which must carry a checksum
        self.state = State.CONNECTING
        self.evidence: Evidence | None = None
        self.entry: Entry | None = None
        self.error: FetchFailed | None = None
        self.written = 0  # bytes [0, written) are in the temp file
        self.window: Window | None = None  # the bytes past `written`, once the disk refused them
        self.recent: Window | None = None  # the last RECENT bytes received, while the disk takes them
        self.fetched_here = False  # from upstream by this process (else followed from another's fetch)
        self.streamers = 0  # readers that follow spans(), as opposed to waiting for the end
        self._readers = 0
        self._positions: dict[object, int] = {}  # each running spans() → the offset it has sent up to
        self._read_fd: int | None = None
        self.temp_path = None  # the file readers follow (this process's temp file, or another's)
        self.on_end: Callable[[Flight], None] | None = None  # the registry's bookkeeping, before readers wake
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self._wave = loop.create_future()

    # -- readers ---------------------------------------------------------------------------

    @property
    def received(self) -> int:
        """Archive bytes received so far (on disk, or past `written` in memory)."""
        if self.window is not None:
            return self.window.end
        return self.written if self.recent is None else self.recent.end

    @property
    def joinable(self) -> bool:
        """A new reader can still get every byte (pass-through drops what its readers have sent)."""
        return self.window is None or self.window.start == self.written

    def attach(self, streaming: bool) -> None:
        self._readers += 1
        self.streamers += streaming

    def detach(self, streaming: bool) -> None:
        self._readers -= 1
        self.streamers -= streaming
        self.release_window()
        self._close_read_fd_if_unused()

    async def ready(self) -> None:
        """Return once bytes are flowing (headers for clients are known), or raise FetchFailed."""
        while self.state is State.CONNECTING:
            await asyncio.shield(self._wave)
        if self.state is State.FAILED:
            raise self.error

    async def spans(self, offset: int = 0) -> AsyncIterator[Span]:
        """Spans of archive bytes as they become safe to send; raises FetchFailed. A span's data is
        None for bytes in the file (send them from open_file()), else the bytes themselves.

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
                if ready > 0 and (ready >= self._min_span(offset) or overdue or self.state is not State.STREAMING):
                    span = self._span(offset, limit)
                    yield span
                    offset, last_send = offset + span[1], loop.time()
                    self._positions[me] = offset
                    self.release_window()
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
            self.release_window()

    def open_file(self) -> BinaryIO | None:
        """A private read-only file object on the archive, None when the disk took none of it; needs
        ready(); caller closes. Private down to its own file offset (a reopen through /proc, not a
        dup), so readers that seek and read (through TLS) never move each other; it stays readable
        after the temp file is renamed into the store or removed."""
        if self._read_fd is None:
            return None
        return open(f"/proc/self/fd/{self._read_fd}", "rb", buffering=0)

    async def finished(self) -> Entry:
        """Wait for the fetch to end: its committed entry, or FetchFailed."""
        while self.state not in ENDED:
            await asyncio.shield(self._wave)
        if self.state is State.FAILED:
            raise self.error
        if self.state is State.PASSED:
            raise FetchFailed(503, f"{self.key} was fetched and verified, but the cache cannot store it now")
        return self.entry

    def _min_span(self, offset: int) -> int:
        """Readers close behind send sooner, so they stay within the recent bytes kept in memory."""
        return MIN_RECENT_SPAN if self.recent is not None and offset >= self.recent.start else MIN_SPAN

    def _sendable(self) -> int:
        if self.state in VERIFIED:
            return self.received
        if self.state is State.STREAMING:
            return max(0, self.received - HOLDBACK)
        return 0

    def _span(self, offset: int, limit: int) -> Span:
        """The next span from offset: from memory when it holds offset (the window in pass-through,
        else the recent bytes), else from the file, up to `written`."""
        memory = self.window if self.window is not None else self.recent
        if memory is not None and offset >= memory.start:
            return offset, limit - offset, memory.read(offset, limit - offset)
        return offset, min(limit, self.written) - offset, None

    def release_window(self) -> None:
        """Let the window drop what every streaming reader has sent (all of it when none is left)."""
        if self.window is None or len(self._positions) < self.streamers:
            return  # an attached reader has not started yet: it will need the bytes from its start
        self.window.drop_before(min(self._positions.values(), default=self.window.end))

    def _close_read_fd_if_unused(self) -> None:
        if self._readers == 0 and self.state in ENDED and self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    # -- what the ingest tells the readers -------------------------------------------------

    def notify(self) -> None:
        wave, self._wave = self._wave, asyncio.get_running_loop().create_future()
        wave.set_result(None)

    def readers_follow(self, temp_path) -> None:
        """The archive is being written to temp_path: readers send from it (from another file than
        before only while connecting, when no reader has opened one)."""
        fd = os.open(temp_path, os.O_RDONLY | os.O_CLOEXEC)
        if self._read_fd is not None:
            os.close(self._read_fd)
        self._read_fd, self.temp_path = fd, temp_path

    def on_disk(self) -> int:
        """How many bytes the file readers follow holds now (another process may be writing it)."""
        return os.fstat(self._read_fd).st_size

    def same_file(self, path) -> bool:
        """Whether readers follow the file now at path (the temp file they began on, renamed)."""
        here, there = os.fstat(self._read_fd), os.stat(path)
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def streaming(self) -> None:
        self.state = State.STREAMING
        self.notify()

    def keep_recent(self, start: int) -> None:
        """From byte `start` on, the bytes received are also kept in memory, RECENT of them at most."""
        self.recent = Window(start, RECENT)

    def arrived(self, pieces: list[bytes]) -> None:
        """Bytes received, on their way to the file: readers may send them from memory now."""
        self.recent.append(pieces)
        self._forget_recent()
        self.notify()

    def advance(self, end: int) -> None:
        """Bytes [0, end) are on disk: wake the readers."""
        if end > self.written:
            self.written = end
            self._forget_recent()
            if self.recent is None:  # else arrived() woke them: what they may send is counted from received
                self.notify()

    def _forget_recent(self) -> None:
        """Only bytes on disk leave memory: a reader behind the recent ones finds them in the file."""
        if self.recent is not None:
            self.recent.drop_before(min(self.written, self.recent.end - RECENT))

    def hold_in_memory(self, start: int, limit: int) -> Window:
        """From byte `start` on, bytes reach the readers through a window in memory."""
        self.window, self.recent = Window(start, limit), None
        return self.window

    def ended(self, state: State, entry: Entry | None = None, error: FetchFailed | None = None) -> None:
        self.state, self.entry, self.error = state, entry, error
        self.recent = None  # every byte is on disk by now (or the readers fail)
        if self.on_end is not None:
            self.on_end(self)
        self.notify()
        self._close_read_fd_if_unused()
