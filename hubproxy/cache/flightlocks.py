"""Single flight across processes: a lock per key on the cache's disk. The process that holds a key's
lock leads its fetch and describes it (temp file, the origin's headers) beside the lock; processes
that find the lock held follow the leader's growing temp file instead of fetching again.

Invariants: at most one process holds a key's lock (flock on flights/<h>.lock, whose identity is
checked after locking, so a lock file unlinked meanwhile is never mistaken for the lock); a leader
that ends cleanly (committed or failed) unlinks the lock and its description before it lets go, so
a lock found free with its file still in place means its leader died (the kernel frees a dead
process's locks); a leader whose disk refuses writes says so in the lock file's mode (0400), which
takes no disk space. Descriptions hold no secret (no query string, no credential). Knows no HTTP.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

LEADING, PASSING = 0o600, 0o400  # the lock file's mode: the leader's bytes are in its temp file, or in memory only


class FlightLocks:
    """The lock files of one cache's flights (flights/ under its root)."""

    def __init__(self, root: Path):
        self.dir = root / "flights"
        self.dir.mkdir(exist_ok=True)

    def _paths(self, key: str) -> tuple[Path, Path]:
        name = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        return self.dir / f"{name}.lock", self.dir / f"{name}.json"

    def try_lead(self, key: str) -> "Lead | Watch":
        """Lead key's fetch (its lock taken) or, when another process holds the lock, watch that one."""
        lock_path, record_path = self._paths(key)
        while True:
            try:
                fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, LEADING)
            except FileNotFoundError:  # flights/ removed under a running cache: make it again
                self.dir.mkdir(exist_ok=True)
                fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, LEADING)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Watch(fd, lock_path, record_path)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, lock_path):
                return Lead(fd, lock_path, record_path)
            os.close(fd)  # unlinked by a leader that was ending as we opened it: take the new one


class Lead:
    """A key's lock, held: this process fetches the key. end() lets go, after unlinking both files."""

    def __init__(self, fd: int, lock_path: Path, record_path: Path):
        self._fd: int | None = fd
        self.lock_path, self.record_path = lock_path, record_path
        self.described = False
        os.fchmod(fd, LEADING)  # a dead leader may have left it saying PASSING

    def describe(self, record: dict[str, Any]) -> bool:
        """Publish what followers need (atomically: they never read half a description); False when
        the disk refuses it (full, read-only): followers then wait for the leader's end instead."""
        partial = self.record_path.with_suffix(".json.part")
        try:
            partial.write_text(json.dumps(record))
            os.replace(partial, self.record_path)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            return False
        self.described = True
        return True

    def passing(self) -> None:
        """The disk refuses this fetch's bytes: followers cannot tail them, and fetch on their own."""
        with contextlib.suppress(OSError):
            os.fchmod(self._fd, PASSING)

    def record(self) -> dict[str, Any] | None:
        """The description a previous (dead) leader left, if any."""
        return _read_record(self.record_path)

    def end(self) -> None:
        """Unlink the description and the lock file, then let go of the lock (so a follower that
        finds it free and its file gone knows the leader ended cleanly)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.record_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.lock_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def abandon(self) -> None:
        """Let go as a process that dies does: lock file and description stay, so that a follower
        takes the fetch over from the temp file (this process is stopping mid-fetch)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Watch:
    """Another process's lock on a key, watched: its description, and whether its leader is gone."""

    def __init__(self, fd: int, lock_path: Path, record_path: Path):
        self._fd: int | None = fd
        self.lock_path, self.record_path = lock_path, record_path

    def record(self) -> dict[str, Any] | None:
        return _read_record(self.record_path)

    def passing(self) -> bool:
        """Whether the leader's bytes are in its memory only (its disk refused them)."""
        return stat.S_IMODE(os.fstat(self._fd).st_mode) == PASSING

    def leader_gone(self) -> "Lead | bool":
        """False while the leader holds the lock. Once it lets go: the lock, held now by this
        process, when the leader died (its lock file is still in place: take over); else True (it
        ended cleanly, committed or failed; the watch is closed)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fd, self._fd = self._fd, None
        if _same_file(fd, self.lock_path):
            return Lead(fd, self.lock_path, self.record_path)
        os.close(fd)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none yet, or not one this code wrote
        return None
    return record if isinstance(record, dict) else None
