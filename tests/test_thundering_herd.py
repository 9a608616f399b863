"""Many clients asking for one cold archive at once must cost one upstream fetch, and every client
must stream while that fetch runs (following the growing file), not wait for it to end."""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import threading

from tests.conftest import Proxy, hub_load_started, loaded_output

CLIENTS = 16
HOLD_AT = 3 * 1024 * 1024  # the origin pauses here; hubproxy may pass on all but its last MiB


def _open(proxy: Proxy, path: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection(proxy.url.removeprefix("http://"), timeout=120)
    connection.request("GET", path)
    return connection, connection.getresponse()


def _start_clients(proxy: Proxy, model, first_bytes_then=None) -> tuple[list[threading.Thread], dict]:
    """CLIENTS threads GETting model at once, each recording (X-Cache, sha256 of the body); with
    first_bytes_then, each calls it once it has headers and its first body bytes."""
    outcomes: dict[int, tuple[str, str]] = {}

    def client(n: int) -> None:
        _, response = _open(proxy, f"/{model.handle}?tf-hub-format=compressed")
        first_bytes = response.read(64 * 1024)
        if first_bytes_then is not None:
            first_bytes_then()
        body = first_bytes + response.read()
        outcomes[n] = (response.headers["X-Cache"], hashlib.sha256(body).hexdigest())

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def _release_and_join(origin, threads: list[threading.Thread]) -> None:
    origin.wait_held(1)  # released before the transfer reaches the pause, it would pause for good
    origin.release()
    for thread in threads:
        thread.join(timeout=120)


def test_sixteen_cold_clients_share_one_fetch(proxy, origin, archives):
    model = origin.register(archives.padded)
    origin.faults(model, hold_after=HOLD_AT)

    threads, outcomes = _start_clients(proxy, model)
    proxy.wait_for_metric("hubproxy_flight_readers", CLIENTS)  # all attached, the origin still paused
    _release_and_join(origin, threads)

    expected = hashlib.sha256(archives.padded.read_bytes()).hexdigest()
    assert sorted(cache for cache, _ in outcomes.values()) == ["JOIN"] * (CLIENTS - 1) + ["MISS"]
    assert {digest for _, digest in outcomes.values()} == {expected}
    assert origin.object_gets(model) == 1


def test_sixteen_cold_clients_stream_while_the_origin_is_still_sending(proxy, origin, archives):
    model = origin.register(archives.padded)
    origin.faults(model, hold_after=HOLD_AT)
    streaming = threading.Barrier(CLIENTS + 1, timeout=120)

    threads, outcomes = _start_clients(proxy, model, first_bytes_then=streaming.wait)
    streaming.wait()  # every client has headers and body bytes; the origin has not finished
    _release_and_join(origin, threads)

    expected = hashlib.sha256(archives.padded.read_bytes()).hexdigest()
    assert [digest for _, digest in outcomes.values()] == [expected] * CLIENTS


def test_fetch_completes_and_is_cached_when_the_first_client_hangs_up(proxy, origin, archives):
    model = origin.register(archives.padded)
    origin.faults(model, hold_after=HOLD_AT)
    path = f"/{model.handle}?tf-hub-format=compressed"

    connection, quitter = _open(proxy, path)
    assert quitter.headers["X-Cache"] == "MISS"
    quitter.read(64 * 1024)
    quitter.close()
    connection.close()  # hangs up mid-transfer
    origin.wait_held(1)
    origin.release()

    status, headers, body = proxy.get(path)  # joins the fetch still running, or hits its result
    assert status == 200 and headers["X-Cache"] in ("JOIN", "HIT")
    assert body == archives.padded.read_bytes()
    status, headers, _ = proxy.get(path, method="HEAD")
    assert headers["X-Cache"] == "HIT"
    assert origin.object_gets(model) == 1


def test_sixteen_real_hub_clients_load_from_one_fetch(proxy, origin, archives, tmp_path):
    model = origin.register(archives.padded)
    origin.faults(model, hold_after=HOLD_AT)
    handle = f"{proxy.url}/{model.handle}"

    clients = [hub_load_started(handle, tmp_path / f"tfhub-{n}") for n in range(CLIENTS)]
    try:
        proxy.wait_for_metric("hubproxy_flight_readers", CLIENTS)  # all attached, the origin still paused
        origin.wait_held(1)
        origin.release()
        results = [_finish(client) for client in clients]
    finally:
        for client in clients:
            client.kill()

    for result in results:
        assert loaded_output(result) == archives.expected(archives.padded)
    assert origin.object_gets(model) == 1
    assert proxy.metric("hubproxy_requests_total", outcome="JOIN") == CLIENTS - 1


def _finish(client: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = client.communicate(timeout=600)
    return subprocess.CompletedProcess(client.args, client.returncode, out, err)
