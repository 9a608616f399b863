"""A proxy with a size cap evicts least recently used entries on its own, spares pinned ones,
and a download of an archive evicted meanwhile still completes."""

from __future__ import annotations

import http.client
import json
import os
import time

from tests.conftest import run_cli


def _blob(tmp_path, name: str, size: int):
    path = tmp_path / f"{name}.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(size - 2))
    return path


def _keys(cache_dir) -> set[str]:
    return {entry["key"] for entry in json.loads(run_cli("cache", "ls", "--json", "--cache-dir", cache_dir).stdout)}


def _wait_for_evictions(proxy, count: int) -> None:
    deadline = time.monotonic() + 60
    while proxy.metric("hubproxy_evictions_total") < count:  # an event the proxy reports
        assert time.monotonic() < deadline, "no eviction happened"
        time.sleep(0.05)


def test_cap_evicts_least_recently_used_and_spares_pins(proxy_factory, clean_origin, tmp_path):
    origin = clean_origin
    proxy = proxy_factory(tmp_path / "cache", "--max-size", "250K")
    a, b, c = (origin.register(_blob(tmp_path, name, 100_000)) for name in "abc")
    for model in (a, b):
        assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    assert run_cli("cache", "pin", "--cache-dir", proxy.cache_dir, f"/{a.handle}").returncode == 0

    assert proxy.get(f"/{c.handle}")[1]["X-Cache"] == "MISS"  # 300 KB > 250 KB: one must go
    _wait_for_evictions(proxy, 1)

    assert _keys(proxy.cache_dir) == {f"tfhub:/{a.handle}", f"tfhub:/{c.handle}"}, "b was the unpinned LRU"
    assert proxy.get(f"/{b.handle}")[1]["X-Cache"] == "MISS"


def test_an_archive_evicted_mid_download_still_arrives_whole(proxy, origin, tmp_path):
    archive = _blob(tmp_path, "big", 64 << 20)
    model = origin.register(archive)
    assert proxy.get(f"/{model.handle}")[0] == 200

    connection = http.client.HTTPConnection(proxy.url.removeprefix("http://"), timeout=120)
    connection.request("GET", f"/{model.handle}")
    response = connection.getresponse()
    assert response.headers["X-Cache"] == "HIT"
    head = response.read(1 << 20)
    assert run_cli("cache", "purge", "--cache-dir", proxy.cache_dir, f"/{model.handle}").returncode == 0
    assert not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))

    assert head + response.read() == archive.read_bytes()


def test_a_cache_over_a_smaller_cap_after_restart_is_evicted_at_start_up(proxy_factory, clean_origin, tmp_path):
    cache_dir = tmp_path / "cache"
    first = proxy_factory(cache_dir)
    for name in "abc":
        assert first.get(f"/{clean_origin.register(_blob(tmp_path, name, 100_000)).handle}")[0] == 200
    first.stop()

    restarted = proxy_factory(cache_dir, "--max-size", "150K")
    restarted.wait_for_log("index and blobs reconciled")  # the start-up pass of housekeeping is done

    entries = json.loads(run_cli("cache", "ls", "--json", "--cache-dir", cache_dir).stdout)
    assert sum(entry["size"] for entry in entries) <= 150_000, "still over the cap after start-up"
    assert restarted.metric("hubproxy_cache_bytes") <= 150_000
