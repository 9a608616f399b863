"""Copying a stream to a file while hashing it: how archives cross from a download or a bundle
onto local disk with their sha256 known.

Invariants: constant memory (BLOCK at a time); the digest covers exactly the bytes written.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Callable

BLOCK = 1 << 20


def copy_hashing(source: BinaryIO, out: BinaryIO, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy source to out; returns (sha256 hex, bytes copied)."""
    digest = hashlib.sha256()
    size = 0
    while block := source.read(BLOCK):
        digest.update(block)
        out.write(block)
        size += len(block)
        if progress is not None:
            progress(size)
    return digest.hexdigest(), size
