"""Clients that hold on: a request head trickled a byte at a time is cut by a deadline that bytes
do not extend (408, then close), on the first request and on each keep-alive one; an idle
keep-alive connection is closed after keepalive_timeout; a client that behaves is never cut."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import ssl

import pytest

from hubproxy.config import load_settings
from hubproxy.serve import accesslog, runtime
from tests.conftest import run_cli

HEAD = b"GET /healthz HTTP/1.1\r\nHost: mirror\r\n"
PATIENCE = 60  # seconds a test waits for the proxy before it fails; never a pacing


def _connect(proxy) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=PATIENCE)


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length (what /healthz sends), read whole and no further: the
    socket's file reads ahead for pipelined responses."""
    reader = _reader(sock)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        assert line, "the proxy closed the connection mid-response"
        head += line
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + reader.read(length)


_readers: dict[socket.socket, io.BufferedReader] = {}


def _reader(sock: socket.socket) -> io.BufferedReader:
    return _readers.setdefault(sock, sock.makefile("rb"))


def _until_eof(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes the connection (the test fails if it never does)."""
    with contextlib.suppress(ConnectionResetError):
        return _reader(sock).read()
    return b""


def _trickle_until_answered(sock: socket.socket, head: bytes = HEAD) -> bytes:
    """Send an endless header a byte at a time, each byte sooner than the deadline, until the
    proxy answers; the first bytes of the answer."""
    sock.sendall(head + b"X-Slow: ")
    sock.settimeout(0.2)  # the trickle's pace: a byte every 0.2 s, far inside a 1 s deadline
    for _ in range(PATIENCE * 5):
        try:
            sock.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            break
        try:
            answer = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            continue
        sock.settimeout(PATIENCE)
        return answer
    sock.settimeout(PATIENCE)
    return sock.recv(65536)


@pytest.fixture
def impatient(proxy_factory, clean_origin):
    return proxy_factory(None, "--header-timeout", "1s")


@pytest.mark.parametrize("earlier_requests", [0, 2], ids=["first-request", "keep-alive-request"])
def test_a_head_sent_a_byte_at_a_time_is_cut_at_its_deadline_with_408(impatient, earlier_requests):
    with _connect(impatient) as sock:
        for _ in range(earlier_requests):
            sock.sendall(HEAD + b"\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
        answer = _trickle_until_answered(sock)
        answer += _until_eof(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    body = answer.partition(b"\r\n\r\n")[2]
    assert body.count(b"\n") == 1 and b"head" in body, body
    assert "Traceback" not in impatient.log.read_text()


@pytest.mark.parametrize("head", [HEAD, b"CONNECT tfhub.dev:443 HTTP/1.1\r\nHost: tfhub.dev:443\r\n"],
                         ids=["mirror-request", "connect"])
def test_a_trickled_head_is_cut_when_intercepting_too(proxy_factory, clean_origin, tmp_path, head):
    assert run_cli("ca", "init", "--ca-dir", tmp_path / "ca").returncode == 0
    proxy = proxy_factory(None, "--intercept", "--ca-dir", tmp_path / "ca", "--header-timeout", "1s")
    with _connect(proxy) as sock:
        answer = _trickle_until_answered(sock, head) + _until_eof(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_trickled_head_inside_an_intercepted_tunnel_is_cut(proxy_factory, clean_origin, tmp_path):
    assert run_cli("ca", "init", "--ca-dir", tmp_path / "ca").returncode == 0
    proxy = proxy_factory(None, "--intercept", "--ca-dir", tmp_path / "ca", "--header-timeout", "1s")
    with _connect(proxy) as raw:
        raw.sendall(b"CONNECT tfhub.dev:443 HTTP/1.1\r\nHost: tfhub.dev:443\r\n\r\n")
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
        answer = b""
        trusting = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
        with trusting.wrap_socket(raw, server_hostname="tfhub.dev") as tls:
            with contextlib.suppress(ssl.SSLError):  # the proxy may close without TLS's close_notify
                answer = _trickle_until_answered(tls, HEAD.replace(b"mirror", b"tfhub.dev")) + _until_eof(tls)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_keep_alive_client_that_behaves_is_never_cut(impatient):
    with _connect(impatient) as sock:
        sock.sendall(HEAD)  # a head in two pieces, then two pipelined requests
        sock.sendall(b"\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(HEAD + b"\r\n" + HEAD + b"\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(HEAD + b"Connection: close\r\n\r\n")
        assert _until_eof(sock).startswith(b"HTTP/1.1 200")


def test_an_idle_keep_alive_connection_gets_no_408(proxy_factory, clean_origin):
    """Waiting between requests is the keep-alive timeout's business: the head deadline starts with
    the next request's first byte, so the idle connection is closed with nothing sent."""
    proxy = proxy_factory(None, "--header-timeout", "1s", "--keepalive-timeout", "3s")
    with _connect(proxy) as sock:
        sock.sendall(HEAD + b"\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        assert _until_eof(sock) == b""


def test_the_server_hands_its_default_keepalive_timeout_to_aiohttp_not_aiohttps_hour(tmp_path):
    """Checked where aiohttp reads it, each connection's handler, in the runner the server builds:
    idling out the 75 s default (or aiohttp's 3630 s) through a socket would take that long."""
    settings = load_settings(environ={}, overrides={"cache_dir": str(tmp_path / "cache")})

    async def connection_keepalive() -> float:
        runner = runtime.app_runner(settings, accesslog.AccessLog(enabled=False))
        await runner.setup()
        try:
            return runner.server().keepalive_timeout
        finally:
            await runner.cleanup()

    assert asyncio.run(connection_keepalive()) == 75


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(proxy_factory, clean_origin):
    proxy = proxy_factory(None, "--keepalive-timeout", "1s")
    with _connect(proxy) as sock:
        sock.sendall(HEAD + b"\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        sock.settimeout(30)  # far below the default 75 s: only the configured timeout closes it in time
        assert _until_eof(sock) == b""


@pytest.mark.parametrize("flag, value", [("--header-timeout", "30"), ("--keepalive-timeout", "soon")])
def test_a_timeout_without_a_unit_is_a_one_line_error(run_cli_serve, flag, value):
    result = run_cli_serve(flag, value)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and flag.strip("-").replace("-", "_") in result.stderr


@pytest.fixture
def run_cli_serve(tmp_path):
    return lambda *args: run_cli("serve", "--listen", "127.0.0.1:0", "--cache-dir", tmp_path / "cache", *args)
