"""Operators steer the cache from the command line, also while a proxy serves from it: list,
stats, pin, purge, evict (LRU, age, name; never a pinned entry) and verify (quarantine, repair)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli


@pytest.fixture
def blobs(tmp_path):
    """Three different 100 KB stand-in archives (the proxy only checks the gzip magic)."""
    made = []
    for name in "abc":
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(b"\x1f\x8b" + os.urandom(100_000))
        made.append(path)
    return made


def _ls(cache_dir) -> dict[str, dict]:
    result = run_cli("cache", "ls", "--json", "--cache-dir", cache_dir)
    assert result.returncode == 0, result.stderr
    return {entry["key"]: entry for entry in json.loads(result.stdout)}


def _fill(proxy, origin, blobs) -> list[str]:
    """Fetch a, b, c in that order, then hit a again: b is now the least recently used."""
    models = [origin.register(blob) for blob in blobs]
    for model in models:
        assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    assert proxy.get(f"/{models[0].handle}")[1]["X-Cache"] == "HIT"
    proxy.stop()  # hits reach the index in batches, and at shutdown
    return [f"tfhub:/{model.handle}" for model in models]


def test_ls_and_stats_describe_the_cache(proxy, origin, blobs):
    a, b, c = _fill(proxy, origin, blobs)

    entries = _ls(proxy.cache_dir)
    stats = json.loads(run_cli("cache", "stats", "--json", "--cache-dir", proxy.cache_dir).stdout)

    assert set(entries) == {a, b, c}
    assert entries[a]["hits"] == 1 and entries[b]["hits"] == 0 and not entries[a]["pinned"]
    assert stats["entries"] == 3 and stats["bytes"] == 3 * 100_002 and stats["hits"] == 1


def test_evict_to_size_goes_least_recently_used_first_and_spares_pins(proxy, origin, blobs):
    a, b, c = _fill(proxy, origin, blobs)
    cache = proxy.cache_dir

    dry = run_cli("cache", "evict", "--max-size", "250K", "--dry-run", "--cache-dir", cache)
    assert dry.returncode == 0 and f"would remove {b}" in dry.stdout and set(_ls(cache)) == {a, b, c}

    assert run_cli("cache", "evict", "--max-size", "250K", "--cache-dir", cache).returncode == 0
    assert set(_ls(cache)) == {a, c}

    assert run_cli("cache", "pin", "--cache-dir", cache, f"https://tfhub.dev{a.removeprefix('tfhub:')}").returncode == 0
    assert run_cli("cache", "evict", "--max-size", "0B", "--cache-dir", cache).returncode == 0
    assert set(_ls(cache)) == {a}, "a pinned entry is never evicted"
    assert len([p for p in (cache / "blobs").rglob("*") if p.is_file()]) == 1


def test_evict_by_age_and_purge_by_glob(proxy, origin, blobs):
    a, b, c = _fill(proxy, origin, blobs)
    cache = proxy.cache_dir

    assert run_cli("cache", "evict", "--older-than", "1d", "--cache-dir", cache).returncode == 0
    assert set(_ls(cache)) == {a, b, c}

    run_cli("cache", "pin", "--cache-dir", cache, a)
    purged = run_cli("cache", "purge", "--cache-dir", cache, "tfhub:/google/*", "--include-pinned")
    assert purged.returncode == 0
    assert _ls(cache) == {}, "--include-pinned purges pinned entries too"
    assert not any(p.is_file() for p in (cache / "blobs").rglob("*"))


def test_purge_refuses_pinned_entries_without_include_pinned(proxy, origin, blobs):
    a, b, c = _fill(proxy, origin, blobs)
    cache = proxy.cache_dir
    assert run_cli("cache", "pin", "--cache-dir", cache, a, b).returncode == 0

    refused = run_cli("cache", "purge", "--cache-dir", cache, "tfhub:/google/*")

    assert refused.returncode == 2
    assert "2 of the 3 matching entries are pinned" in refused.stderr and "--include-pinned" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert set(_ls(cache)) == {a, b, c}, "nothing is removed, pinned or not"
    assert run_cli("cache", "purge", "--cache-dir", cache, c).returncode == 0, "an unpinned match purges as before"
    assert set(_ls(cache)) == {a, b}


def test_purge_while_serving_makes_the_next_request_fetch_afresh(proxy, origin, blobs):
    model = origin.register(blobs[0])
    assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"

    assert run_cli("cache", "purge", "--cache-dir", proxy.cache_dir, f"/{model.handle}").returncode == 0

    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "MISS", blobs[0].read_bytes())
    assert origin.object_gets(model) == 2


def test_verify_quarantines_a_flipped_byte_and_repair_restores(proxy, origin, blobs):
    model = origin.register(blobs[0])
    assert proxy.get(f"/{model.handle}")[0] == 200
    [blob] = [p for p in (proxy.cache_dir / "blobs").rglob("*") if p.is_file()]
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0x01
    blob.write_bytes(bytes(data))
    config = proxy.cache_dir.parent / "hubproxy.toml"  # where --repair finds the upstreams
    config.write_text("[upstreams]\n" + "".join(f'{name} = "{origin.urls[name]}"\n' for name in ("tfhub", "kaggle", "gcs")))

    found = run_cli("cache", "verify", "--cache-dir", proxy.cache_dir)
    assert found.returncode == 1 and f"tfhub:/{model.handle}" in found.stderr
    assert not blob.exists() and len(list((proxy.cache_dir / "quarantine").iterdir())) == 1
    assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS", "a quarantined blob is never served"

    data = bytearray(blob.read_bytes())
    data[5000] ^= 0x01
    blob.write_bytes(bytes(data))
    repaired = run_cli("cache", "verify", "--repair", "--cache-dir", proxy.cache_dir, "--config", config)
    assert repaired.returncode == 1 and f"repaired tfhub:/{model.handle}" in repaired.stderr
    clean = run_cli("cache", "verify", "--cache-dir", proxy.cache_dir)
    assert clean.returncode == 0
    assert blob.read_bytes() == blobs[0].read_bytes()
