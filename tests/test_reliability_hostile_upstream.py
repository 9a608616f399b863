"""A corpus of hostile upstreams: every fault the origin emulator has (tests/origin.py SWITCHES,
a test below holds it), alone and combined. Each makes the proxy give a clean failure (an error
status, or a body its framing leaves unfinished) or the verified archive, never a body presented as
complete with wrong bytes, never a 500 or a traceback; nothing that does not verify is committed,
and once the fault is gone the same URL serves the archive. Trickles and stalls meet a proxy with a
small pace floor and headers deadline, so that each ends in seconds rather than the defaults' minutes."""

from __future__ import annotations

import ast
import hashlib

import pytest

from bench.downloads import download
from hubproxy.cache import scrub
from hubproxy.cache.store import Store
from tests.conftest import ROOT, stand_in_archive, start_proxy

SIZE = 600_000
MIDDLE = SIZE // 2

FAULTS = {
    "cut before the first byte": dict(truncate_at=0),
    "cut after one byte": dict(truncate_at=1),
    "cut in the middle": dict(truncate_at=MIDDLE),
    "cut one byte short": dict(truncate_at=SIZE - 1),
    "first byte flipped": dict(corrupt_at=0),
    "middle byte flipped": dict(corrupt_at=MIDDLE),
    "last byte flipped": dict(corrupt_at=SIZE - 1),
    "500 always": dict(status=500),
    "502 always": dict(status=502),
    "503 once": dict(status=503, status_count=1),
    "429 twice": dict(status=429, status_count=2),
    "404": dict(status=404),
    "403": dict(status=403),
    "416": dict(status=416),
    "slow link": dict(throttle_bps=4_000_000),
    "an HTML sign-in page": dict(html=True),
    "connection dropped before any answer": dict(down=True),
    "slow, then cut": dict(throttle_bps=4_000_000, truncate_at=MIDDLE),
    "slow, then flipped": dict(throttle_bps=4_000_000, corrupt_at=SIZE - 2),
    "503 once, then cut": dict(status=503, status_count=1, truncate_at=MIDDLE),
    "body really gzip-encoded": dict(content_encoding="gzip"),
    "body really deflate-encoded": dict(content_encoding="deflate"),
    "an encoding only claimed": dict(claimed_encoding="br"),
    "a Content-Type of UTF-8 bytes": dict(content_type="application/x-tar; name=\u2603"),
    "a Content-Type with CR LF": dict(content_type="x\r\nSet-Cookie: a=b"),
    "no checksum, cut": dict(no_checksum=True, truncate_at=MIDDLE),
    "no checksum, flipped": dict(no_checksum=True, corrupt_at=MIDDLE),
    "no checksum, an HTML page": dict(no_checksum=True, html=True),
    "cut once in the middle (resumed)": dict(cut_once_at=MIDDLE),
    "cut every 100 kB": dict(cut_every=100_000),
    "cut once, and the object replaced": dict(cut_once_at=MIDDLE, replaced=True),
    "no checksum, cut once": dict(no_checksum=True, cut_once_at=MIDDLE),
    "cut once, If-Match ignored (resumed)": dict(cut_once_at=MIDDLE, ignore_if_match=True),
}
FLOOR = ("--upstream-min-rate", "256K", "--upstream-rate-window", "1s", "--upstream-headers-deadline", "2s",
         "--upstream-resumes", "1")
BELOW_THE_FLOOR = {  # met by a proxy started with FLOOR; each holds or trickles until it gives up
    "trickle below the floor": dict(throttle_bps=32_000),
    "headers never come": dict(hold_headers=True),
    "stalled in the middle": dict(hold_after=MIDDLE),
}
REDIRECTS = {  # where the Kaggle hop sends the download instead of the signed storage URL
    "off the allowlist": "{canary}/stolen",
    "to a non-http scheme": "file:///etc/passwd",
    "another loopback host": "http://127.0.0.2:{gcs_port}/x",
    "userinfo naming an allowed host": "http://127.0.0.2:{gcs_port}\\@127.0.0.1:{gcs_port}/x",
    "a port out of range": "http://127.0.0.1:99999/x",
}
@pytest.fixture(scope="module")
def corpus_proxy(origin, tmp_path_factory):
    """One proxy for the corpus: each case has a model of its own, so cases cannot see each other."""
    home = tmp_path_factory.mktemp("hostile-upstream")
    proxy = start_proxy(origin, home / "cache", log_dir=home)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def floored_proxy(origin, tmp_path_factory):
    """A proxy whose pace floor and headers deadline (FLOOR) end a trickle or a stall within seconds."""
    home = tmp_path_factory.mktemp("hostile-upstream-floored")
    proxy = start_proxy(origin, home / "cache", *FLOOR, log_dir=home)
    yield proxy
    proxy.stop()


