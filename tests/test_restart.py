"""A restarted proxy serves every committed archive from disk alone and clears interrupted fetches."""

from __future__ import annotations

import json
import socket
import threading

from tests.conftest import hub_load, loaded_output, run_cli, stand_in_archive


def _dead_upstreams() -> dict[str, str]:
    """Upstream URLs on a loopback port nobody listens on: any upstream contact fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {name: f"http://127.0.0.1:{port}" for name in ("tfhub", "kaggle", "gcs")}


def test_restart_clears_the_temp_files_of_interrupted_fetches(proxy_factory, tmp_path):
    cache_dir = tmp_path / "cache"
    proxy_factory(cache_dir).stop()
    leftover = cache_dir / "tmp" / "fetch-interrupted.part"
    leftover.write_bytes(b"\x1f\x8b half an archive")

    proxy_factory(cache_dir, upstreams=_dead_upstreams())

    assert not leftover.exists()


def test_restart_serves_committed_archives_without_upstream(proxy_factory, clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    cache_dir = tmp_path / "cache"
    first = proxy_factory(cache_dir)
    status, headers, _ = first.get(f"/{model.handle}")
    assert (status, headers["X-Cache"]) == (200, "MISS")
    first.stop()

    restarted = proxy_factory(cache_dir, upstreams=_dead_upstreams())

    status, headers, body = restarted.get(f"/{model.handle}?tf-hub-format=compressed")
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert body == archives.small.read_bytes()
    result = hub_load(f"{restarted.url}/{model.handle}", tmp_path / "tfhub")
    assert loaded_output(result) == archives.expected(archives.small)
    assert origin.object_gets(model) == 1


def test_upstream_down_still_serves_hits(proxy_factory, clean_origin, archives, tmp_path):
    model = clean_origin.register(archives.small)
    cache_dir = tmp_path / "cache"
    proxy_factory(cache_dir).get(f"/{model.handle}")

    offline = proxy_factory(cache_dir, "--retries", "1", upstreams=_dead_upstreams())

    status, headers, _ = offline.get(f"/{model.handle}")
    assert (status, headers["X-Cache"]) == (200, "HIT")


def test_upstream_down_explains_misses_after_bounded_retries(proxy_factory, tmp_path):
    offline = proxy_factory(tmp_path / "cache", "--retries", "1", upstreams=_dead_upstreams())

    status, _, reason = offline.get("/google/never-cached/1")

    assert status == 502
    assert b"cannot reach upstream" in reason and b"after 2 attempts" in reason


def test_restart_reconciles_index_and_blobs(proxy_factory, clean_origin, tmp_path):
    origin = clean_origin
    cache_dir = tmp_path / "cache"
    kept, lost = (origin.register(stand_in_archive(tmp_path / f"{name}.tar.gz", 10_002)) for name in ("kept", "lost"))
    first = proxy_factory(cache_dir)
    for model in (kept, lost):
        assert first.get(f"/{model.handle}")[0] == 200
    first.stop()
    lost_blob = next(p for p in (cache_dir / "blobs").rglob("*")
                     if p.is_file() and p.read_bytes() == (tmp_path / "lost.tar.gz").read_bytes())
    lost_blob.unlink()  # the index still names it
    stray = cache_dir / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"\x1f\x8b left by a commit that never reached the index")

    restarted = proxy_factory(cache_dir)
    restarted.wait_for_metric("hubproxy_cache_entries", 1)

    assert not stray.exists()
    restarted.stop()
    listing = run_cli("cache", "ls", "--json", "--cache-dir", cache_dir)
    assert [entry["key"] for entry in json.loads(listing.stdout)] == [f"tfhub:/{kept.handle}"]


def test_a_second_process_starting_on_the_cache_leaves_a_running_download_its_temp_file(
        proxy_factory, clean_origin, archives, tmp_path):
    """Start-up removes the temp files of fetches that died, never those a live process is writing."""
    first = proxy_factory(tmp_path / "cache")
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, hold_after=len(archives.padded.read_bytes()) // 2)
    outcome = {}

    def download():
        try:
            outcome.update(zip(("status", "headers", "body"), first.get(f"/{model.handle}")))
        except OSError as e:  # cut short
            outcome["error"] = repr(e)

    client = threading.Thread(target=download)
    client.start()
    clean_origin.wait_held(1)

    proxy_factory(tmp_path / "cache").stop()  # started (its clean-up done, it listens), then gone
    clean_origin.release()
    client.join(timeout=120)

    assert "error" not in outcome, outcome["error"]
    assert (outcome["status"], outcome["body"]) == (200, archives.padded.read_bytes())
    assert "crashed" not in first.log.read_text()
    status, headers, _ = first.get(f"/{model.handle}")
    assert (status, headers["X-Cache"]) == (200, "HIT")
