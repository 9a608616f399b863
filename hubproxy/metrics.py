"""Prometheus metrics for one proxy instance (prometheus_client, a registry per app).

Invariants: metrics only count, they never decide; label values come from a small fixed set
(cache outcomes, HTTP status codes), never from handles or URLs, so cardinality stays bounded.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hubproxy_requests", "Hub archive requests by cache outcome.",
                                ["outcome"], registry=self.registry)
        self.hits = self.requests.labels("HIT")
        self.flights_in_progress = Gauge("hubproxy_flights_in_progress", "Upstream fetches under way.",
                                         registry=self.registry)
        self.flight_readers = Gauge("hubproxy_flight_readers", "Clients attached to fetches under way.",
                                    registry=self.registry)
        self.upstream_failures = Counter("hubproxy_upstream_failures", "Fetches that failed, by the status sent.",
                                         ["status"], registry=self.registry)
        self.upstream_resumes = Counter("hubproxy_upstream_resumes", "Upstream transfers resumed where they broke, "
                                        "by why (cut, stall).", ["reason"], registry=self.registry)
        self.upstream_bytes = Counter("hubproxy_upstream_bytes", "Archive bytes fetched and committed.",
                                      registry=self.registry)
        self.fetch_seconds = Histogram("hubproxy_fetch_seconds", "Duration of committed upstream fetches.",
                                       buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
                                       registry=self.registry)
        self.cache_bytes_served = Counter("hubproxy_cache_bytes_served", "Body bytes of hits sent from disk.",
                                          registry=self.registry)
        self.cache_entries = Gauge("hubproxy_cache_entries", "Index entries (handles) cached.", registry=self.registry)
        self.cache_bytes = Gauge("hubproxy_cache_bytes", "Bytes of stored blobs.", registry=self.registry)
        self.evictions = Counter("hubproxy_evictions", "Index entries removed by purge or eviction.",
                                 registry=self.registry)
        self.cache_write_errors = Counter("hubproxy_cache_write_errors",
                                          "Writes to the cache the disk refused, by reason.",
                                          ["reason"], registry=self.registry)
        self.cache_writable = Gauge("hubproxy_cache_writable", "0 while writes to the cache are failing, else 1.",
                                    registry=self.registry)
        self.passthrough_fetches = Counter("hubproxy_passthrough_fetches", "Archives verified and delivered to "
                                           "clients but not stored (cache unwritable).", registry=self.registry)
        self.connects = Counter("hubproxy_connects", "Forward-proxy CONNECT requests, by what became of them "
                                "(intercepted, tunnelled, refused).", ["outcome"], registry=self.registry)
        self.proxy_requests = Counter("hubproxy_proxy_requests", "Forward-proxy absolute-form (HTTP_PROXY) requests "
                                      "for other hosts than the hub's, by what became of them (tunnelled: "
                                      "forwarded to a --tunnel host; refused).", ["outcome"], registry=self.registry)
        self.verify_failures = Counter("hubproxy_verify_failures", "Blobs found corrupt and quarantined.",
                                       registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
