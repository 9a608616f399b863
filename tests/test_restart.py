"""A restarted proxy serves every committed archive from disk alone and clears interrupted fetches."""

from __future__ import annotations

import socket

from tests.conftest import hub_load, loaded_output


def _dead_upstreams() -> dict[str, str]:
    """Upstream URLs on a loopback port nobody listens on: any upstream contact fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {name: f"http://127.0.0.1:{port}" for name in ("tfhub", "kaggle", "gcs")}


def test_restart_serves_committed_archives_without_upstream(proxy_factory, clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    cache_dir = tmp_path / "cache"
    first = proxy_factory(cache_dir)
    status, headers, _ = first.get(f"/{model.handle}")
    assert (status, headers["X-Cache"]) == (200, "MISS")
    first.stop()
    leftover = cache_dir / "tmp" / "fetch-interrupted.part"
    leftover.write_bytes(b"\x1f\x8b half an archive")

    restarted = proxy_factory(cache_dir, upstreams=_dead_upstreams())

    assert not leftover.exists()
    status, headers, body = restarted.get(f"/{model.handle}?tf-hub-format=compressed")
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert body == archives.small.read_bytes()
    result = hub_load(f"{restarted.url}/{model.handle}", tmp_path / "tfhub")
    assert loaded_output(result) == archives.expected(archives.small)
    assert origin.object_gets(model) == 1


def test_upstream_down_still_serves_hits_and_explains_misses(proxy_factory, clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    cache_dir = tmp_path / "cache"
    proxy_factory(cache_dir).get(f"/{model.handle}")

    offline = proxy_factory(cache_dir, "--retries", "1", upstreams=_dead_upstreams())

    status, headers, _ = offline.get(f"/{model.handle}")
    assert (status, headers["X-Cache"]) == (200, "HIT")
    status, _, reason = offline.get("/google/never-cached/1")
    assert status == 502
    assert b"cannot reach upstream" in reason and b"after 2 attempts" in reason
