"""Pass-through in process: the window that holds a fetch in memory when the disk refuses it, on its
own, then in the fetch pipeline against the origin emulator with a cache whose temp dir is a tiny
(or read-only) tmpfs that really refuses the writes.

Invariants under test: readers get every byte, whether it reached the file or only memory; memory
stays within the window's limit (plus the batch that went over it), so the slowest reader paces
the fetch; a reader can join only while the window still has every byte it needs.
"""

from __future__ import annotations

import asyncio

import pytest

from hubproxy.fetch.errors import FetchFailed
from hubproxy.fetch.flight import HOLDBACK, State
from hubproxy.fetch.ingest import BATCH_SIZE
from hubproxy.fetch.window import Window
from tests.conftest import STAND_IN_HOLD_AT, stand_in_archive
from tests.in_process import Reader, all_streaming, fetching, leave, origin_paused, release_when_held, stay, until

PIECES = [b"abc", b"defg", b"hi", b"jklmn"]
STREAM = b"".join(PIECES)
WINDOW_START = 100  # where the window starts in the stream

TEMP_ROOM = "size=1536k"  # the first batch of a fetch fits, the second does not
# asyncio reads at most 256 KiB from a socket at once, so a batch overshoots BATCH_SIZE by less.
LARGEST_BATCH = BATCH_SIZE + (256 << 10)


def _window(limit: int = 1000) -> Window:
    window = Window(WINDOW_START, limit)
    window.append(PIECES)
    return window


def _bytes(views) -> bytes:
    return b"".join(views)


# -- the window on its own -------------------------------------------------------------------

def test_window_reads_across_piece_boundaries():
    window = _window()
    for offset in range(len(STREAM)):
        for length in range(len(STREAM) - offset + 1):
            assert _bytes(window.read(WINDOW_START + offset, length)) == STREAM[offset:offset + length]


@pytest.mark.parametrize("offset, length", [(WINDOW_START - 1, 2), (WINDOW_START + len(STREAM) - 1, 2)])
def test_window_refuses_to_read_bytes_it_does_not_hold(offset, length):
    with pytest.raises(IndexError):
        _window().read(offset, length)


def test_window_drops_only_whole_pieces_every_reader_passed():
    window = _window()
    window.drop_before(WINDOW_START + 5)  # inside "defg": only "abc" is behind every reader
    assert (window.start, window.end) == (WINDOW_START + 3, WINDOW_START + len(STREAM))
    assert _bytes(window.read(WINDOW_START + 3, len(STREAM) - 3)) == STREAM[3:]
    with pytest.raises(IndexError):
        window.read(WINDOW_START + 2, 1)
    window.drop_before(WINDOW_START + 9)  # exactly the end of "hi"
    assert window.start == WINDOW_START + 9 and _bytes(window.read(window.start, 5)) == b"jklmn"


def test_window_writer_waits_above_the_limit_and_wakes_once_dropped_within_it():
    async def scenario():
        window = _window(limit=8)  # holds 14
        waiting = asyncio.create_task(window.wait_for_room())
        await asyncio.sleep(0)  # one turn of the loop: the task runs up to its wait
        blocked_while_over = not waiting.done()
        window.drop_before(WINDOW_START + 3)  # holds 11: still over
        await asyncio.sleep(0)
        still_blocked = not waiting.done()
        window.drop_before(WINDOW_START + 7)  # holds 7
        await asyncio.wait_for(waiting, 10)
        return blocked_while_over, still_blocked, window.held

    assert asyncio.run(scenario()) == (True, True, 7)


def test_window_writer_within_the_limit_does_not_wait():
    async def scenario():
        window = _window(limit=len(STREAM))
        await asyncio.wait_for(window.wait_for_room(), 10)

    asyncio.run(scenario())


# -- pass-through in the fetch pipeline ------------------------------------------------------

@pytest.fixture
def full_disk_store(store, tmpfs):
    """A store whose disk takes the first MiB of a fetch, then refuses it."""
    tmpfs(store.tmp, TEMP_ROOM)
    return store


@pytest.mark.parametrize("disk", ["full after the first MiB", "read-only"])
def test_pass_through_readers_get_identical_complete_bytes_and_nothing_is_stored(clean_origin, stand_in, store,
                                                                                 tmpfs, disk):
    tmpfs(store.tmp, TEMP_ROOM if disk != "read-only" else "ro")
    model = clean_origin.register(stand_in)

    async def scenario():
        async with fetching(clean_origin, store, model) as fetch:
            readers = [Reader() for _ in range(3)]
            return fetch, readers, await asyncio.gather(*fetch.start_all(readers))

    fetch, readers, bodies = asyncio.run(scenario())

    assert bodies == [stand_in.read_bytes()] * 3
    assert all(reader.contiguous_from_zero for reader in readers)
    from_memory = {from_window for reader in readers for _, _, from_window in reader.spans}
    assert from_memory == {True}  # the first MiB too: readers this close behind get the recent bytes kept in memory
    assert readers[0].flight.state is State.PASSED
    reason = "read_only" if disk == "read-only" else "no_space"
    assert fetch.sample("hubproxy_cache_write_errors_total", reason=reason) == 1
    assert fetch.sample("hubproxy_passthrough_fetches_total") == 1
    assert store.lookup(fetch.key) is None and store.stored_blobs() == set()
    assert list(store.tmp.iterdir()) == [], "no temp file left"
    assert clean_origin.object_gets(model) == 1


