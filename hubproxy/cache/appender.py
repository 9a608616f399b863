"""Appending a fetch's bytes to its temp file around the page cache (O_DIRECT) where the filesystem
allows it, through the page cache where it does not.

Invariants: each append returns only once all its bytes are in the file, in order, at the end;
whole aligned blocks go straight to the disk and only a partial block at either edge goes through
the page cache (which the kernel keeps coherent with them), so readers of the file see every byte.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

ALIGN = 4096  # a multiple of every block size O_DIRECT asks alignment to
STAGING = 1 << 20  # a multiple of ALIGN


class Appender:
    """Writes to fd from offset `end` on, from one thread at a time (the ingest's writer).

    Through the page cache, writing costs 0.2-2.8 CPU-s per GB on the machines measured (the copy
    into freshly allocated cache pages), on the core the receive and the hashing need; direct, it
    costs the ~0.1 s of copying into an aligned buffer, and the disk does the rest."""

    def __init__(self, fd: int, end: int):
        self._fd, self.end = fd, end
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self.direct = _direct_allowed(fd, self._flags)
        self._staging = mmap.mmap(-1, STAGING) if self.direct else None

    def append(self, pieces: list[bytes]) -> None:
        if not self.direct:
            self._write_cached_pieces(pieces)
            return
        staged = self.end % ALIGN  # staging[i] goes to file offset end - end % ALIGN + i
        for piece in pieces:
            view = memoryview(piece)
            while view:
                taken = min(len(self._staging) - staged, len(view))
                self._staging[staged:staged + taken] = view[:taken]
                staged, view = staged + taken, view[taken:]
                if staged == len(self._staging):
                    self._flush(staged)
                    staged = 0
        self._flush(staged)

    def _flush(self, staged: int) -> None:
        """Write what is staged: a partial block at either edge through the page cache, the whole
        blocks between them direct."""
        with memoryview(self._staging) as view:
            first = self.end % ALIGN
            low = min(staged, ALIGN) if first else 0
            high = max(low, staged // ALIGN * ALIGN)
            self._write_cached(view[first:low])
            self._write_direct(view[low:high])
            self._write_cached(view[high:staged])

    def _write_direct(self, view: memoryview) -> None:
        if not view:
            return
        if self.direct:
            try:
                fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | os.O_DIRECT)
                try:
                    written = os.pwrite(self._fd, view, self.end)
                finally:
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)
                self.end += written
                view = view[written:]
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # the filesystem took the flag but not the write
        self._write_cached(view)

    def _write_cached(self, view: memoryview) -> None:
        while view:
            written = os.pwrite(self._fd, view, self.end)
            self.end += written
            view = view[written:]

    def _write_cached_pieces(self, pieces: list[bytes]) -> None:
        views = [memoryview(piece) for piece in pieces]
        while views:
            written = os.pwritev(self._fd, views, self.end)
            self.end += written
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if written:
                views[0] = views[0][written:]


def _direct_allowed(fd: int, flags: int) -> bool:
    """Whether the filesystem takes O_DIRECT on fd (tmpfs before Linux 6.6, for one, does not)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return True
