"""Content-addressed blob store with a diskcache index: key → Entry(sha256, size, ...).

Invariants: a blob at blobs/sha256/ab/<sha256> is complete and its name is its own hash;
an index entry is written only after its blob is fsynced and renamed into place;
a blob is placed and indexed, and deleted, only under the index's write transaction (SQLite's
lock, which other processes on the cache take too), and deleted only when no entry names it then:
so a purge never deletes a blob under a commit that names it, and a commit renames its own
verified file into place rather than count on a stored copy surviving;
every path this module touches is below the cache root. Knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import diskcache

from .diskhealth import disk_trouble
from .flightlocks import FlightLocks
from .memo import Memo
from .readonly import ReadOnlyCache, ReadOnlyIndex

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
TEMP_NAME = re.compile(r"fetch-[A-Za-z0-9_]{1,64}\.part")  # what new_temp_file names (mkstemp's letters)
MEMO_SECONDS = 2.0
MEMO_ENTRIES = 65536


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
    pinned: bool = False


class BareBlob:
    """A blob open as a bare descriptor, for when the first bytes are urgent: they are read without
    a file object, which is made later (its fstat can wait); close() only if as_file() never ran."""

    def __init__(self, descriptor: int):
        self._descriptor = descriptor

    def read_start(self, count: int) -> bytes:
        return os.pread(self._descriptor, count, 0)

    def as_file(self, position: int) -> BinaryIO:
        """The blob as the file object open_blob gives, at `position`; it owns the descriptor now."""
        blob = open(self._descriptor, "rb", buffering=0)  # noqa: SIM115 (the caller's to close)
        blob.seek(position)
        return blob

    def close(self) -> None:
        os.close(self._descriptor)


class Store:
    def __init__(self, root: str | os.PathLike, *, read_only: bool = False, memo_seconds: float = MEMO_SECONDS):
        """read_only: open the index with ReadOnlyIndex and never write (a cache on a read-only
        mount): hits are not counted into the index, clear_temp does nothing, writes raise EROFS.
        memo_seconds: how long lookup trusts an index read (another process's changes show after it)."""
        self.root = Path(root).expanduser().resolve()
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.read_only = read_only
        self._blobs_prefix = f"{self.blobs}/"
        self._index: diskcache.Cache | ReadOnlyIndex
        self.flights: FlightLocks | None = None  # single flight across the processes on this cache
        if read_only:
            self._index = ReadOnlyIndex(self.root / "index")
        else:
            for directory in (self.blobs, self.tmp):
                directory.mkdir(parents=True, exist_ok=True)
            self._index = diskcache.Cache(str(self.root / "index"), eviction_policy="none", size_limit=2**62)
            self.flights = FlightLocks(self.root)
        self._memo: Memo[Entry] = Memo(memo_seconds, MEMO_ENTRIES)
        self._pending_hits: dict[str, tuple[int, float]] = {}  # key → (hits, last access)

    def close(self) -> None:
        self.write_hits(self.take_hits())
        self._index.close()

    def clear_temp(self) -> int:
        """Remove the leftovers of fetches interrupted by a crash or restart, never a temp file a
        live process holds (its lock says so: another hubproxy on this cache); returns how many."""
        removed = 0
        if self.read_only:
            return removed
        for leftover in self.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            elif not _unlinked_unless_held(leftover):
                continue
            removed += 1
        return removed

    def blob_path(self, sha256: str) -> Path:
        return Path(self._blob_file(sha256))

    def _blob_file(self, sha256: str) -> str:
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
        return f"{self._blobs_prefix}{sha256[:2]}/{sha256}"

    def lookup(self, key: str) -> Entry | None:
        """The entry for key if its blob is present. Index reads (and the blob's presence) are
        memoised for memo_seconds, so changes made by another process show within that time."""
        entry = self._memo.get(key)
        if entry is not None:
            return entry
        raw = self._index.get(key)
        entry = Entry(**raw) if raw is not None else None
        if entry is None or not self.has_blob(entry):
            self._memo.forget(key)
            return None
        self._memo.put(key, entry)
        return entry

    def open_blob(self, entry: Entry) -> BinaryIO | None:
        """The entry's blob open for reading, or None when it is gone (purged or evicted by another
        process since the lookup); an open blob stays readable to its end whatever happens next."""
        try:
            return open(self._blob_file(entry.sha256), "rb", buffering=0)
        except FileNotFoundError:
            return None

    def open_bare_blob(self, entry: Entry) -> BareBlob | None:
        """open_blob with one system call and no file object yet (see BareBlob), or None when gone."""
        try:
            return BareBlob(os.open(self._blob_file(entry.sha256), os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            return None

    def has_blob(self, entry: Entry) -> bool:
        """Whether the blob is on disk now (lookup's answer may be up to memo_seconds old)."""
        return os.path.isfile(self._blob_file(entry.sha256))

    def forget(self, key: str) -> None:
        self._memo.forget(key)

    def record_hit(self, key: str) -> None:
        """Count a hit in memory; take_hits + write_hits put the counts in the index (never read-only)."""
        if self.read_only:
            return
        hits, _ = self._pending_hits.get(key, (0, 0.0))
        self._pending_hits[key] = (hits + 1, time.time())

    def take_hits(self) -> dict[str, tuple[int, float]]:
        pending, self._pending_hits = self._pending_hits, {}
        return pending

    def entries(self) -> list[Entry]:
        """Every index entry (a snapshot). diskcache has no bulk read, and a get per key costs
        2.6 s for 100k entries; one SELECT through its own connection and its public Disk.fetch
        decoder costs 0.26 s. The SELECT uses diskcache's private _sql and table, so diskcache is
        pinned (pyproject.toml) and tests/test_index_bulk_read.py checks this read against the
        public per-key one."""
        rows = self._index._sql("SELECT mode, value, filename FROM Cache").fetchall()
        return [Entry(**self._index.disk.fetch(mode, filename, value, False)) for mode, value, filename in rows]

    def stored_blobs(self) -> set[str]:
        """sha256 of every blob file present."""
        found: set[str] = set()
        if not self.blobs.is_dir():
            return found
        for shard in os.scandir(self.blobs):
            if shard.is_dir():
                found.update(name for name in os.listdir(shard.path) if SHA256_HEX.fullmatch(name))
        return found

    def reconcile(self) -> tuple[int, int]:
        """After a crash: drop entries whose blob is gone, delete blobs no entry names (a commit
        interrupted between rename and index write; nothing says under which key it belongs).
        Both are decided again under the index's lock, so commits racing the scan are left
        alone. Returns (entries dropped, blobs deleted)."""
        entries, blobs = self.entries(), self.stored_blobs()
        dropped = self._drop_blobless([e.key for e in entries if e.sha256 not in blobs])
        return dropped, len(self.delete_unused_blobs(sorted(blobs - {e.sha256 for e in entries})))

    def _drop_blobless(self, keys: list[str]) -> int:
        """Remove those entries whose blob is still missing now; returns how many."""
        dropped = 0
        with self._write_transaction():
            for key in keys:
                raw = self._index.get(key)
                if raw is not None and not os.path.isfile(self._blob_file(raw["sha256"])):
                    self._index.delete(key)
                    self._memo.forget(key)
                    dropped += 1
        return dropped

    def blobs_in_use(self) -> dict[str, list[str]]:
        """sha256 → the keys naming it."""
        users: dict[str, list[str]] = {}
        for entry in self.entries():
            users.setdefault(entry.sha256, []).append(entry.key)
        return users

    def set_pinned(self, key: str, pinned: bool) -> bool:
        with self._index.transact():
            raw = self._index.get(key)
            if raw is None:
                return False
            raw["pinned"] = pinned
            self._index.set(key, raw)
        self._memo.forget(key)
        return True

    def remove_keys(self, keys: list[str]) -> None:
        with self._index_write():
            for key in keys:
                self._index.delete(key)
                self._memo.forget(key)

    def delete_unused_blobs(self, sha256s: list[str]) -> list[str]:
        """Delete those blobs no index entry names any more; returns the ones deleted. Decided and
        done under the index's lock, which commits take to place and index a blob. A client still
        reading a deleted blob keeps its open file to the end."""
        deleted = []
        with self._write_transaction():
            in_use = self.blobs_in_use()
            for sha256 in sha256s:
                if sha256 not in in_use:
                    with contextlib.suppress(FileNotFoundError):
                        self.blob_path(sha256).unlink()
                        deleted.append(sha256)
        return deleted

    def quarantine(self, sha256: str) -> Path | None:
        """Move a blob out of blobs/ so it is never served again; returns where it went."""
        quarantine = self.root / "quarantine"
        quarantine.mkdir(exist_ok=True)
        target = quarantine / f"{sha256}.{int(time.time())}"
        try:
            os.replace(self.blob_path(sha256), target)
        except FileNotFoundError:
            return None
        self._memo.clear()
        return target

    def write_hits(self, pending: dict[str, tuple[int, float]]) -> None:
        """Add counted hits to the index in one transaction; blocking, run it in a thread."""
        if not pending:
            return
        with self._write_transaction():
            for key, (hits, last_access) in pending.items():
                raw = self._index.get(key)
                if raw is not None:
                    raw["hits"] += hits
                    raw["last_access"] = max(raw["last_access"], last_access)
                    self._index.set(key, raw)

    def new_temp_file(self) -> tuple[int, Path]:
        """An open, writable temp file inside the cache root: (fd, path). The descriptor holds an
        exclusive lock on it for as long as it is open, so no other process's clear_temp takes it.
        Read-only: raises EROFS without touching the disk (a fetch then passes through)."""
        if self.read_only:
            raise ReadOnlyCache(f"{self.root} is opened read-only: nothing is stored")
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="fetch-", suffix=".part")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file just made: nobody else can hold it
        return fd, Path(name)

    def temp_named(self, name: str) -> Path:
        """The temp file called name (as another process's flight describes it); ValueError for a
        name new_temp_file never makes, so no description can point outside tmp/."""
        if not TEMP_NAME.fullmatch(name):
            raise ValueError(f"not a temp file name: {name[:80]!r}")
        return self.tmp / name

    def reopen_temp(self, temp_path: Path) -> int:
        """A temp file a dead process left, reopened to append to it under its lock (as
        new_temp_file's); raises FileNotFoundError when it is gone, BlockingIOError when held."""
        fd = os.open(temp_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, there = os.fstat(fd), os.stat(temp_path)  # unlinked by a clean-up while we locked it?
            if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
                raise FileNotFoundError(errno.ENOENT, "taken by a start-up clean-up", str(temp_path))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def commit(self, key: str, temp_path: Path, sha256: str, size: int, *,
               etag: str | None, content_type: str, source: str, durable: bool = True) -> Entry:
        """Move a verified temp file into place and index it; blocking, run it in a thread.
        The temp file becomes the blob even when another key's identical copy is stored (a purge
        may be deleting that one), atomically replacing it; the rename and the entry are made
        under the index's lock, so a purge sees both or neither.
        `durable=False` skips the fsyncs (bulk loads such as the benchmark's synthetic index)."""
        blob = self.blob_path(sha256)
        blob.parent.mkdir(exist_ok=True)
        if durable:
            _fsync_file(temp_path)
        try:
            with self._write_transaction():
                os.replace(temp_path, blob)
                if durable:
                    _fsync_dir(blob.parent)
                return self._index_entry(key, sha256, size, etag=etag, content_type=content_type, source=source)
        except BaseException:
            self._memo.forget(key)
            with contextlib.suppress(Exception):  # a disk that refused the entry may refuse this too: reconcile
                self.delete_unused_blobs([sha256])
            raise

    def add_key(self, key: str, sha256: str, size: int, *, etag: str | None, content_type: str,
                source: str) -> Entry:
        """Index key → a blob that is already stored (another spelling of the same archive); raises
        FileNotFoundError when it is not, or no longer is."""
        with self._write_transaction():
            blob = self.blob_path(sha256)
            if not blob.is_file() or blob.stat().st_size != size:
                raise FileNotFoundError(f"no stored blob {sha256} of {size} bytes")
            return self._index_entry(key, sha256, size, etag=etag, content_type=content_type, source=source)

    def _index_entry(self, key: str, sha256: str, size: int, *, etag: str | None, content_type: str,
                     source: str) -> Entry:
        """Write key's entry; callers hold the index's lock and have the blob in place."""
        now = time.time()
        entry = Entry(key=key, sha256=sha256, size=size, etag=etag, content_type=content_type,
                      source=source, fetched=now, last_access=now)
        self._index.set(key, dataclasses.asdict(entry))
        self._memo.put(key, entry)
        return entry

    @contextlib.contextmanager
    def _write_transaction(self):
        """One write transaction on the index (SQLite's lock, which other processes take too)."""
        with self._index_write(), self._index.transact():
            yield

    @contextlib.contextmanager
    def _index_write(self):
        """On a write the disk refused, drop this thread's index connection: one opened while the
        disk was read-only stays read-only, so the next write must open afresh to see recovery."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if disk_trouble(e) is not None:
                self._index.close()
            raise

    def discard(self, temp_path: Path) -> None:
        temp_path.unlink(missing_ok=True)


def _unlinked_unless_held(path: Path) -> bool:
    """Unlink path unless a live process holds its lock; the unlink is done under this probe's own
    lock, so a process about to take a dead fetch over (reopen_temp) finds it either whole or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:  # not a plain file (a symlink, a fifo): nothing could hold it
        path.unlink(missing_ok=True)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)  # releases the probe's own lock, if it got one


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
