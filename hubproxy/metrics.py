"""Prometheus metrics for one proxy instance (prometheus_client, a registry per app); under serve
--workers, the exposition is the workers' together (prometheus_client's multiprocess mode).

Invariants: metrics only count, they never decide; label values come from a small fixed set
(cache outcomes, HTTP status codes), never from handles or URLs, so cardinality stays bounded;
across workers, counts and work under way add up, and a state of the cache shows the latest reading.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by serve --workers for its workers (serve/workers.py)

FETCH_FAILURE_STATUSES = ("404", "500", "502", "503", "504")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hubproxy_requests", "Hub archive requests by cache outcome.",
                                ["outcome"], registry=self.registry)
        self.hits = self.requests.labels("HIT")
        self.flights_in_progress = Gauge("hubproxy_flights_in_progress", "Upstream fetches under way.",
                                         registry=self.registry, multiprocess_mode="livesum")
        self.flight_readers = Gauge("hubproxy_flight_readers", "Clients attached to fetches under way.",
                                    registry=self.registry, multiprocess_mode="livesum")
        self.upstream_failures = Counter("hubproxy_upstream_failures", "Fetches that failed, by the status sent.",
                                         ["status"], registry=self.registry)
        for status in FETCH_FAILURE_STATUSES:  # exported at 0, so a rate sees the very first failure
            self.upstream_failures.labels(status)
        self.upstream_resumes = Counter("hubproxy_upstream_resumes", "Upstream transfers resumed where they broke, "
                                        "by why (cut, stall).", ["reason"], registry=self.registry)
        self.upstream_bytes = Counter("hubproxy_upstream_bytes", "Archive bytes fetched and committed.",
                                      registry=self.registry)
        self.fetch_seconds = Histogram("hubproxy_fetch_seconds", "Duration of committed upstream fetches.",
                                       buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
                                       registry=self.registry)
        self.cache_bytes_served = Counter("hubproxy_cache_bytes_served", "Body bytes of hits sent from disk.",
                                          registry=self.registry)
        self.cache_entries = Gauge("hubproxy_cache_entries", "Index entries (handles) cached.", registry=self.registry,
                                   multiprocess_mode="livemostrecent")
        self.cache_bytes = Gauge("hubproxy_cache_bytes", "Bytes of stored blobs.", registry=self.registry,
                                 multiprocess_mode="livemostrecent")
        self.cache_max_bytes = Gauge("hubproxy_cache_max_bytes", "The max_size cap eviction keeps the cache under "
                                     "(0: no cap).", registry=self.registry, multiprocess_mode="livemostrecent")
        self.cache_min_free_bytes = Gauge("hubproxy_cache_min_free_bytes", "The min_free floor eviction keeps free "
                                          "on the cache's disk (0: no floor).", registry=self.registry,
                                          multiprocess_mode="livemostrecent")
        self.cache_disk_free_bytes = Gauge("hubproxy_cache_disk_free_bytes", "Bytes free on the cache's filesystem "
                                           "(for an unprivileged user).", registry=self.registry,
                                           multiprocess_mode="livemostrecent")
        self.cache_disk_size_bytes = Gauge("hubproxy_cache_disk_size_bytes", "Size of the cache's filesystem.",
                                           registry=self.registry, multiprocess_mode="livemostrecent")
        self.evictions = Counter("hubproxy_evictions", "Index entries removed by purge or eviction.",
                                 registry=self.registry)
        self.cache_write_errors = Counter("hubproxy_cache_write_errors",
                                          "Writes to the cache the disk refused, by reason.",
                                          ["reason"], registry=self.registry)
        self.cache_writable = Gauge("hubproxy_cache_writable", "0 while writes to the cache are failing (a fault: "
                                    "full, quota, I/O error, remounted read-only), else 1; a cache served read-only "
                                    "by design attempts no write, so it stays 1.",
                                    registry=self.registry, multiprocess_mode="livemin")
        self.cache_read_only = Gauge("hubproxy_cache_read_only", "1 when the cache is served read-only by design "
                                     "(serve --read-only: hits served, misses passed through unstored), else 0.",
                                     registry=self.registry, multiprocess_mode="livemax")
        self.passthrough_fetches = Counter("hubproxy_passthrough_fetches", "Archives verified and delivered to "
                                           "clients but not stored (cache unwritable, or served read-only).",
                                           registry=self.registry)
        self.connects = Counter("hubproxy_connects", "Forward-proxy CONNECT requests, by what became of them "
                                "(intercepted, tunnelled, refused).", ["outcome"], registry=self.registry)
        self.proxy_requests = Counter("hubproxy_proxy_requests", "Forward-proxy absolute-form (HTTP_PROXY) requests "
                                      "not served as hub requests, by what became of them (tunnelled: forwarded to a "
                                      "--tunnel host; refused: another host, a hub host's other port, an https:// "
                                      "target, user information).", ["outcome"], registry=self.registry)
        self.verify_failures = Counter("hubproxy_verify_failures", "Blobs found corrupt and quarantined.",
                                       registry=self.registry)

    def exposition(self) -> bytes:
        if os.environ.get(MULTIPROCESS_DIR):
            together = CollectorRegistry()
            multiprocess.MultiProcessCollector(together)
            return generate_latest(together)
        return generate_latest(self.registry)


@contextlib.contextmanager
def shared_by_processes() -> Iterator[None]:
    """Within: processes started from here (serve --workers) keep their metrics in a directory of
    this one's, from which each one's /metrics adds them all up; the directory goes at the end."""
    directory = tempfile.mkdtemp(prefix="hubproxy-metrics-")
    os.environ[MULTIPROCESS_DIR] = directory
    try:
        yield
    finally:
        del os.environ[MULTIPROCESS_DIR]
        shutil.rmtree(directory, ignore_errors=True)


def process_gone(pid: int) -> None:
    """A process whose metrics were shared has ended: its gauges of work under way no longer count."""
    multiprocess.mark_process_dead(pid)
