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

from tests.conftest import Proxy


class Download(threading.Thread):
    """A GET through a proxy in the background; afterwards status/headers/body, or error (cut short)."""

    def __init__(self, proxy: Proxy, path: str):
        super().__init__(daemon=True)
        self.proxy, self.path = proxy, path
        self.status = self.headers = self.body = self.error = None
        self.start()

    def run(self) -> None:
        try:
            self.status, self.headers, self.body = self.proxy.get(self.path)
        except (http.client.HTTPException, OSError) as e:
            self.error = e

    def result(self) -> "Download":
        self.join(timeout=180)
        assert not self.is_alive(), "the download never ended"
        return self


def _leader_holding_midway(proxy_factory, origin, archive, tmp_path, **faults):
    """Two processes on one cache; the first is fetching the archive, held by the origin halfway
    through the body, and the second has a client attached to that fetch."""
    leader, follower = proxy_factory(tmp_path / "cache"), proxy_factory(tmp_path / "cache")
    model = origin.register(archive)
    origin.faults(model, hold_after=archive.stat().st_size // 2, **faults)
    first = Download(leader, f"/{model.handle}")
    origin.wait_held(1)
    second = Download(follower, f"/{model.handle}")
    follower.wait_for_metric("hubproxy_flight_readers", 1)
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
    while sum(part.stat().st_size for part in (tmp_path / "cache" / "tmp").glob("*.part")) < half:
        pass  # the leader has written all the origin sent before holding
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
    assert (second.status, second.body) == (200, archives.small.read_bytes())
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
