"""Readers of a fetch must not wait for the disk: the bytes a flight last received stay in memory
(Flight.recent) while the writer takes them to the file, and readers close behind are sent them
from there. The hazards: a reader held to the disk's pace or made to read back what was just
written; memory that grows with the archive; bytes dropped from memory before they are on disk.
"""

from __future__ import annotations

import asyncio

from hubproxy.fetch.flight import HOLDBACK, RECENT, Flight
from tests.conftest import STAND_IN_HOLD_AT
from tests.in_process import Reader, fetching, release_when_held, until

MiB = 1 << 20


def test_a_reader_keeping_up_is_sent_bytes_from_memory_before_they_reach_the_disk(clean_origin, held_stand_in,
                                                                                   stand_in, store):
    async def scenario():
        async with fetching(clean_origin, store, held_stand_in) as fetch:
            reader = Reader()
            reading = fetch.start(reader)
            sent_while_held = STAND_IN_HOLD_AT - HOLDBACK
            await until(lambda: len(reader.data) == sent_while_held, "the reader got all it may while held")
            spans_while_held = list(reader.spans)
            await release_when_held(clean_origin)
            return spans_while_held, await reading

    spans, body = asyncio.run(scenario())

    assert body == stand_in.read_bytes()
    assert spans and all(from_memory for _, _, from_memory in spans)


def test_memory_keeps_only_the_last_bytes_once_they_are_on_disk():
    async def scenario():
        flight = Flight("tfhub:/google/x/1", "http://127.0.0.1/x")
        flight.keep_recent(0)
        for n in range(1, 3 * RECENT // MiB + 1):
            flight.arrived([bytes(MiB)])
            flight.advance(n * MiB)
            assert flight.recent.held <= RECENT
        return flight

    flight = asyncio.run(scenario())
    assert flight.recent.end == flight.received == 3 * RECENT
    assert flight.recent.start == 2 * RECENT  # older bytes are read from the file
    assert flight._span(0, MiB) == (0, MiB, None)
    assert flight._span(2 * RECENT, MiB)[2] is not None


def test_bytes_not_yet_on_disk_never_leave_memory():
    async def scenario():
        flight = Flight("tfhub:/google/x/1", "http://127.0.0.1/x")
        flight.keep_recent(0)
        for _ in range(2 * RECENT // MiB):
            flight.arrived([bytes(MiB)])
        held_with_nothing_written = flight.recent.held
        flight.advance(RECENT // 2)
        return flight, held_with_nothing_written

    flight, held = asyncio.run(scenario())
    assert held == 2 * RECENT
    assert flight.recent.start == RECENT // 2  # what reached the disk may go; nothing after it
