"""Scrub: re-hash every stored blob against the sha256 it is named by; quarantine the bad.

Invariants: a blob is judged only by its own bytes; a bad blob is moved (not copied) out of
blobs/ into quarantine/ before anything else happens, so it can never be served again; the
index entries that named it are dropped, so the next request fetches afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from .config import Settings
from .flight import FlightFailed, Flights
from .handles import BadHandle, handle_from_key
from .metrics import Metrics
from .store import Store
from .upstream import Upstream

_BLOCK = 1 << 20


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
    digest = hashlib.sha256()
    try:
        with store.blob_path(sha256).open("rb") as blob:
            while block := blob.read(_BLOCK):
                digest.update(block)
    except FileNotFoundError:
        return "blob missing"
    if digest.hexdigest() != sha256:
        return f"content hashes to {digest.hexdigest()[:16]}…, not its name"
    return None


def quarantine_all(store: Store, findings: list[Finding]) -> None:
    for finding in findings:
        store.quarantine(finding.sha256)
        store.remove_keys(finding.keys)


def refetch(store: Store, settings: Settings, keys: list[str]) -> list[tuple[str, str | None]]:
    """Fetch keys afresh from upstream with the proxy's verified fetch: (key, problem or None)."""
    return asyncio.run(_refetch(store, settings, keys))


async def _refetch(store: Store, settings: Settings, keys: list[str]) -> list[tuple[str, str | None]]:
    upstream = Upstream(settings)
    await upstream.start()
    flights = Flights(store, upstream, Metrics())
    results: list[tuple[str, str | None]] = []
    try:
        for key in keys:
            try:
                handle = handle_from_key(key)
                async with flights.join(key, handle.upstream_url(settings.upstreams[handle.upstream])) as (flight, _):
                    await flight.finished()
                results.append((key, None))
            except (FlightFailed, BadHandle) as e:
                results.append((key, getattr(e, "message", str(e))))
    finally:
        await upstream.close()
    return results
