"""Background upkeep of a serving cache: hit counts written in batches, eviction to the caps, and
the cache's size, its caps and its disk's free space reported as metrics.

Invariants: eviction starts when usage passes max_size (the high mark) or free disk falls below
min_free, and goes down to LOW_WATERMARK × max_size (plus min_free's shortfall); the caps are
enforced in the start-up pass (a cache restarted with a smaller cap), before it logs that it
reconciled the index, not a measuring period later; it never takes
a pinned entry, a key being fetched, or a blob being sent; index work runs in threads; a disk
that refuses writes is reported and retried a period later, never the end of upkeep.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
from typing import Callable

from ..metrics import Metrics
from . import plans
from .diskhealth import WriteHealth, disk_trouble
from .operations import carry_out
from .store import Store

log = logging.getLogger(__name__)

PERIOD_SECONDS = 5.0
LOW_WATERMARK = 0.9
MEASURE_EVERY = 12  # periods


class Housekeeper:
    def __init__(self, store: Store, metrics: Metrics, health: WriteHealth, busy_keys: Callable[[], set[str]],
                 busy_blobs: Callable[[], set[str]], max_size: int | None, min_free: int | None):
        self._store = store
        self._metrics = metrics
        self._health = health
        self._busy_keys = busy_keys
        self._busy_blobs = busy_blobs
        self._max_size = max_size
        self._min_free = min_free
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Something was committed: check the caps now rather than at the next period."""
        self._wake.set()

    async def run(self) -> None:
        started = asyncio.get_running_loop().time()
        self._metrics.cache_max_bytes.set(self._max_size or 0)  # 0 where nothing enforces them (read-only)
        self._metrics.cache_min_free_bytes.set(self._min_free or 0)
        dropped, strays = await asyncio.to_thread(self._store.reconcile)
        await self._pass(measure=True)  # a cache restarted with a smaller cap shrinks now
        log.info("index and blobs reconciled, caps enforced in %.2fs: %d entries without a blob dropped, "
                 "%d stray blobs deleted", asyncio.get_running_loop().time() - started, dropped, strays)
        for period in itertools.count(1):
            try:
                await asyncio.wait_for(self._wake.wait(), PERIOD_SECONDS)
            except asyncio.TimeoutError:
                pass
            poked = self._wake.is_set()
            self._wake.clear()
            await self._pass(measure=poked or period % MEASURE_EVERY == 0)

    async def _pass(self, measure: bool) -> None:
        try:
            await self._upkeep(measure)
        except Exception as e:
            if (reason := disk_trouble(e)) is None:
                log.exception("housekeeping pass failed; trying again next period")
            else:
                self._health.failed(reason, "keeping the index")
            self._wake.clear()  # that failure asked for a pass: the next period is soon enough

    async def _upkeep(self, measure: bool) -> None:
        await asyncio.to_thread(self._store.write_hits, self._store.take_hits())
        # Listing 100k entries costs ~0.3 s: after a commit, or once a minute, not every period.
        if measure:
            entries = await self._measure()
            if self._max_size is not None or self._min_free is not None:
                await self._evict_if_needed(entries)

    async def _measure(self) -> list:
        entries = await asyncio.to_thread(self._store.entries)
        self._report(entries)
        return entries

    def _report(self, entries: list) -> None:
        self._metrics.cache_entries.set(len(entries))
        self._metrics.cache_bytes.set(plans.usage(entries))
        disk = shutil.disk_usage(self._store.root)
        self._metrics.cache_disk_free_bytes.set(disk.free)
        self._metrics.cache_disk_size_bytes.set(disk.total)

    async def _evict_if_needed(self, entries: list) -> None:
        target = self._target(plans.usage(entries))
        if target is None:
            return
        busy_keys, busy_blobs = self._busy_keys(), self._busy_blobs()
        candidates = [e for e in entries if e.key not in busy_keys and e.sha256 not in busy_blobs]
        protected = plans.usage(entries) - plans.usage(candidates)
        plan = plans.to_fit(candidates, max(0, target - protected))
        if not plan.keys:
            log.warning("cache over its cap but nothing can be evicted (pinned, in flight or being served)")
            return
        await asyncio.to_thread(carry_out, self._store, plan)
        evicted = set(plan.keys)
        self._report([e for e in entries if e.key not in evicted])  # not stale until the next measure
        self._metrics.evictions.inc(len(plan.keys))
        log.info("evicted %d entries, %d bytes", len(plan.keys), plan.freed)

    def _target(self, used: int) -> int | None:
        """The usage to shrink to, or None when within the caps."""
        targets = []
        if self._max_size is not None and used > self._max_size:
            targets.append(int(self._max_size * LOW_WATERMARK))
        if self._min_free is not None:
            shortfall = self._min_free - shutil.disk_usage(self._store.root).free
            if shortfall > 0:
                targets.append(max(0, used - shortfall - int(self._min_free * (1 - LOW_WATERMARK))))
        return min(targets) if targets else None
