"""The store remembers an index read for a moment, so a hot key costs no index read per request, and
only for that moment: a serving cache that has seen many keys keeps no entry for each key it ever
looked up (expired reads were kept until 65,536 had piled up, and the soak's RSS grew with them)."""

from __future__ import annotations

import gc
import hashlib
import os

from hubproxy.cache.memo import Memo
from hubproxy.cache.store import Entry, Store

KEYS = 500


def _commit(store: Store, n: int) -> str:
    key = f"tfhub:/google/m{n}/1"
    fd, temp = store.new_temp_file()
    os.write(fd, b"\x1f\x8b" + n.to_bytes(4, "big"))
    os.close(fd)
    store.commit(key, temp, hashlib.sha256(temp.read_bytes()).hexdigest(), 6, etag=None,
                 content_type="application/x-tar", source="test", durable=False)
    return key


def _entries_alive() -> int:
    gc.collect()
    return sum(isinstance(thing, Entry) for thing in gc.get_objects())


def test_a_cache_that_saw_many_keys_keeps_no_expired_index_read_in_memory(tmp_path):
    store = Store(tmp_path / "cache", memo_seconds=0)  # every read has expired by the next one
    before = _entries_alive()
    for n in range(KEYS):
        assert store.lookup(_commit(store, n)) is not None

    assert _entries_alive() - before <= 1, "expired index reads are kept in memory"
    store.close()


def test_a_hot_key_is_answered_from_the_memo_until_its_time_is_up(tmp_path):
    remembering, forgetful = Store(tmp_path / "cache", memo_seconds=3600), Store(tmp_path / "cache", memo_seconds=0)
    key = _commit(remembering, 1)
    assert remembering.lookup(key) is not None and forgetful.lookup(key) is not None

    other_process = Store(tmp_path / "cache")
    other_process.remove_keys([key])  # a purge
    other_process.close()

    assert remembering.lookup(key) is not None, "the memo was not used"
    assert forgetful.lookup(key) is None
    remembering.close()
    forgetful.close()


def test_the_memo_holds_at_most_its_cap_dropping_the_oldest():
    memo: Memo[int] = Memo(seconds=60, most=3)
    for n in range(5):
        memo.put(f"k{n}", n)

    assert len(memo) == 3
    assert [memo.get(f"k{n}") for n in range(5)] == [None, None, 2, 3, 4]
