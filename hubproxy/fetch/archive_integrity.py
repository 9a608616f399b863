"""A model archive's own evidence, for an origin that gave no checksum: the body must be one gzip
stream that inflates cleanly to its trailer, and the tar inside must reach its end.

Invariants: fed the body's bytes in order, from one thread at a time; `verify()` after the last
byte passes only when the body is exactly one gzip member (zlib checks its trailer's CRC-32 and
ISIZE), nothing follows it, and the tar inside ends with its two zero blocks where a header is due,
each header before them with a sound checksum and size. tensorflow_hub's streaming tarfile reads
no further than a first gzip member and ends quietly at a zero block or a bad header, so anything
else would reach it as a whole model with members missing. Every failure is FetchFailed(502),
raised as early as the bytes show it. Inflated bytes are looked at and dropped, INFLATE_PIECE at
a time, so memory stays flat whatever the compression ratio.
"""

from __future__ import annotations

import zlib

from .errors import FetchFailed

INFLATE_PIECE = 1024 * 1024
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_PAX_HEADER = 1024 * 1024
# tarfile reads no data after these member types (links, devices, directories, fifos).
_TYPES_WITHOUT_DATA = frozenset(b"123456")
_PAX_TYPES = frozenset(b"xX")
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def _unsound(what: str) -> FetchFailed:
    return FetchFailed(502, f"upstream archive {what}, and the origin gave no checksum to vouch for it")


class ArchiveIntegrity:
    """Inflates and walks the archive as its bytes arrive."""

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(wbits=_GZIP_WBITS)
        self._tar = TarWalk()

    def update(self, data: bytes) -> None:
        if self._inflater.eof:
            if data:
                raise _unsound("has bytes after its gzip stream")
            return
        while True:
            try:
                inflated = self._inflater.decompress(data, INFLATE_PIECE)
            except zlib.error as e:
                raise _unsound(f"is not a sound gzip stream ({e})") from None
            self._tar.feed(inflated)
            data = self._inflater.unconsumed_tail
            # A full piece may leave output pending inside zlib even when all input is consumed.
            if not data and len(inflated) < INFLATE_PIECE:
                break
        if self._inflater.unused_data:
            raise _unsound("has bytes after its gzip stream")

    def verify(self) -> None:
        """After the last byte: raise FetchFailed unless the archive ended as a sound one."""
        if not self._inflater.eof:
            raise _unsound("ends before its gzip stream does (truncated)")
        if not self._tar.ended:
            raise _unsound("holds a tar without its end-of-archive blocks (truncated)")


class TarWalk:
    """Follows a tar's headers through its inflated bytes, skipping member data."""

    def __init__(self) -> None:
        self.ended = False
        self._skip = 0  # member data (with its padding) before the next header is due
        self._header = bytearray()
        self._zero_blocks = 0
        self._pax: bytearray | None = None  # the data of a pax header being read
        self._pax_length = 0
        self._next_size: int | None = None  # a pax header's size= for the member after it

    def feed(self, data: bytes) -> None:
        view, at = memoryview(data), 0
        while at < len(view) and not self.ended:  # what follows the end is padding, which tarfile ignores
            if self._skip:
                step = min(self._skip, len(view) - at)
                if self._pax is not None:
                    self._pax += view[at:at + step]
                self._skip -= step
                at += step
                if not self._skip and self._pax is not None:
                    self._read_pax()
                continue
            step = min(BLOCK - len(self._header), len(view) - at)
            self._header += view[at:at + step]
            at += step
            if len(self._header) == BLOCK:
                self._on_header(bytes(self._header))
                self._header.clear()

    def _on_header(self, block: bytes) -> None:
        if block == ZERO_BLOCK:
            self._zero_blocks += 1
            self.ended = self._zero_blocks == 2
            return
        if self._zero_blocks:
            raise _unsound("has a tar member after a zero block, where tarfile stops reading")
        if _number(block[148:156]) not in _sums(block):
            raise _unsound("has a tar header with a bad checksum")
        kind = block[156]
        size = 0 if kind in _TYPES_WITHOUT_DATA else _number(block[124:136])
        if kind in _PAX_TYPES:
            if size > MAX_PAX_HEADER:
                raise _unsound("has a pax header larger than 1 MiB")
            self._pax, self._pax_length = bytearray(), size
        elif self._next_size is not None:
            size, self._next_size = self._next_size, None
        if size < 0:
            raise _unsound("has a tar header with a negative size")
        self._skip = -(-size // BLOCK) * BLOCK
        if self._pax is not None and not self._skip:
            self._read_pax()

    def _read_pax(self) -> None:
        records, self._pax = bytes(self._pax[:self._pax_length]), None
        for record in records.split(b"\n"):
            key, _, value = record.partition(b" ")[2].partition(b"=")
            if key == b"size":
                if not value.isdigit():
                    raise _unsound("has a pax header with a bad size")
                self._next_size = int(value)


def _number(field: bytes) -> int:
    """A tar number field, as tarfile reads it: base-256 when its first byte says so, else octal text."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise _unsound("has a tar header with a bad number field") from None


def _sums(block: bytes) -> tuple[int, int]:
    """The header's sums with its checksum field as spaces, unsigned and signed (tarfile takes either)."""
    rest = block[:148] + block[156:]
    unsigned = 8 * 0x20 + sum(rest)
    return unsigned, unsigned - 256 * sum(1 for byte in rest if byte > 127)
