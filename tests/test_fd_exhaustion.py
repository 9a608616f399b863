"""A full fd table is no outage: the proxy raises its open-file limit to the hard one at start, caps
client connections below it, closes the longest-idle connection to make room for a new one, and
logs accept() trouble once per burst, never a traceback per attempt."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
import urllib.request

from tests.conftest import run_cli

FD_LIMIT = 256
IDLE_SOCKETS = 2 * FD_LIMIT  # idle clients holding more connections than the proxy has descriptors


def _open_file_limit(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soft_limit_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    return int(line.split()[3])


def _idle_clients(proxy, count: int) -> list[socket.socket]:
    """Connections that send nothing; fewer than count when the proxy stops taking them."""
    host, port = proxy.url.removeprefix("http://").split(":")
    opened = []
    for _ in range(count):
        try:
            opened.append(socket.create_connection((host, int(port)), timeout=5))
        except OSError:
            break
    return opened


def _get(proxy, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(proxy.url + path, timeout=30) as response:
        return response.status, response.headers["X-Cache"], response.read()


def _archive(tmp_path, name: str) -> os.PathLike:
    path = tmp_path / f"{name}.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(100_000))
    return path


def test_idle_connections_beyond_the_fd_limit_leave_hits_and_misses_served(proxy_factory, clean_origin, tmp_path):
    proxy = proxy_factory(None, preexec_fn=_open_file_limit(FD_LIMIT, FD_LIMIT))
    cached, fresh = (_archive(tmp_path, name) for name in ("cached", "fresh"))
    cached_model, fresh_model = clean_origin.register(cached), clean_origin.register(fresh)
    assert _get(proxy, f"/{cached_model.handle}")[1] == "MISS"
    idle = _idle_clients(proxy, IDLE_SOCKETS)
    try:
        assert _get(proxy, f"/{cached_model.handle}") == (200, "HIT", cached.read_bytes())
        assert _get(proxy, f"/{fresh_model.handle}") == (200, "MISS", fresh.read_bytes())
    finally:
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.close()
    proxy.stop()
    log = [line for line in proxy.log.read_text().splitlines() if not line.startswith("{")]  # not access lines
    assert not [line for line in log if "Traceback" in line or " ERROR " in line], "\n".join(log[-40:])
    assert len(log) < 20, "\n".join(log[-40:])


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(proxy_factory, clean_origin):
    proxy = proxy_factory(None, preexec_fn=_open_file_limit(FD_LIMIT, 4 * FD_LIMIT))
    assert _soft_limit_of(proxy.process.pid) == 4 * FD_LIMIT


def test_a_max_connections_that_is_negative_is_a_one_line_error(tmp_path):
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--cache-dir", tmp_path / "cache", "--max-connections", "-1")
    assert result.returncode == 2 and "max_connections" in result.stderr and "Traceback" not in result.stderr


def _request(proxy, path: str) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    return sock


def _until_eof(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_at_the_cap_the_longest_idle_connection_makes_room(proxy_factory, clean_origin):
    proxy = proxy_factory(None, "--max-connections", "2")
    oldest, newer = _request(proxy, "/healthz"), _request(proxy, "/healthz")
    for sock in (oldest, newer):
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # answered, so idle from here on
    with oldest, newer, _request(proxy, "/healthz") as newcomer:
        assert newcomer.recv(65536).startswith(b"HTTP/1.1 200")
        assert _until_eof(oldest) == b""
        newer.sendall(b"GET /healthz HTTP/1.1\r\nHost: mirror\r\n\r\n")
        assert newer.recv(65536).startswith(b"HTTP/1.1 200")


def test_at_the_cap_with_every_connection_busy_a_newcomer_gets_a_503(proxy_factory, held_stand_in, clean_origin):
    proxy = proxy_factory(None, "--max-connections", "2")
    busy = [_request(proxy, f"/{held_stand_in.handle}") for _ in range(2)]
    try:
        for sock in busy:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # mid-body: busy until the origin lets go
        with _request(proxy, "/healthz") as newcomer:
            answer = _until_eof(newcomer)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
        assert answer.partition(b"\r\n\r\n")[2].count(b"\n") == 1
    finally:
        clean_origin.release()
        for sock in busy:
            sock.close()


def test_accept_failing_for_want_of_descriptors_is_one_line_per_burst(proxy_factory, clean_origin):
    """With a cap the table cannot hold (an operator's mistake), accept() does fail: asyncio retries
    it each second, and the log says so once, without a traceback."""
    proxy = proxy_factory(None, "--max-connections", "100000", preexec_fn=_open_file_limit(FD_LIMIT, FD_LIMIT))
    idle = _idle_clients(proxy, IDLE_SOCKETS)
    try:
        _wait_for_line(proxy, "accept")  # asyncio's report, or ours
    finally:
        for sock in idle:
            sock.close()
    assert _get(proxy, "/healthz")[0] == 200  # accepting again once descriptors are free
    proxy.stop()
    log = [line for line in proxy.log.read_text().splitlines() if not line.startswith("{")]
    assert not [line for line in log if "Traceback" in line or " ERROR " in line], "\n".join(log[-40:])
    assert len([line for line in log if "accept" in line]) == 1, "\n".join(log[-40:])


def _wait_for_line(proxy, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log.read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{proxy.log.read_text()[-3000:]}"
        time.sleep(0.05)
