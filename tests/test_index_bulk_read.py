"""The store lists its index with one SELECT through diskcache's private connection (ten times the
speed of a get per key). diskcache is pinned for it; this test fails loudly if the bulk read ever
disagrees with diskcache's public per-key API, or stops working, on the installed version."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import diskcache

from hubproxy.cache.store import Store


def test_bulk_read_of_the_index_agrees_with_the_public_per_key_read(tmp_path):
    store = Store(tmp_path / "cache")
    for n in range(50):
        fd, temp = store.new_temp_file()
        os.write(fd, b"\x1f\x8b" + n.to_bytes(4, "big"))
        os.close(fd)
        sha256 = hashlib.sha256(temp.read_bytes()).hexdigest()
        store.commit(f"tfhub:/google/m{n}/1", temp, sha256, 6, etag=None, content_type="application/x-tar",
                     source="test", durable=False)
    store.set_pinned("tfhub:/google/m7/1", True)
    bulk = sorted(store.entries(), key=lambda e: e.key)
    store.close()

    with diskcache.Cache(str(tmp_path / "cache" / "index")) as index:
        one_by_one = sorted((index[key] for key in index.iterkeys()), key=lambda raw: raw["key"])

    assert len(bulk) == 50
    assert [dataclasses.asdict(entry) for entry in bulk] == one_by_one
    assert [e.key for e in bulk if e.pinned] == ["tfhub:/google/m7/1"]
