"""The per-key flight locks that make single flight hold across processes (cache/flightlocks.py),
in process: flock locks belong to an open file, so two FlightLocks on one cache contend as two
processes would. A leader that ends cleanly is told apart from one that died; a description can
never name a file outside the cache's tmp/.
"""

from __future__ import annotations

import asyncio
import os

from hubproxy.cache.flightlocks import FlightLocks, Lead, Watch
from hubproxy.cache.store import Store
from hubproxy.fetch.flight import Flight, State
from hubproxy.fetch.follow import Follow, Next, Partial

KEY = "tfhub:/google/x/1"


def test_one_process_leads_a_key_and_another_watches_it(tmp_path):
    first, second = FlightLocks(tmp_path), FlightLocks(tmp_path)
    lead = first.try_lead(KEY)
    watch = second.try_lead(KEY)
    assert isinstance(lead, Lead) and isinstance(watch, Watch)
    assert isinstance(second.try_lead("tfhub:/google/other/1"), Lead)  # other keys are free
    assert watch.leader_gone() is False
    lead.describe({"temp": "fetch-abc.part"})
    assert watch.record() == {"temp": "fetch-abc.part"}


def test_a_leader_that_ends_cleanly_leaves_no_lock_to_take_over(tmp_path):
    lead, watch = FlightLocks(tmp_path).try_lead(KEY), FlightLocks(tmp_path).try_lead(KEY)
    lead.describe({"temp": "fetch-abc.part"})
    lead.end()
    assert watch.leader_gone() is True
    assert list((tmp_path / "flights").iterdir()) == []
    assert isinstance(FlightLocks(tmp_path).try_lead(KEY), Lead)


def test_the_lock_of_a_leader_that_died_passes_to_one_watcher_with_its_description(tmp_path):
    lead = FlightLocks(tmp_path).try_lead(KEY)
    watchers = [FlightLocks(tmp_path).try_lead(KEY) for _ in range(2)]
    lead.describe({"temp": "fetch-abc.part"})
    os.close(lead._fd)  # as the kernel does for a process killed with SIGKILL: nothing unlinked

    taken = watchers[0].leader_gone()
    assert isinstance(taken, Lead) and taken.record() == {"temp": "fetch-abc.part"}
    assert watchers[1].leader_gone() is False  # the new leader holds it now
    assert isinstance(FlightLocks(tmp_path).try_lead(KEY), Watch)


def test_a_description_never_names_a_file_outside_the_caches_tmp(tmp_path):
    store = Store(tmp_path / "cache")
    for temp in ("../../etc/passwd", "/etc/passwd", "fetch-a/../../x.part", "fetch-.part", 7, None):
        assert Partial.from_record({"temp": temp, "headers": [], "final": "x"}, store) is None
    assert Partial.from_record({"temp": "fetch-ab_9.part", "headers": [["ETag", '"e"']], "final": "x"},
                               store).temp == store.tmp / "fetch-ab_9.part"
    assert Partial.from_record({"passing": True}, store) is None
    assert Partial.from_record({"temp": "fetch-ab.part", "headers": "junk"}, store) is None
    store.close()


def test_a_follower_begins_only_once_the_leaders_file_holds_bytes(tmp_path):
    """A leader that fails on its first bytes leaves followers with nothing sent: they start over
    (and answer their clients with a status of their own) rather than cut a 200 already begun."""
    store = Store(tmp_path / "cache")
    temp_fd, temp = store.new_temp_file()
    lead = FlightLocks(store.root).try_lead(KEY)
    lead.describe({"temp": temp.name, "headers": [["Content-Length", "100"]], "final": "x"})

    async def follow_then_leader_fails():
        flight = Flight(KEY, "http://origin/x")
        following = asyncio.create_task(Follow(flight, FlightLocks(store.root).try_lead(KEY), store).run())
        while flight.temp_path is None:  # it has read the description and opened the (empty) file
            await asyncio.sleep(0.01)
        state_then = flight.state
        store.discard(temp)
        lead.end()  # failed cleanly
        return state_then, await following

    state_then, outcome = asyncio.run(follow_then_leader_fails())
    assert (state_then, outcome) == (State.CONNECTING, Next.START_OVER)
    os.close(temp_fd)
    store.close()
