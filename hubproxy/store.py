"""Content-addressed blob store with a diskcache index: key → Entry(sha256, size, ...).

Invariants: a blob at blobs/sha256/ab/<sha256> is complete and its name is its own hash;
an index entry is written only after its blob is fsynced and renamed into place;
every path this module touches is below the cache root. Knows nothing of HTTP.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import diskcache

_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class Entry:
    key: str
    sha256: str
    size: int
    etag: str | None
    content_type: str
    source: str  # where it came from, without any query string
    fetched: float
    last_access: float
    hits: int = 0


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        for directory in (self.blobs, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._index = diskcache.Cache(str(self.root / "index"), eviction_policy="none", size_limit=2**62)

    def close(self) -> None:
        self._index.close()

    def clear_temp(self) -> int:
        """Remove the leftovers of fetches interrupted by a crash or restart; returns how many."""
        removed = 0
        for leftover in self.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            removed += 1
        return removed

    def blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
        return self.blobs / sha256[:2] / sha256

    def lookup(self, key: str) -> Entry | None:
        """The entry for key if its blob is present."""
        raw = self._index.get(key)
        if raw is None:
            return None
        entry = Entry(**raw)
        if not self.blob_path(entry.sha256).is_file():
            return None
        return entry

    def record_hit(self, entry: Entry) -> None:
        updated = dataclasses.replace(entry, hits=entry.hits + 1, last_access=time.time())
        self._index.set(entry.key, dataclasses.asdict(updated))

    def new_temp_file(self) -> tuple[int, Path]:
        """An open, writable temp file inside the cache root: (fd, path)."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="fetch-", suffix=".part")
        return fd, Path(name)

    def commit(self, key: str, temp_path: Path, sha256: str, size: int, *,
               etag: str | None, content_type: str, source: str) -> Entry:
        """Move a verified temp file into place and index it; blocking, run it in a thread."""
        blob = self.blob_path(sha256)
        blob.parent.mkdir(exist_ok=True)
        if blob.is_file() and blob.stat().st_size == size:
            temp_path.unlink()  # the same bytes are already stored under another key
        else:
            _fsync_file(temp_path)
            os.replace(temp_path, blob)
            _fsync_dir(blob.parent)
        now = time.time()
        entry = Entry(key=key, sha256=sha256, size=size, etag=etag, content_type=content_type,
                      source=source, fetched=now, last_access=now)
        self._index.set(key, dataclasses.asdict(entry))
        return entry

    def discard(self, temp_path: Path) -> None:
        temp_path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
