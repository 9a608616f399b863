"""SIGTERM (or SIGINT) drains the proxy: /readyz turns 503, new connections are refused, idle
keep-alive connections close, and every transfer under way (hits sent with sendfile, misses
following their flight, requests inside intercepted TLS) finishes whole before the process exits
0; at drain_timeout, or on a second signal, what is left (a plain tunnel too) is cut: an incomplete
body, never a clean one, and nothing stored."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import STAND_IN_SIZE, Proxy, run_cli, stand_in_archive

MISS_CLIENTS = 16
HIT_CLIENTS = 4
HIT_SIZE = 16 << 20  # far more than a socket's buffers hold: a hit to a client that stops reading stays in flight
SMALL_RCVBUF = 64 * 1024
FIRST_BYTES = 64 * 1024
WAIT_SECONDS = 120
ESTABLISHED = "01"  # a TCP state in /proc/net/tcp


@dataclasses.dataclass
class Download:
    """One client's GET, read in two steps: its first bytes, then (once `go` is set) the rest."""
    path: str
    rcvbuf: int | None = None  # a small receive buffer: the proxy cannot send far ahead of the reader
    status: int | None = None
    x_cache: str | None = None
    sha256: str | None = None
    closed_after: bool | None = None  # the proxy closed the (kept-alive) connection after the response
    error: BaseException | None = None

    def run(self, proxy: Proxy, started: threading.Barrier, go: threading.Event) -> None:
        try:
            sock, response = _request(proxy, self.path, self.rcvbuf)
            self.status, self.x_cache = response.status, response.headers["X-Cache"]
            body = hashlib.sha256(response.read(FIRST_BYTES))
            started.wait()
            go.wait(WAIT_SECONDS)
            while chunk := response.read(1 << 20):
                body.update(chunk)
            self.sha256 = body.hexdigest()
            self.closed_after = sock.recv(1) == b""
        except BaseException as e:  # noqa: BLE001 - the assertion names it
            self.error = e
            started.abort()


def _address(proxy: Proxy) -> tuple[str, int]:
    host, port = proxy.url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(proxy: Proxy, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT_SECONDS)
    sock.connect(_address(proxy))
    return sock


def _request(proxy: Proxy, path: str, rcvbuf: int | None = None) -> tuple[socket.socket, http.client.HTTPResponse]:
    """A GET on a keep-alive connection of its own, its response begun."""
    sock = _connect(proxy, rcvbuf)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {proxy.url.removeprefix('http://')}\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    return sock, response


def _start(proxy: Proxy, downloads: list[Download]) -> tuple[list[threading.Thread], threading.Event]:
    """Start every download; return once each has its first bytes (the rest waits for the event)."""
    started, go = threading.Barrier(len(downloads) + 1, timeout=WAIT_SECONDS), threading.Event()
    threads = [threading.Thread(target=d.run, args=(proxy, started, go)) for d in downloads]
    for thread in threads:
        thread.start()
    try:
        started.wait()
    except threading.BrokenBarrierError:
        pass  # a client failed: its error is asserted on
    assert not [d.error for d in downloads if d.error is not None]
    return threads, go


