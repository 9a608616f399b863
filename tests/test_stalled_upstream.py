"""Upstreams that hold on end: a body trickling below the floor is a failed fetch (resumed like a
cut, then failed if it goes on), and its clients are cut rather than left hanging; waiting for an
answer's headers has one deadline across retries; readers whose clients left are detached while
the fetch they waited on goes on."""

from __future__ import annotations

import http.client

from hubproxy.fetch.flight import HOLDBACK
from tests.conftest import STAND_IN_HOLD_AT, STAND_IN_SIZE, download_fails, hub_load, hub_load_started, model_dirs

FLOOR = ("--upstream-min-rate", "256K", "--upstream-rate-window", "2s")


def _nothing_committed(proxy) -> bool:
    return (not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))
            and not any((proxy.cache_dir / "tmp").iterdir()))


def test_a_trickle_below_the_floor_fails_the_fetch_after_its_resumes_and_cuts_the_client(
        proxy_factory, clean_origin, archives, tmp_path):
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, throttle_bps=32_000)
    proxy = proxy_factory(None, *FLOOR, "--upstream-resumes", "1")

    failed = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert failed.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert _nothing_committed(proxy)
    assert proxy.metric("hubproxy_upstream_resumes_total", reason="stall") == 1
    assert proxy.metric("hubproxy_upstream_failures_total", status="504") == 1
    assert len(clean_origin.storage_gets(model)) == 2
    assert "below the floor of 256.0 KiB/s" in proxy.log.read_text()


def test_a_stall_is_resumed_like_a_cut_and_the_client_loads_the_model(proxy_factory, clean_origin, archives,
                                                                        tmp_path):
    held_at = 2 << 20
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, hold_after=held_at)  # the first transfer stops there, for good
    proxy = proxy_factory(None, *FLOOR)
    client = hub_load_started(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")
    clean_origin.wait_held(1)
    clean_origin.faults(model, hold_after=None)  # the resume is not held

    out, err = client.communicate(timeout=600)

    assert client.returncode == 0, err[-3000:]
    assert [g["range"] for g in clean_origin.storage_gets(model)] == [None, f"bytes={held_at}-"]
    assert proxy.metric("hubproxy_upstream_resumes_total", reason="stall") == 1


def test_headers_that_never_come_are_a_504_after_one_deadline_across_retries(proxy_factory, clean_origin, archives,
                                                                               tmp_path):
    config = tmp_path / "hubproxy.toml"
    config.write_text("read_timeout_seconds = 1.0\n")  # each attempt gives up after 1 s; 4 attempts in all
    model = clean_origin.register(archives.small)
    clean_origin.faults(model, hold_headers=True)
    proxy = proxy_factory(None, "--config", str(config), "--upstream-headers-deadline", "2.5s")

    status, _, reason = proxy.get(f"/{model.handle}")

    assert status == 504
    assert b"no answer within 2.5s" in reason, reason
    assert len(clean_origin.storage_gets(model)) < 4, "the deadline stopped the retries"


def _reader_that_leaves(proxy, model) -> None:
    """A client that reads what the held fetch can send before verification, then hangs up."""
    host, port = proxy.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", f"/{model.handle}")
    response = connection.getresponse()
    assert response.status == 200
    assert len(response.read(STAND_IN_HOLD_AT - HOLDBACK)) == STAND_IN_HOLD_AT - HOLDBACK
    connection.close()


def test_readers_whose_clients_left_are_released_while_the_fetch_goes_on(proxy_factory, held_stand_in,
                                                                         clean_origin):
    proxy = proxy_factory(None, "--upstream-min-rate", "0B")  # no floor: the held fetch just waits
    for _ in range(2):
        _reader_that_leaves(proxy, held_stand_in)
    clean_origin.wait_held(1)

    proxy.wait_for_metric("hubproxy_flight_readers", 0, timeout=30)

    assert proxy.metric("hubproxy_flights_in_progress") == 1, "the fetch goes on without them"
    clean_origin.release()
    proxy.wait_for_metric("hubproxy_flights_in_progress", 0, timeout=60)
    status, headers, body = proxy.get(f"/{held_stand_in.handle}")
    assert (status, headers["X-Cache"], len(body)) == (200, "HIT", STAND_IN_SIZE)


def test_a_client_of_a_trickling_fetch_is_cut_not_left_hanging(proxy_factory, clean_origin, archives):
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, throttle_bps=32_000)
    proxy = proxy_factory(None, *FLOOR, "--upstream-resumes", "0")

    download_fails(proxy, model)

    assert proxy.metric("hubproxy_upstream_failures_total", status="504") == 1
    assert _nothing_committed(proxy)
