"""Stored JSON documents: the last answer upstream gave to a metadata request (kagglehub's RPCs),
kept under CACHE_DIR/metadata/ so that a mirror offline, or whose upstream fails, can still answer.

Invariants: a document is written whole (a temp file in the store's tmp/, fsynced, renamed into
place) or not at all, so a reader sees the old one or the new one; its file is named by the sha256
of its key, so no key can name a path, and it holds its key, so a read never returns another key's
document; a file that is missing, torn, not JSON or of another key reads as None. Blocking: run it
in a thread. Never HTTP. Callers store only what upstream answered to an anonymous request, never
a credential. On a cache opened read-only nothing is written: metadata/ is not even created (a
cache seeded by `bundle import` has none), and write does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .store import Store

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Stored:
    document: dict
    stored: float  # time.time() when written

    def age(self) -> float:
        return max(0.0, time.time() - self.stored)


class Metadata:
    def __init__(self, store: Store):
        self._store = store
        self.root = store.root / "metadata"
        if not store.read_only:
            self.root.mkdir(exist_ok=True)

    def _file(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.json"

    def read(self, key: str) -> Stored | None:
        try:
            with open(self._file(key), "rb") as f:
                record = json.loads(f.read(MAX_DOCUMENT_BYTES + 1))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("document"), dict):
            return None
        stored = record.get("stored")
        return Stored(record["document"], float(stored)) if isinstance(stored, (int, float)) else None

    def write(self, key: str, document: dict) -> None:
        """Store document under key, replacing what was there; raises OSError when the disk refuses.
        A read-only cache keeps nothing, by design: no write is attempted, so none fails."""
        if self._store.read_only:
            return
        target = self._file(key)
        data = json.dumps({"key": key, "stored": time.time(), "document": document}).encode()
        fd, temp = self._store.new_temp_file()
        try:
            with os.fdopen(fd, "wb") as f:  # open (so the temp file locked) until it is renamed
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                target.parent.mkdir(exist_ok=True)
                os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
