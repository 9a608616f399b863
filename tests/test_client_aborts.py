"""A client hanging up mid-body is normal: hits (sendfile) and misses (chunked writes) whose clients
abort, again and again, cost no ERROR line and no traceback, and the proxy goes on serving."""

from __future__ import annotations

import concurrent.futures
import socket
import struct

import pytest

from tests.conftest import stand_in_archive

CLIENTS = 16
ROUNDS = 12
LEAVE_AFTER = (0, 1, 300, 70_000, 1 << 20, 3 << 20, 5 << 20)  # bytes read before leaving
SIZE = 16 << 20  # far more than socket buffers hold: the proxy is still writing when the client leaves


def _abort_mid_body(proxy, path: str, round_: int) -> None:
    """GET path, read part of the answer (from none of it to megabytes), then leave: with a reset
    (RST) on even rounds, a plain close on odd ones."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
        received = b""
        while len(received) < LEAVE_AFTER[round_ % len(LEAVE_AFTER)]:
            chunk = sock.recv(65536)
            assert chunk, f"the proxy closed before the client left: {received[:300]!r}"
            received += chunk
        assert received[:12] in (b"", b"HTTP/1.1 200"[:len(received)]), received[:300]
        if round_ % 2 == 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _abort_concurrently(proxy, paths: list[str]) -> None:
    """CLIENTS clients at once, each aborting ROUNDS downloads of the paths in turn."""
    def client(n: int) -> None:
        for round_ in range(ROUNDS):
            _abort_mid_body(proxy, paths[(n + round_) % len(paths)], n + round_)

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))


def _log_is_quiet(proxy) -> None:
    proxy.stop()  # a clean stop waits for every handler and flushes the log: nothing is pending after it
    log = proxy.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    assert not [line for line in log.splitlines() if " ERROR " in line], log[-4000:]


@pytest.fixture
def big(tmp_path):
    return stand_in_archive(tmp_path / "big.tar.gz", SIZE)


def test_clients_aborting_hits_cost_no_traceback(proxy, origin, big):
    model = origin.register(big)
    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], len(body)) == (200, "MISS", SIZE)
    _abort_concurrently(proxy, [f"/{model.handle}"])
    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "HIT", big.read_bytes())
    _log_is_quiet(proxy)


def test_clients_aborting_misses_and_joins_cost_no_traceback(proxy, origin, big):
    models = [origin.register(big) for _ in range(6)]  # several clients join each flight, and leave it
    _abort_concurrently(proxy, [f"/{model.handle}" for model in models])
    proxy.wait_for_metric("hubproxy_flights_in_progress", 0, timeout=120)
    for model in models:  # each fetch went on without its client, and was kept
        status, headers, _ = proxy.get(f"/{model.handle}", method="HEAD")
        assert (status, headers["X-Cache"]) == (200, "HIT")
    _log_is_quiet(proxy)
