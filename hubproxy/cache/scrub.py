"""Scrub: re-hash every stored blob against the sha256 it is named by; quarantine the bad.

Invariants: a blob is judged only by its own bytes; a bad blob is moved (not copied) out of
blobs/ into quarantine/ before anything else happens, so it can never be served again; the
index entries that named it are dropped, so the next request fetches afresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .store import Store


@dataclass(frozen=True)
class Finding:
    sha256: str
    keys: list[str]
    problem: str


def scrub(store: Store) -> list[Finding]:
    """Re-hash every blob the index names; returns what is wrong (blocking: run it in a thread)."""
    findings = []
    for sha256, keys in sorted(store.blobs_in_use().items()):
        problem = _check(store, sha256)
        if problem:
            findings.append(Finding(sha256, sorted(keys), problem))
    return findings


def _check(store: Store, sha256: str) -> str | None:
    try:
        with store.blob_path(sha256).open("rb") as blob:
            actual = hashlib.file_digest(blob, "sha256").hexdigest()
    except FileNotFoundError:
        return "blob missing"
    if actual != sha256:
        return f"content hashes to {actual[:16]}…, not its name"
    return None


def quarantine_all(store: Store, findings: list[Finding]) -> None:
    for finding in findings:
        store.quarantine(finding.sha256)
        store.remove_keys(finding.keys)