def _proxy_end(proxy: Proxy, client_port: int) -> tuple[str, int] | None:
    """The proxy's end of the connection from client_port in /proc/net/tcp: (TCP state, bytes it
    has not read yet); None once it is closed."""
    proxy_port = _address(proxy)[1]
    with open("/proc/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            fields = row.split()
            local_port, remote_port = (int(address.split(":")[1], 16) for address in fields[1:3])
            if (local_port, remote_port) == (proxy_port, client_port) and fields[3] == ESTABLISHED:
                return fields[3], int(fields[4].split(":")[1], 16)
    return None


def _read_by_proxy(proxy: Proxy, client: socket.socket) -> bool:
    """Whether the proxy has read every byte this client sent: it has then seen them, as the event
    loop reads and hands on in one step."""
    return _proxy_end(proxy, client.getsockname()[1]) == (ESTABLISHED, 0)


def _closed_by_proxy(proxy: Proxy, client_port: int) -> bool:
    """Whether the proxy has closed its end (after forgetting the connection: asyncio closes the
    socket last)."""
    return _proxy_end(proxy, client_port) is None


def _wait_until(predicate: Callable[[], bool], what: Callable[[], str]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what()}"
        time.sleep(0.02)


def _wait_for_log(proxy: Proxy, text: str) -> None:
    _wait_until(lambda: text in proxy.log.read_text(),
                lambda: f"the proxy logs {text!r}\n{proxy.log.read_text()[-3000:]}")


def _refused(proxy: Proxy) -> bool:
    try:
        socket.create_connection(_address(proxy), timeout=WAIT_SECONDS).close()
    except ConnectionRefusedError:
        return True
    return False


def _exit_status(proxy: Proxy) -> int:
    return proxy.process.wait(timeout=WAIT_SECONDS)


def _cache_entries(proxy: Proxy) -> dict[int, dict]:
    """The proxy's committed entries by size, as `hubproxy cache ls --json` lists them."""
    listed = run_cli("cache", "ls", "--json", "--cache-dir", proxy.cache_dir)
    assert listed.returncode == 0, listed.stderr
    return {entry["size"]: entry for entry in json.loads(listed.stdout)}


def _assert_no_traceback(proxy: Proxy) -> None:
    log = proxy.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_sigterm_lets_every_transfer_finish_and_refuses_new_connections(proxy_factory, held_stand_in, clean_origin,
                                                                         stand_in, tmp_path):
    origin, miss = clean_origin, held_stand_in
    hit_archive = stand_in_archive(tmp_path / "hit.tar.gz", HIT_SIZE)
    hit = origin.register(hit_archive)
    proxy = proxy_factory(tmp_path / "cache")
    assert proxy.get(f"/{hit.handle}")[1]["X-Cache"] == "MISS"  # cached: a hit from now on
    kept_alive, idle = _connect(proxy), _connect(proxy)
    for sock in (kept_alive, idle):  # each answers one request and stays open for the next
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: mirror\r\n\r\n")
        ready = http.client.HTTPResponse(sock)
        ready.begin()
        assert (ready.status, ready.read(), ready.will_close) == (200, b"ready\n", False)

    downloads = ([Download(f"/{miss.handle}") for _ in range(MISS_CLIENTS)]
                 + [Download(f"/{hit.handle}", rcvbuf=SMALL_RCVBUF) for _ in range(HIT_CLIENTS)])
    threads, go = _start(proxy, downloads)
    proxy.wait_for_metric("hubproxy_flight_readers", MISS_CLIENTS)
    assert proxy.metric("hubproxy_cache_bytes_served_total") == 0  # no hit has been sent whole
    kept_alive.sendall(b"GET /readyz HTTP/1.1\r\nHost: mirror\r\n")  # a head arriving as the signal does
    _wait_until(lambda: _read_by_proxy(proxy, kept_alive), lambda: "the proxy reads the head's first lines")

    proxy.process.send_signal(signal.SIGTERM)
    _wait_for_log(proxy, f"stopping on SIGTERM: new connections refused, {MISS_CLIENTS + HIT_CLIENTS + 1} busy")

    assert _refused(proxy)
    assert idle.recv(1) == b""  # an idle keep-alive connection is closed at once, mid-drain
    kept_alive.sendall(b"\r\n")
    draining = http.client.HTTPResponse(kept_alive)
    draining.begin()
    assert draining.status == 503 and draining.will_close
    assert draining.read() == b"draining: stopping on SIGTERM; new connections are refused\n"
    assert kept_alive.recv(1) == b""
    origin.release()
    go.set()
    for thread in threads:
        thread.join(WAIT_SECONDS)

    assert _exit_status(proxy) == 0
    expected = {f"/{miss.handle}": hashlib.sha256(stand_in.read_bytes()).hexdigest(),
                f"/{hit.handle}": hashlib.sha256(hit_archive.read_bytes()).hexdigest()}
    for d in downloads:
        assert (d.error, d.status, d.sha256, d.closed_after) == (None, 200, expected[d.path], True), d
    assert sorted(d.x_cache for d in downloads) == ["HIT"] * HIT_CLIENTS + ["JOIN"] * (MISS_CLIENTS - 1) + ["MISS"]
    assert "drained: every connection finished" in proxy.log.read_text()
    _assert_no_traceback(proxy)
    entries = _cache_entries(proxy)  # the miss was committed; the hits sent during the drain were counted
    assert entries[STAND_IN_SIZE]["sha256"] == expected[f"/{miss.handle}"]
    assert entries[HIT_SIZE]["hits"] == HIT_CLIENTS

    restarted = proxy_factory(tmp_path / "cache")
    status, headers, body = restarted.get(f"/{miss.handle}")
    assert (status, headers["X-Cache"], body) == (200, "HIT", stand_in.read_bytes())
    assert origin.object_gets(miss) == 1


def _cut_download(proxy: Proxy, path: str) -> http.client.HTTPResponse:
    _, response = _request(proxy, path)
    assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
    response.read(FIRST_BYTES)
    return response


def _assert_cut_and_nothing_stored(proxy_factory, proxy: Proxy, response: http.client.HTTPResponse,
                                   cut_line: str) -> None:
    with pytest.raises(http.client.IncompleteRead):  # no terminating chunk: never a clean end
        response.read()
    assert _exit_status(proxy) == 0
    log = proxy.log.read_text()
    assert cut_line in log and "stopped" in log, log[-3000:]
    _assert_no_traceback(proxy)
    assert _cache_entries(proxy) == {}
    # Its temp file stays for another process on the cache to take the fetch over (as from a crash);
    # the next start-up clears what nobody took.
    proxy_factory(proxy.cache_dir).wait_for_log("index and blobs reconciled")
    assert not any((proxy.cache_dir / "tmp").iterdir())


def test_the_drain_deadline_cuts_a_transfer_that_cannot_finish(proxy_factory, held_stand_in, clean_origin, tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--drain-timeout", "1s")
    response = _cut_download(proxy, f"/{held_stand_in.handle}")
    clean_origin.wait_held(1)  # the origin will not send the rest before the proxy has exited

    proxy.process.send_signal(signal.SIGTERM)

    _assert_cut_and_nothing_stored(proxy_factory, proxy, response, "drain_timeout (1s) passed: cut 1 busy connections")


def test_a_second_signal_cuts_the_drain_short(proxy_factory, held_stand_in, clean_origin, tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--drain-timeout", "1h")
    response = _cut_download(proxy, f"/{held_stand_in.handle}")
    clean_origin.wait_held(1)

    proxy.process.send_signal(signal.SIGTERM)
    _wait_for_log(proxy, "stopping on SIGTERM: new connections refused, 1 busy")
    proxy.process.send_signal(signal.SIGINT)

    _assert_cut_and_nothing_stored(proxy_factory, proxy, response, "second stop signal (SIGINT): cut 1 busy connections")


def _tunnel(proxy: Proxy, target: str) -> socket.socket:
    """A plain --tunnel through the proxy's CONNECT to target, one request answered through it."""
    sock = _connect(proxy)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    established = b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert sock.recv(len(established), socket.MSG_WAITALL) == established
    sock.sendall(f"GET /through HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert b"canary" in response.read()
    return sock


def test_an_intercepted_transfer_finishes_and_a_plain_tunnel_holds_the_drain_until_cut(
        proxy_factory, held_stand_in, clean_origin, stand_in, tmp_path):
    ca = tmp_path / "ca"
    assert run_cli("ca", "init", "--ca-dir", ca).returncode == 0
    canary = clean_origin.urls["canary"].removeprefix("http://")
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1",
                          "--drain-timeout", "1h")
    host, port = _address(proxy)
    intercepted = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=ca / "ca.pem"),
                                              timeout=WAIT_SECONDS)
    intercepted.set_tunnel("tfhub.dev", 443)
    intercepted.request("GET", f"/{held_stand_in.handle}")
    response = intercepted.getresponse()
    body = response.read(FIRST_BYTES)
    tunnel = _tunnel(proxy, canary)

    proxy.process.send_signal(signal.SIGTERM)
    _wait_for_log(proxy, "stopping on SIGTERM: new connections refused, 2 busy")
    clean_origin.release()
    body += response.read()
    assert intercepted.sock.recv(1) == b""  # the proxy's TLS close_notify, after the response
    client_port = intercepted.sock.getsockname()[1]
    intercepted.close()
    _wait_until(lambda: _closed_by_proxy(proxy, client_port), lambda: "the proxy forgets the intercepted connection")
    proxy.process.send_signal(signal.SIGINT)  # the tunnel alone holds the drain: it is cut now

    assert body == stand_in.read_bytes()
    assert tunnel.recv(1) == b""
    assert _exit_status(proxy) == 0
    assert "second stop signal (SIGINT): cut 1 busy connections" in proxy.log.read_text()
    _assert_no_traceback(proxy)
    assert _cache_entries(proxy)[STAND_IN_SIZE]["sha256"] == hashlib.sha256(body).hexdigest()