@pytest.fixture
def stand_in_model(origin, tmp_path):
    archive = stand_in_archive(tmp_path / "archive.tar.gz", SIZE)
    yield origin.register(archive), hashlib.sha256(archive.read_bytes()).hexdigest()
    origin.control("POST", "faults", {"clear": True})


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_hostile_upstream_gives_a_clean_failure_or_the_verified_archive(corpus_proxy, origin, stand_in_model, fault):
    model, sha256 = stand_in_model
    origin.faults(model, **fault)

    _assert_clean_outcome(corpus_proxy, origin, model, sha256)


@pytest.mark.parametrize("fault", BELOW_THE_FLOOR.values(), ids=BELOW_THE_FLOOR.keys())
def test_an_upstream_below_the_floor_gives_a_clean_failure(floored_proxy, origin, stand_in_model, fault):
    model, sha256 = stand_in_model
    origin.faults(model, **fault)
    try:
        got = _assert_clean_outcome(floored_proxy, origin, model, sha256)
    finally:
        origin.release()  # transfers still held at the origin end; later holds start afresh

    assert not got.served_whole(sha256), f"the fault never bit: {got}"


def test_the_corpus_has_every_fault_the_origin_emulator_has():
    cases = [*FAULTS.values(), *BELOW_THE_FLOOR.values(), {"redirect_to": REDIRECTS}]
    assert {switch for case in cases for switch in case} == _emulator_switches()


def _emulator_switches() -> set[str]:
    """tests/origin.py's SWITCHES, read from its source (the emulator is a script run as its own process)."""
    tree = ast.parse((ROOT / "tests" / "origin.py").read_text())
    value = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "SWITCHES" for target in node.targets))
    return ast.literal_eval(value)


@pytest.mark.parametrize("target", REDIRECTS.values(), ids=REDIRECTS.keys())
def test_hostile_redirect_gives_a_clean_failure(corpus_proxy, origin, stand_in_model, target):
    model, sha256 = stand_in_model
    canary_before, kaggle_before = len(origin.requests("canary")), len(origin.requests("kaggle"))
    origin.faults(model, redirect_to=target.format(canary=origin.urls["canary"],
                                                   gcs_port=origin.urls["gcs"].rsplit(":", 1)[1]))

    got = _assert_clean_outcome(corpus_proxy, origin, model, sha256)

    assert origin.requests("kaggle")[kaggle_before]["status"] == 302, "the emulator could not send that redirect"
    assert got.status == 502, got
    assert len(origin.requests("canary")) == canary_before, "the proxy followed a redirect off the allowlist"


def _assert_clean_outcome(proxy, origin, model, sha256: str):
    log_before = proxy.log.stat().st_size
    got = download(f"{proxy.url}/{model.handle}")

    assert not got.served_wrong(sha256), f"a body presented as complete with the wrong bytes: {got}"
    assert got.status != 500, got
    assert got.served_whole(sha256) or got.status is None or got.status >= 400 or not got.complete, got
    assert "Traceback" not in proxy.log.read_bytes()[log_before:].decode(errors="replace")
    store = Store(proxy.cache_dir)
    try:
        assert scrub.scrub(store) == []
        committed = {e.sha256 for e in store.entries() if e.key.endswith(model.handle)}
        assert committed <= {sha256}, f"committed bytes that are not the archive: {committed}"
    finally:
        store.close()
    origin.control("POST", "faults", {"clear": True})
    healed = download(f"{proxy.url}/{model.handle}")
    assert healed.served_whole(sha256), f"after the fault: {healed}"
    return got
