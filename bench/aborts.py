"""The abort soak: rounds of concurrent clients on one hubproxy, over archives it has (hits) and
archives it has not (misses, fetched from a throttled origin so clients join and leave mid-fetch),
some clients hanging up at a random byte; after each round, the proxy's open fds and RSS.

Invariants: a client that did not hang up gets a 200 with every byte of the origin's archive (an
`error` otherwise, a `wrong_bytes` if a body presented as complete had other bytes); readings are
taken once the round's fetches are over, so rounds are compared at rest; growth is judged from the
warmed reading (after round 1) to the last, for fds outside the proxy's pools and for RSS.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import random
import time
import urllib.parse
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from hubproxy.units import format_size

from . import harness
from .downloads import Fetched, download

MISS_RATE = 16_000_000  # origin bytes/s for misses: a fetch lasts long enough for clients to leave mid-way
KEPT = 16  # archives of earlier rounds that hits are drawn from
# A proxy at a steady state: its cache holds the archives hits are drawn from (KEPT + a round's misses,
# 2 MiB at most each) and evicts older ones, so the index and what is read from it stop growing.
STEADY_MAX_SIZE = "64M"
WARMED = 1  # the reading growth is judged from: round 0 met first imports, first connections
# At rest, the fds outside the pools are the listener, the log, the event loop's own: the slack covers
# a client connection whose close is under way as they are counted.
FD_SLACK = 4


@dataclasses.dataclass(frozen=True)
class Reading:
    round: int
    fds: int
    pooled: int  # of fds: the index's per-thread SQLite connections, keep-alive connections upstream
    rss: int  # bytes

    @property
    def held(self) -> int:
        """fds outside the pools (whose sizes are bounded by threads and connection limits, not rounds)."""
        return self.fds - self.pooled


@dataclasses.dataclass
class SoakFigures:
    seed: int
    clients: int
    rounds: int = 0
    requests: int = 0
    aborts: int = 0
    errors: int = 0
    wrong_bytes: int = 0
    tracebacks: int = 0  # in the proxy's log
    last_traceback_line: str = ""  # the exception of the first one
    readings: list[Reading] = dataclasses.field(default_factory=list)
    first_errors: list[str] = dataclasses.field(default_factory=list)  # a few, to say what went wrong


Archive = harness.Registered


def abort_soak(origin, server: harness.Server, workdir: Path, *, seed: int, rounds: int | None = None,
               seconds: float | None = None, clients: int = 32, abort_share: float = 0.25,
               misses_per_round: int = 4) -> SoakFigures:
    """Run rounds (`rounds` of them, or for `seconds`) and return the figures; never raises on what
    the clients saw: the caller judges the figures."""
    rng, figures = random.Random(seed), SoakFigures(seed, clients)
    upstream_ports = {urllib.parse.urlsplit(url).port for url in origin.urls.values()}
    kept: list[Archive] = []
    deadline = None if seconds is None else time.monotonic() + seconds
    while (rounds is None or figures.rounds < rounds) and (deadline is None or time.monotonic() < deadline):
        fresh = [_new_archive(origin, workdir, rng, f"{figures.rounds}-{n}") for n in range(misses_per_round)]
        plan = [_plan_client(rng, fresh, kept, abort_share) for _ in range(clients)]
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = pool.map(lambda job: download(f"{server.url}/{job[0].handle}", abort_after=job[1]), plan)
            for (archive, _), got in zip(plan, results):
                _count(figures, got, archive)
        _settle(server)
        figures.readings.append(Reading(figures.rounds, server.open_fds(), server.pooled_fds(upstream_ports),
                                        server.rss_bytes()))
        kept = (kept + fresh)[-KEPT:]
        figures.rounds += 1
    log = server.log.read_text(errors="replace")
    figures.tracebacks = log.count("Traceback")
    figures.last_traceback_line = _first_exception(log)
    return figures


def growth(readings: list[Reading], rss_slack: int) -> str | None:
    """What grew beyond its slack from the warmed reading to the last (fds outside the pools by more
    than FD_SLACK, RSS by more than rss_slack), or None; None too before there are two to compare."""
    if len(readings) <= WARMED + 1:
        return None
    warmed, last = readings[WARMED], readings[-1]
    if last.held > warmed.held + FD_SLACK:
        return f"open fds outside the pools grew from {warmed.held} to {last.held} (slack {FD_SLACK})"
    if last.rss > warmed.rss + rss_slack:
        return f"RSS grew from {format_size(warmed.rss)} to {format_size(last.rss)} (slack {format_size(rss_slack)})"
    return None


def _new_archive(origin, workdir: Path, rng: random.Random, name: str) -> Archive:
    archive = harness.register_random_archive(origin, workdir / f"soak-{name}.tar.gz", rng)
    origin.faults(archive.model, throttle_bps=MISS_RATE)
    return archive


def _plan_client(rng: random.Random, fresh: list[Archive], kept: list[Archive],
                 abort_share: float) -> tuple[Archive, int | None]:
    """(what one client fetches: a miss or a hit, half and half; the byte it hangs up at, or None)."""
    archive = rng.choice(fresh if not kept or rng.random() < 0.5 else kept)
    return archive, rng.randrange(1, archive.size) if rng.random() < abort_share else None


def _count(figures: SoakFigures, got: Fetched, archive: Archive) -> None:
    figures.requests += 1
    if got.aborted:
        figures.aborts += 1
        return
    if got.served_wrong(archive.sha256):
        figures.wrong_bytes += 1
    elif not got.served_whole(archive.sha256):
        figures.errors += 1
        if len(figures.first_errors) < 5:
            figures.first_errors.append(f"{archive.handle}: {got}")


def _settle(server: harness.Server, timeout: float = 30) -> None:
    """Until no fetch is under way (fetches whose clients all left go on to their commit)."""
    deadline = time.monotonic() + timeout
    while _flights_in_progress(server) and time.monotonic() < deadline:
        time.sleep(0.05)


def _flights_in_progress(server: harness.Server) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return next((sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                 if sample.name == "hubproxy_flights_in_progress"), 0.0)


def _first_exception(log: str) -> str:
    """The exception line closing the log's first traceback ("" when there is none)."""
    lines = log.partition("Traceback")[2].splitlines()
    return next((line for line in lines[1:] if line and not line.startswith(" ")), "")
