"""Several hubproxy processes on one cache dir (replicas on a shared volume, serve --workers): an
archive is fetched from upstream once, whichever process each client asks; a process that follows
another's fetch serves what the leader verified and stored, takes the fetch over when the leader
dies, and is cut with it when the leader fails. Real processes, the origin emulator holding the body
midway so that the second process attaches to a fetch under way.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time

from tests.conftest import Proxy


class Download(threading.Thread):
    """A GET through a proxy in the background; afterwards status/headers/body, or error (cut short).
    first_bytes is set once some of the body has arrived."""

    def __init__(self, proxy: Proxy, path: str):
        super().__init__(daemon=True)
        self.proxy, self.path = proxy, path
        self.status = self.headers = self.body = self.error = None
        self.first_bytes = threading.Event()
        self.start()

    def run(self) -> None:
        host, port = self.proxy.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request("GET", self.path)
            response = connection.getresponse()
            self.status, self.headers, body = response.status, response.headers, bytearray()
            while piece := response.read1(1 << 16):
                body += piece
                self.first_bytes.set()
            self.body = bytes(body)
        except (http.client.HTTPException, OSError) as e:
            self.error = e
        finally:
            connection.close()

    def result(self) -> "Download":
        self.join(timeout=180)
        assert not self.is_alive(), "the download never ended"
        return self


def _until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.01)


def _leader_holding_midway(proxy_factory, origin, archive, tmp_path, *leader_args, **faults):
    """Two processes on one cache; the first is fetching the archive, held by the origin halfway
    through the body, and the second has a client attached to that fetch."""
    leader, follower = proxy_factory(tmp_path / "cache", *leader_args), proxy_factory(tmp_path / "cache")
    model = origin.register(archive)
    origin.faults(model, hold_after=archive.stat().st_size // 2, **faults)
    first = Download(leader, f"/{model.handle}")
    origin.wait_held(1)
    second = Download(follower, f"/{model.handle}")
    assert second.first_bytes.wait(timeout=60), "the follower never sent the leader's first bytes"
    return leader, follower, model, first, second


def test_two_processes_on_one_cache_fetch_an_archive_once(proxy_factory, clean_origin, archives, tmp_path):
    leader, follower, model, first, second = _leader_holding_midway(proxy_factory, clean_origin, archives.padded,
                                                                    tmp_path)
    clean_origin.release()
    expected = archives.padded.read_bytes()

    for download, outcome in ((first.result(), "MISS"), (second.result(), "JOIN")):
        assert download.error is None, download.error
        assert (download.status, download.headers["X-Cache"], download.body) == (200, outcome, expected)
    assert clean_origin.object_gets(model) == 1
    for proxy in (leader, follower):
        status, headers, body = proxy.get(f"/{model.handle}")
        assert (status, headers["X-Cache"], body) == (200, "HIT", expected)
    assert clean_origin.object_gets(model) == 1
    assert leader.metric("hubproxy_upstream_bytes_total") == len(expected)
    assert follower.metric("hubproxy_upstream_bytes_total") == 0  # it counted no fetch of its own


def test_a_follower_takes_the_fetch_over_when_the_leading_process_dies(proxy_factory, clean_origin, archives,
                                                                       tmp_path):
    leader, follower, model, first, second = _leader_holding_midway(proxy_factory, clean_origin, archives.padded,
                                                                    tmp_path)
    half = archives.padded.stat().st_size // 2
    _until(lambda: _temp_bytes(tmp_path) >= half, "wrote what the origin sent before holding")
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait()
    clean_origin.faults(model, hold_after=None)
    clean_origin.release()
    expected = archives.padded.read_bytes()

    second.result()
    assert second.error is None, second.error
    assert (second.status, second.headers["X-Cache"], second.body) == (200, "JOIN", expected)
    gets = [r for r in clean_origin.storage_gets(model)]
    assert len(gets) == 2
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert resumed_at == half and gets[1]["if_match"], gets[1]
    assert "taking over the fetch" in follower.log.read_text()
    status, headers, body = follower.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "HIT", expected)


def _temp_bytes(tmp_path) -> int:
    return sum(part.stat().st_size for part in (tmp_path / "cache" / "tmp").glob("*.part"))


def test_a_leader_stopping_mid_fetch_leaves_it_to_a_follower(proxy_factory, clean_origin, archives, tmp_path):
    """A leader that is stopped (its drain cut short) lets go as a dead one does, so another process
    on the cache goes on with its temp file: a rolling restart of one replica cuts only its own clients."""
    leader, follower, model, first, second = _leader_holding_midway(
        proxy_factory, clean_origin, archives.padded, tmp_path, "--drain-timeout", "0s")
    half = archives.padded.stat().st_size // 2
    _until(lambda: _temp_bytes(tmp_path) >= half, "wrote what the origin sent before holding")
    leader.process.send_signal(signal.SIGTERM)
    assert leader.process.wait(timeout=60) == 0
    clean_origin.faults(model, hold_after=None)
    clean_origin.release()

    second.result()
    assert second.error is None, second.error
    assert (second.status, second.body) == (200, archives.padded.read_bytes())
    assert [r["range"] for r in clean_origin.storage_gets(model)] == [None, f"bytes={half}-"]
    assert "taking over the fetch" in follower.log.read_text()


def test_a_leader_failing_on_its_first_bytes_lets_a_follower_fail_cleanly(proxy_factory, clean_origin, archives,
                                                                          tmp_path):
    """No reader has a byte yet: the follower starts over (and gets its own clean 502), never a cut 200."""
    leader, follower = proxy_factory(tmp_path / "cache"), proxy_factory(tmp_path / "cache")
    model = clean_origin.register(archives.small)
    clean_origin.faults(model, hold_headers=True, corrupt_at=0)
    first = Download(leader, f"/{model.handle}")
    clean_origin.wait_held(1)
    second = Download(follower, f"/{model.handle}")
    follower.wait_for_metric("hubproxy_flight_readers", 1)
    clean_origin.faults(model, hold_headers=None)
    clean_origin.release()

    for download in (first.result(), second.result()):
        assert download.error is None, download.error
        assert download.status == 502 and b"gzip" in download.body


def test_a_lost_flights_dir_costs_single_flight_not_service(proxy_factory, clean_origin, archives, tmp_path):
    proxy = proxy_factory(tmp_path / "cache")
    flights = tmp_path / "cache" / "flights"
    flights.rmdir()
    first = clean_origin.register(archives.small)
    assert proxy.get(f"/{first.handle}")[0] == 200  # made again
    assert flights.is_dir()
    flights.rmdir()
    flights.write_bytes(b"")  # now it cannot be made: fetch as one process does, and say so once
    for model in (clean_origin.register(archives.small), clean_origin.register(archives.small)):
        status, headers, body = proxy.get(f"/{model.handle}")
        assert (status, headers["X-Cache"], body) == (200, "MISS", archives.small.read_bytes())
    log = proxy.log.read_text()
    assert log.count("cannot take the flight lock") == 1 and "Traceback" not in log


def test_a_leader_dying_before_its_body_lets_a_follower_fetch_afresh(proxy_factory, clean_origin, archives,
                                                                     tmp_path):
    leader, follower = proxy_factory(tmp_path / "cache"), proxy_factory(tmp_path / "cache")
    model = clean_origin.register(archives.small)
    clean_origin.faults(model, hold_headers=True)
    Download(leader, f"/{model.handle}")
    clean_origin.wait_held(1)
    second = Download(follower, f"/{model.handle}")
    follower.wait_for_metric("hubproxy_flight_readers", 1)
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait()
    clean_origin.faults(model, hold_headers=None)
    clean_origin.release()

    second.result()
    assert second.error is None, second.error
    assert (second.status, second.headers["X-Cache"], second.body) == (200, "JOIN", archives.small.read_bytes())
    assert [r["range"] for r in clean_origin.storage_gets(model)] == [None, None]


def test_a_leader_that_fails_cuts_the_followers_clients_and_stores_nothing(proxy_factory, clean_origin, archives,
                                                                          tmp_path):
    size = archives.padded.stat().st_size
    leader, follower, model, first, second = _leader_holding_midway(proxy_factory, clean_origin, archives.padded,
                                                                    tmp_path, corrupt_at=size - 100)
    clean_origin.release()

    for download in (first.result(), second.result()):
        assert download.error is not None, "a client got a clean end of an archive that failed its checksum"
    assert "by another hubproxy process on this cache failed" in follower.log.read_text()
    for proxy in (leader, follower):
        assert proxy.metric("hubproxy_cache_entries") == 0
