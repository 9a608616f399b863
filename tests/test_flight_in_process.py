"""The fetch pipeline in process: hubproxy's Flights, Flight and Ingest run in the test's event loop
against the origin emulator, with readers that join, lag, leave or die at chosen moments.

The black-box tests show a client's view; these pin down what each reader of one flight is sent,
and what the flight does when its readers misbehave.
"""

from __future__ import annotations

import asyncio

import pytest

from hubproxy.fetch.errors import FetchFailed
from hubproxy.fetch.flight import HOLDBACK, State
from tests.conftest import STAND_IN_HOLD_AT, STAND_IN_SIZE
from tests.in_process import Reader, all_streaming, fetching, leave, release_when_held, stay, until

READERS = 8


def test_many_readers_of_one_key_cost_one_origin_get_and_get_identical_complete_bytes(
        clean_origin, held_stand_in, stand_in, store):
    async def scenario():
        async with fetching(clean_origin, store, held_stand_in) as fetch:
            leader = Reader()
            reading = [fetch.start(leader)]
            await leader.first_span.wait()  # bytes are flowing: the rest join a flight under way
            joiners = [Reader() for _ in range(READERS - 1)]
            reading += fetch.start_all(joiners)
            await until(lambda: fetch.sample("hubproxy_flight_readers") == READERS, "every reader attached")
            await release_when_held(clean_origin)
            return [leader, *joiners], await asyncio.gather(*reading)

    readers, bodies = asyncio.run(scenario())

    assert bodies == [stand_in.read_bytes()] * READERS
    assert [reader.joined for reader in readers] == [False] + [True] * (READERS - 1)
    assert all(reader.contiguous_from_zero for reader in readers)
    assert len({reader.flight for reader in readers}) == 1
    assert clean_origin.object_gets(held_stand_in) == 1


def test_leader_leaving_mid_stream_leaves_the_flight_running_for_the_others(clean_origin, held_stand_in, stand_in,
                                                                            store):
    async def scenario():
        async with fetching(clean_origin, store, held_stand_in) as fetch:
            leader = Reader()
            leaving = fetch.start(leader, after_span=stay)
            await leader.first_span.wait()
            others = [Reader() for _ in range(3)]
            reading = fetch.start_all(others)
            await all_streaming(others)
            await leave([leaving])  # the leader dies mid-stream
            late = Reader()
            reading.append(fetch.start(late))
            await until(lambda: late.joined is not None, "the late reader attached")
            await release_when_held(clean_origin)
            return leader, [*others, late], await asyncio.gather(*reading)

    leader, readers, bodies = asyncio.run(scenario())

    assert bodies == [stand_in.read_bytes()] * 4
    assert [reader.joined for reader in readers] == [True] * 4, "the late reader joined the flight the leader left"
    assert leader.flight.state is State.COMMITTED
    assert leader.flight.entry == store.lookup(leader.flight.key)
    assert clean_origin.object_gets(held_stand_in) == 1


def test_a_flight_every_reader_left_still_commits(clean_origin, held_stand_in, stand_in, store):
    async def scenario():
        async with fetching(clean_origin, store, held_stand_in) as fetch:
            readers = [Reader() for _ in range(3)]
            reading = fetch.start_all(readers, after_span=stay)
            await all_streaming(readers)
            await leave(reading)
            assert fetch.sample("hubproxy_flight_readers") == 0
            await release_when_held(clean_origin)
            return await readers[0].flight.finished()

    entry = asyncio.run(scenario())

    assert store.lookup(entry.key) == entry
    assert store.blob_path(entry.sha256).read_bytes() == stand_in.read_bytes()
    assert clean_origin.object_gets(held_stand_in) == 1


def test_a_reader_lagging_behind_a_committed_flight_still_gets_every_byte(clean_origin, stand_in, store):
    """A disk-backed flight does not wait for its slowest reader, and that reader goes on reading
    the temp file after the commit has moved it into the blob store."""
    model = clean_origin.register(stand_in)

    async def scenario():
        async with fetching(clean_origin, store, model) as fetch:
            resume = asyncio.Event()
            laggard, eager = Reader(), Reader()

            async def lag_after_the_first_span(reader: Reader) -> None:
                if len(reader.spans) == 1:
                    await resume.wait()

            lagging, reading = fetch.start(laggard, lag_after_the_first_span), fetch.start(eager)
            await eager.first_span.wait()
            entry = await eager.flight.finished()
            eager_body, held_back = await reading, len(laggard.data)
            resume.set()
            return entry, eager_body, held_back, await lagging

    entry, eager_body, held_back, lagging_body = asyncio.run(scenario())

    assert held_back < STAND_IN_SIZE, "the laggard had not got the archive when the flight committed"
    assert eager_body == lagging_body == stand_in.read_bytes()
    assert store.lookup(entry.key) == entry


@pytest.mark.parametrize("fault", ["truncate_at", "corrupt_at"])
def test_a_bad_upstream_fails_every_reader_before_the_last_holdback_bytes(clean_origin, stand_in, store, fault):
    model = clean_origin.register(stand_in)
    clean_origin.faults(model, hold_after=STAND_IN_HOLD_AT, **{fault: STAND_IN_SIZE - 200_000})
    ahead: list[int] = []  # at each span sent while streaming: how far the reader is past what may be sent

    async def check_holdback(reader: Reader) -> None:
        if reader.flight.state is State.STREAMING:
            ahead.append(len(reader.data) - (reader.flight.received - HOLDBACK))

    async def scenario():
        async with fetching(clean_origin, store, model) as fetch:
            readers = [Reader() for _ in range(4)]
            reading = fetch.start_all(readers, check_holdback)
            await all_streaming(readers)
            await release_when_held(clean_origin)
            return readers, await asyncio.gather(*reading, return_exceptions=True)

    readers, outcomes = asyncio.run(scenario())

    assert all(isinstance(outcome, FetchFailed) and outcome.status == 502 for outcome in outcomes), outcomes
    assert ahead and max(ahead) <= 0, "a reader got bytes within HOLDBACK of what had arrived"
    assert all(len(reader.data) <= STAND_IN_SIZE - HOLDBACK for reader in readers)
    assert all(reader.data == stand_in.read_bytes()[:len(reader.data)] for reader in readers)
    assert readers[0].flight.state is State.FAILED
    assert store.lookup(readers[0].flight.key) is None
    assert store.stored_blobs() == set()
    assert list(store.tmp.iterdir()) == [], "no temp file left"
