"""Prometheus metrics for one proxy instance (prometheus_client, a registry per app).

Invariants: metrics only count, they never decide; label values come from a small fixed set
(cache outcomes, HTTP status codes), never from handles or URLs, so cardinality stays bounded.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hubproxy_requests", "Hub archive requests by cache outcome.",
                                ["outcome"], registry=self.registry)
        self.flights_in_progress = Gauge("hubproxy_flights_in_progress", "Upstream fetches under way.",
                                         registry=self.registry)
        self.flight_readers = Gauge("hubproxy_flight_readers", "Clients attached to fetches under way.",
                                    registry=self.registry)
        self.upstream_failures = Counter("hubproxy_upstream_failures", "Fetches that failed, by the status sent.",
                                         ["status"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
