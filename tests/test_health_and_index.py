"""Operational basics: health, metrics moving with traffic, the console script, and what the index records."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from hubproxy.cache.store import Store


def test_healthz_answers_while_serving(proxy):
    status, _, body = proxy.get("/healthz")
    assert (status, body) == (200, b"ok\n")


def _miss_then_two_hits(proxy, origin, archive) -> None:
    model = origin.register(archive)
    for _ in range(3):
        assert proxy.get(f"/{model.handle}")[0] == 200


def test_metrics_count_request_outcomes(proxy, origin, archives):
    _miss_then_two_hits(proxy, origin, archives.small)
    assert proxy.metric("hubproxy_requests_total", outcome="MISS") == 1
    assert proxy.metric("hubproxy_requests_total", outcome="HIT") == 2


def test_metrics_count_bytes_fetched_and_served(proxy, origin, archives):
    _miss_then_two_hits(proxy, origin, archives.small)
    size = archives.small.stat().st_size
    assert proxy.metric("hubproxy_upstream_bytes_total") == size
    assert proxy.metric("hubproxy_cache_bytes_served_total") == 2 * size


def test_metrics_time_each_fetch_and_show_none_left_in_progress(proxy, origin, archives):
    _miss_then_two_hits(proxy, origin, archives.small)
    assert proxy.metric("hubproxy_fetch_seconds_count") == 1
    assert proxy.metric("hubproxy_flights_in_progress") == 0


def test_index_records_what_operators_need(proxy, origin, archives):
    model = origin.register(archives.small)
    body = archives.small.read_bytes()
    for _ in range(3):
        proxy.get(f"/{model.handle}")
    proxy.stop()  # hits are written in batches, and at shutdown

    store = Store(proxy.cache_dir)
    try:
        entry = store.lookup(f"tfhub:/{model.handle}")
    finally:
        store.close()

    assert entry.sha256 == hashlib.sha256(body).hexdigest()
    assert entry.size == len(body)
    assert entry.etag == f'"{hashlib.md5(body).hexdigest()}"'
    assert entry.content_type == "application/octet-stream"
    assert entry.hits == 2
    assert entry.fetched <= entry.last_access
    assert "?" not in entry.source and entry.source.endswith(model.object)


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("hubproxy")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "hubproxy" in result.stdout


def test_access_log_is_one_json_object_per_request(proxy, origin, archives):
    model = origin.register(archives.small)
    proxy.get(f"/{model.handle}?tf-hub-format=compressed")
    proxy.get(f"/{model.handle}")
    proxy.stop()

    lines = [json.loads(line) for line in proxy.log.read_text().splitlines() if line.startswith("{")]
    hub_lines = [line for line in lines if line["handle"] == f"tfhub:/{model.handle}"]
    assert [line["outcome"] for line in hub_lines] == ["MISS", "HIT"]
    size = archives.small.stat().st_size
    assert all(line["status"] == 200 and line["bytes"] == size and line["client"] for line in hub_lines)
    assert all("?" not in line["path"] for line in lines)
