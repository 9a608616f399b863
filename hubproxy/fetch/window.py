"""A window of a byte stream held in memory for the readers following it: how a fetch reaches its
clients when the disk refuses its bytes.

Invariants: the window holds bytes [start, end) of the stream, contiguous; bytes leave only from
the front, when every reader has passed them; the writer waits while more than `limit` are held.
"""

from __future__ import annotations

import asyncio
import collections


class Window:
    def __init__(self, start: int, limit: int):
        self.start = self.end = start
        self.limit = limit
        self._pieces: collections.deque[bytes] = collections.deque()
        self._room = asyncio.Event()

    @property
    def held(self) -> int:
        return self.end - self.start

    def append(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._pieces.append(piece)
            self.end += len(piece)

    def read(self, offset: int, length: int) -> list[memoryview]:
        """Views of bytes [offset, offset + length), which must lie within the window."""
        if offset < self.start or offset + length > self.end:
            raise IndexError(f"bytes {offset}+{length} are not in the window [{self.start}, {self.end})")
        views, position, stop = [], self.start, offset + length
        for piece in self._pieces:
            piece_end = position + len(piece)
            if piece_end > offset:
                views.append(memoryview(piece)[max(0, offset - position):min(len(piece), stop - position)])
            position = piece_end
            if position >= stop:
                break
        return views

    def drop_before(self, offset: int) -> None:
        """Every reader is at or past offset: let go of whole pieces before it."""
        while self._pieces and self.start + len(self._pieces[0]) <= offset:
            self.start += len(self._pieces.popleft())
        if self.held <= self.limit:
            self._room.set()

    async def wait_for_room(self) -> None:
        while self.held > self.limit:
            self._room.clear()
            await self._room.wait()
