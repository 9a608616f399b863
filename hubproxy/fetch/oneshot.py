"""The one-shot verified fetch, outside any server: what warmup and bundles use to take an archive
straight from upstream, and what scrub's repair uses to fetch a bad blob afresh.

Invariants: the same flight, evidence checks and atomic commit as the proxy's misses; a result is
a committed Entry or a FetchFailed with a one-line reason, never a half-written blob.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from ..cache.store import Entry, Store
from ..config import Settings
from ..handles import BadHandle, Handle, handle_from_key
from ..metrics import Metrics
from .errors import FetchFailed
from .flights import Flights
from .upstream import Upstream

Progress = Callable[[int, "int | None"], None]  # (bytes so far, total or None)


async def fetch_verified(store: Store, settings: Settings, handle: Handle, progress: Progress | None = None) -> Entry:
    """Fetch one handle into store; returns the committed Entry or raises FetchFailed."""
    async with Upstream(settings) as upstream:
        flights = Flights(store, upstream, Metrics())
        url = handle.upstream_url(settings.upstream_base(handle.upstream))
        async with flights.join(handle.key, url, streaming=False) as (flight, _):
            finished = asyncio.ensure_future(flight.finished())
            while not finished.done():
                await asyncio.wait([finished], timeout=0.2)
                if progress and flight.evidence is not None:
                    progress(flight.received, flight.evidence.content_length)
            return finished.result()


def refetch(store: Store, settings: Settings, keys: list[str]) -> list[tuple[str, str | None]]:
    """Fetch keys afresh from upstream (scrub's repair): (key, problem or None) for each."""
    results: list[tuple[str, str | None]] = []
    for key in keys:
        try:
            asyncio.run(fetch_verified(store, settings, handle_from_key(key)))
            results.append((key, None))
        except FetchFailed as e:
            results.append((key, e.message))
        except BadHandle as e:
            results.append((key, str(e)))
    return results