def test_pass_through_readers_get_the_bytes_held_in_memory_while_the_origin_pauses(clean_origin, full_disk_store,
                                                                                   held_stand_in, stand_in):
    """As on a disk that takes the writes, a paused (or slow) origin must not keep from the readers
    the bytes the proxy already holds, short of the last HOLDBACK."""
    taken_in = STAND_IN_HOLD_AT - LARGEST_BATCH  # at least: all but the batch being filled when the origin paused

    async def scenario():
        async with fetching(clean_origin, full_disk_store, held_stand_in) as fetch:
            reader = Reader()
            reading = fetch.start(reader)
            await origin_paused(clean_origin)
            await until(lambda: len(reader.data) >= taken_in - HOLDBACK, "the reader got the bytes held in memory")
            sent_while_paused = bytes(reader.data)
            await asyncio.to_thread(clean_origin.release)
            return sent_while_paused, await reading

    sent_while_paused, body = asyncio.run(scenario())

    assert sent_while_paused == stand_in.read_bytes()[:len(sent_while_paused)]
    assert body == stand_in.read_bytes()


def test_a_lagging_reader_paces_pass_through_and_memory_stays_within_the_limit(clean_origin, full_disk_store,
                                                                               tmp_path):
    archive = stand_in_archive(tmp_path / "large.tar.gz", 24 << 20)  # more than a window's limit
    model = clean_origin.register(archive)
    held: list[int] = []  # what the window held at every look

    def look(flight) -> None:
        if flight.window is not None:
            held.append(flight.window.held)

    async def scenario():
        async with fetching(clean_origin, full_disk_store, model) as fetch:
            laggard, eager = Reader(), Reader()

            def fetch_cannot_go_further() -> bool:
                flight = laggard.flight
                look(flight)
                return flight.window is not None and flight.window.held > flight.window.limit or \
                    flight.received == archive.stat().st_size

            async def lag(reader: Reader) -> None:  # reads on only once the window is full (or has it all)
                await until(fetch_cannot_go_further, "the window filled up")

            async def eager_look(reader: Reader) -> None:
                look(reader.flight)

            bodies = await asyncio.gather(fetch.read(laggard, lag), fetch.read(eager, eager_look))
            return laggard.flight, bodies

    flight, bodies = asyncio.run(scenario())

    assert bodies == [archive.read_bytes()] * 2
    assert flight.state is State.PASSED
    assert max(held) > flight.window.limit, "the laggard did lag: the window filled up"
    assert max(held) <= flight.window.limit + LARGEST_BATCH


def test_a_newcomer_after_bytes_left_memory_starts_a_new_flight(clean_origin, full_disk_store, held_stand_in,
                                                                stand_in):
    async def scenario():
        async with fetching(clean_origin, full_disk_store, held_stand_in) as fetch:
            readers = [Reader() for _ in range(2)]
            reading = fetch.start_all(readers)
            await until(lambda: readers[0].flight is not None and not readers[0].flight.joinable,
                        "the readers passed bytes the disk never took, and memory let them go")
            running = readers[0].flight.state
            newcomer = Reader()
            reading.append(fetch.start(newcomer))
            await release_when_held(clean_origin, 2)
            return readers, newcomer, running, await asyncio.gather(*reading)

    readers, newcomer, running, bodies = asyncio.run(scenario())

    assert running is State.STREAMING, "the first flight was still under way when the newcomer came"
    assert newcomer.joined is False and newcomer.flight is not readers[0].flight
    assert bodies == [stand_in.read_bytes()] * 3
    assert clean_origin.object_gets(held_stand_in) == 2


def test_pass_through_with_every_reader_gone_ends_the_fetch_and_leaves_no_temp_file(clean_origin, full_disk_store,
                                                                                    held_stand_in):
    """Nobody to stream to and nowhere to store: the fetch stops rather than fill memory for nobody."""
    store = full_disk_store

    async def scenario():
        async with fetching(clean_origin, store, held_stand_in) as fetch:
            readers = [Reader() for _ in range(2)]
            reading = fetch.start_all(readers, after_span=stay)
            await all_streaming(readers)
            await origin_paused(clean_origin)  # the rest of the archive comes after they left
            await leave(reading)
            await asyncio.to_thread(clean_origin.release)
            try:
                await readers[0].flight.finished()
            except FetchFailed as e:
                return fetch.key, e
            return fetch.key, None

    key, failure = asyncio.run(scenario())

    assert failure is not None and failure.status == 503 and "no client is left" in failure.message
    assert store.lookup(key) is None and store.stored_blobs() == set()
    assert list(store.tmp.iterdir()) == [], "no temp file left"
