"""In-process harness: hubproxy's own fetch pipeline and front run in the test's event loop (a sync
test calls asyncio.run), against the origin emulator running as its own process.

Calls to the origin's control API block: from the event loop, make them with asyncio.to_thread,
or the loop stops reading the transfer the origin is writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from hubproxy.cache.store import Store
from hubproxy.config import Settings, load_settings
from hubproxy.fetch.flight import Flight
from hubproxy.fetch.flights import Flights
from hubproxy.fetch.upstream import Upstream
from hubproxy.handles import UPSTREAM_NAMES, parse_request_target
from hubproxy.metrics import Metrics
from hubproxy.serve.app import create_app
from tests.origin_control import Model, Origin

WAIT_SECONDS = 60


def settings_for(origin: Origin, cache_dir: Path) -> Settings:
    """Settings that fetch from the origin emulator, as tests/conftest.start_proxy passes them."""
    return load_settings(environ={}, overrides={
        "upstreams": {name: origin.urls[name] for name in UPSTREAM_NAMES},
        "cache_dir": str(cache_dir), "backoff_seconds": 0.01})


# -- readers of flights ----------------------------------------------------------------------

@dataclasses.dataclass
class Reader:
    """One reader of a flight and what it was sent, span by span."""
    flight: Flight | None = None
    joined: bool | None = None
    data: bytearray = dataclasses.field(default_factory=bytearray)
    spans: list[tuple[int, int, bool]] = dataclasses.field(default_factory=list)  # (start, length, from memory)
    first_span: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def contiguous_from_zero(self) -> bool:
        ends = [0] + [start + length for start, length, _ in self.spans]
        return all(start == end for (start, _, _), end in zip(self.spans, ends))


AfterSpan = Callable[[Reader], Awaitable[None]]


async def stay(reader: Reader | None = None) -> None:
    """A reader that stops reading (as an after_span: after its first span), and leaves only when
    cancelled."""
    await asyncio.Event().wait()


@dataclasses.dataclass
class Fetching:
    """The flights registry of a serving proxy, and the one key the test's readers ask it for."""
    flights: Flights
    metrics: Metrics
    key: str
    url: str

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def start(self, reader: Reader, after_span: AfterSpan | None = None) -> asyncio.Task:
        """A task in which reader follows the key's flight to its end (see read); returns the bytes."""
        return asyncio.create_task(self.read(reader, after_span))

    def start_all(self, readers: list[Reader], after_span: AfterSpan | None = None) -> list[asyncio.Task]:
        return [self.start(reader, after_span) for reader in readers]

    async def read(self, reader: Reader, after_span: AfterSpan | None = None) -> bytes:
        """Join the key's flight and follow it to the end as a client would: file spans read from
        flight.open_file(), window spans from their memoryviews. `after_span` runs after each span
        (a reader that lags, or leaves); returns every byte sent."""
        async with self.flights.join(self.key, self.url) as (flight, joined):
            reader.flight, reader.joined = flight, joined
            await flight.ready()
            with flight.open_file() or contextlib.nullcontext() as archive:
                async with contextlib.aclosing(flight.spans()) as spans:
                    async for start, length, views in spans:
                        chunk = os.pread(archive.fileno(), length, start) if views is None else b"".join(views)
                        assert len(chunk) == length
                        reader.data += chunk
                        reader.spans.append((start, length, views is not None))
                        reader.first_span.set()
                        if after_span is not None:
                            await after_span(reader)
        return bytes(reader.data)


@contextlib.asynccontextmanager
async def fetching(origin: Origin, store: Store, model: Model) -> AsyncIterator[Fetching]:
    """Flights on store that fetch from the origin, for the key a client's request for model names;
    flights still running at the end are cancelled."""
    settings = settings_for(origin, store.root)
    handle = parse_request_target(f"/{model.handle}")
    async with Upstream(settings) as upstream:
        metrics = Metrics()
        flights = Flights(store, upstream, metrics)
        try:
            yield Fetching(flights, metrics, handle.key, handle.upstream_url(settings.upstreams[handle.upstream]))
        finally:
            await flights.close()


async def leave(tasks: list[asyncio.Task]) -> None:
    """The readers in those tasks leave (their clients hang up)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- waiting on the objects under test and on the origin -------------------------------------

async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state of the objects under test (their changes raise no event a test can await)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.001)


async def all_streaming(readers: list[Reader]) -> None:
    await until(lambda: all(reader.first_span.is_set() for reader in readers), "every reader got a span")


async def origin_paused(origin: Origin, count: int = 1) -> None:
    """Until `count` transfers have reached the origin's pause."""
    await asyncio.to_thread(origin.wait_held, count)


async def release_when_held(origin: Origin, count: int = 1) -> None:
    """Let the origin's paused transfers go on once `count` of them have reached the pause (released
    before, a transfer would pause for good when it gets there)."""
    await origin_paused(origin, count)
    await asyncio.to_thread(origin.release)


# -- the front -------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, web.Application]]:
    """The aiohttp app on a real socket on 127.0.0.1: (base URL, app)."""
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", app
    finally:
        await runner.cleanup()
