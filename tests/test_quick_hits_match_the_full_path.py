"""A new connection's plain GET of a cached archive, closing after it (tensorflow_hub's request), is
answered at accept without aiohttp (serve/quickhits.py). The hazards: that answer drifting from the
one aiohttp's path sends; a request it declines losing bytes, or being answered wrongly; and quick
answers escaping what every response owes: the hit count, the access log, the busy set that keeps a
blob from eviction, the connection cap and the drain."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import io
import json
import signal
import socket

import pytest

from hubproxy.handles import parse_request_target
from hubproxy.serve.accesslog import AccessLog
from hubproxy.serve.components import METRICS, SERVING
from hubproxy.serve.door import Door
from hubproxy.serve.front import Table
from hubproxy.serve.quickhits import QuickHits, plain_close_get
from tests.conftest import Proxy, raw_exchange, stand_in_archive
from tests.in_process import serving, settings_for, until

URLLIB_HEAD = ("GET {path} HTTP/1.1\r\nAccept-Encoding: identity\r\nHost: {host}\r\nUser-Agent: Python-urllib/3.11\r\n"
               "Connection: close\r\n\r\n")
BIG = 32 << 20  # far more than a socket's buffers hold: a client that stops reading keeps its answer busy


def _urllib_head(path: str, host: str = "mirror:8080") -> bytes:
    return URLLIB_HEAD.format(path=path, host=host).encode()


def _head_fields(response: bytes) -> list[str]:
    """The response head's lines, but the Date (it changes each second)."""
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    return [line for line in head.split("\r\n") if not line.startswith("Date: ")]


# -- the same answer as aiohttp's path ------------------------------------------------------------

def test_the_quick_answer_is_byte_for_byte_the_answer_aiohttp_sends(proxy, clean_origin, archives):
    model = clean_origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    quick_request = _urllib_head(f"/{model.handle}")
    full_request = quick_request.replace(b"Connection: close\r\n", b"Connection: close\r\nX-Request-Id: 7\r\n")
    assert plain_close_get(quick_request) is not None and plain_close_get(full_request) is None

    quick, full = raw_exchange(proxy.url, quick_request)[1], raw_exchange(proxy.url, full_request)[1]

    assert _head_fields(quick) == _head_fields(full)
    assert "X-Cache: HIT" in _head_fields(quick)
    assert quick.partition(b"\r\n\r\n")[2] == full.partition(b"\r\n\r\n")[2] == archives.small.read_bytes()
    assert proxy.metric("hubproxy_requests_total", outcome="HIT") == 2
    assert proxy.metric("hubproxy_cache_bytes_served_total") == 2 * archives.small.stat().st_size


# -- in process: what is answered, what is declined -------------------------------------------------

DECLINED = {
    "kept alive": "GET {path} HTTP/1.1\r\nHost: m\r\n\r\n",
    "keep-alive said": "GET {path} HTTP/1.1\r\nHost: m\r\nConnection: keep-alive\r\n\r\n",
    "a range": "GET {path} HTTP/1.1\r\nHost: m\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n",
    "a validator": 'GET {path} HTTP/1.1\r\nHost: m\r\nIf-None-Match: "x"\r\nConnection: close\r\n\r\n',
    "HEAD": "HEAD {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    "POST": "POST {path} HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "HTTP/1.0": "GET {path} HTTP/1.0\r\nHost: m\r\n\r\n",
    "a body": "GET {path} HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    "half a head": "GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n",
    "a duplicated field": "GET {path} HTTP/1.1\r\nHost: m\r\nHost: n\r\nConnection: close\r\n\r\n",
    "a folded field": "GET {path} HTTP/1.1\r\nHost: m\r\n User-Agent: x\r\nConnection: close\r\n\r\n",
    "a bare LF": "GET {path} HTTP/1.1\nHost: m\r\nConnection: close\r\n\r\n",
    "a proxy's field": "GET {path} HTTP/1.1\r\nHost: m\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n",
    "a byte above ASCII": "GET {path} HTTP/1.1\r\nHost: m\r\nUser-Agent: caf\xe9\r\nConnection: close\r\n\r\n",
    "an absolute target": "GET http://tfhub.dev{path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    "an admin path": "GET /admin/entries HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    "the files path": "GET /hubproxy/v1/files/a/b/c HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    "no handle": "GET /healthz HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    "not cached": "GET /google/never-fetched/1 HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
}


async def _accepted(listener: socket.socket, request: bytes) -> tuple[socket.socket, socket.socket, tuple]:
    """(client, server side, peer) of a connection whose request has reached the server side."""
    loop = asyncio.get_running_loop()
    client = socket.create_connection(listener.getsockname())
    client.sendall(request)
    conn, peer = await loop.sock_accept(listener)
    conn.setblocking(False)
    readable = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    return client, conn, peer


def _read_all(client: socket.socket) -> bytes:
    client.settimeout(60)
    received = b""
    while chunk := client.recv(1 << 20):
        received += chunk
    return received


def test_a_cached_archive_is_answered_counted_logged_and_kept_busy_while_sent(clean_origin, tmp_path, archives):
    model = clean_origin.register(archives.small)
    body = archives.small.read_bytes()
    log = io.StringIO()

    async def scenario():
        async with serving(settings_for(clean_origin, tmp_path / "cache")) as (base_url, app):
            await asyncio.to_thread(raw_exchange, base_url, _urllib_head(f"/{model.handle}"))  # the miss
            table = Table(cap=4)
            quick = QuickHits(app, table, AccessLog(enabled=True, stream=log))
            with socket.create_server(("127.0.0.1", 0)) as listener:
                listener.setblocking(False)
                client, conn, peer = await _accepted(listener, _urllib_head(f"/{model.handle}"))
                with client:
                    assert quick(conn, peer) is True
                    assert sum(app[SERVING].values()) == 1  # busy from the start
                    answer = await asyncio.to_thread(_read_all, client)
            await until(lambda: not app[SERVING], "the send ended")
            quick._access_log.flush()
            registry = app[METRICS].registry
            return answer, registry.get_sample_value("hubproxy_requests_total", {"outcome": "HIT"})

    answer, hits = asyncio.run(scenario())
    head, _, received = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nX-Cache: HIT\r\n" in head
    assert received == body
    assert hits == 1
    logged = json.loads(log.getvalue())
    key = parse_request_target(f"/{model.handle}").key
    assert (logged["handle"], logged["outcome"], logged["status"], logged["bytes"]) == (key, "HIT", 200, len(body))


@pytest.mark.parametrize("request_text", DECLINED.values(), ids=DECLINED.keys())
def test_anything_else_is_declined_with_nothing_read(clean_origin, tmp_path, archives, request_text):
    model = clean_origin.register(archives.small)
    request = request_text.format(path=f"/{model.handle}").encode("latin-1")

    async def scenario():
        async with serving(settings_for(clean_origin, tmp_path / "cache")) as (base_url, app):
            await asyncio.to_thread(raw_exchange, base_url, _urllib_head(f"/{model.handle}"))  # now cached
            quick = QuickHits(app, Table(cap=4), AccessLog(enabled=False))
            with socket.create_server(("127.0.0.1", 0)) as listener:
                listener.setblocking(False)
                client, conn, peer = await _accepted(listener, request)
                with client, conn:
                    declined = not quick(conn, peer)
                    return declined, conn.recv(65536, socket.MSG_PEEK)

    declined, unread = asyncio.run(scenario())
    assert declined
    assert unread == request


# -- the connection cap and the drain -------------------------------------------------------------

def _start_reading(proxy: Proxy, path: str) -> tuple[socket.socket, http.client.HTTPResponse]:
    """A plain close-after GET whose client reads the head and then stops: the answer stays busy."""
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.sendall(_urllib_head(path))
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert (response.status, response.headers["X-Cache"]) == (200, "HIT")
    return sock, response


def _cached_big(proxy: Proxy, origin, tmp_path) -> tuple[str, str]:
    """(path, sha256) of a BIG archive the proxy has cached."""
    archive = stand_in_archive(tmp_path / "big.tar.gz", BIG)
    model = origin.register(archive)
    assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    return f"/{model.handle}", hashlib.sha256(archive.read_bytes()).hexdigest()


def test_a_quick_answer_holds_its_place_under_the_connection_cap(proxy_factory, clean_origin, tmp_path):
    proxy = proxy_factory(None, "--max-connections", "1")
    path, sha256 = _cached_big(proxy, clean_origin, tmp_path)
    sock, response = _start_reading(proxy, path)
    with sock:
        status, refusal = raw_exchange(proxy.url, b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
        assert status == 503, refusal[:300]
        assert hashlib.sha256(response.read()).hexdigest() == sha256
    assert proxy.get("/healthz")[0] == 200  # its place is free once it is sent


def test_a_drain_lets_a_quick_answer_finish_whole(proxy_factory, clean_origin, tmp_path):
    proxy = proxy_factory()
    path, sha256 = _cached_big(proxy, clean_origin, tmp_path)
    sock, response = _start_reading(proxy, path)
    with sock:
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_log("stopping on SIGTERM: new connections refused, 1 busy")
        assert hashlib.sha256(response.read()).hexdigest() == sha256
    assert proxy.process.wait(timeout=60) == 0
    assert "drained: every connection finished" in proxy.log.read_text()


def test_a_client_leaving_mid_answer_costs_nothing_but_its_connection(proxy_factory, clean_origin, tmp_path):
    proxy = proxy_factory()
    path, _ = _cached_big(proxy, clean_origin, tmp_path)
    served_before = proxy.metric("hubproxy_cache_bytes_served_total")
    sock, _ = _start_reading(proxy, path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, with most of the body unsent
    proxy.wait_for_log('"status": 200, "bytes": 0')  # its access line: nothing counted as sent
    assert proxy.get("/healthz")[0] == 200
    assert proxy.metric("hubproxy_cache_bytes_served_total") == served_before
    assert "Traceback" not in proxy.log.read_text()


# -- the door: every connection is offered first, with its request readable -------------------------

def test_a_connection_that_sends_nothing_stalls_no_one(proxy_factory, clean_origin, archives):
    """Deferred accept hands a silent connection over after about a second, with no bytes yet, and
    the door offers it as accepted, still blocking: the quick answer's look must not wait on it."""
    proxy = proxy_factory(None, "--header-timeout", "1s")
    model = clean_origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as silent:
        assert silent.recv(65536).startswith(b"HTTP/1.1 408")  # a stalled loop would send nothing
    status, answer = raw_exchange(proxy.url, _urllib_head(f"/{model.handle}"))
    assert (status, answer.partition(b"\r\n\r\n")[2]) == (200, archives.small.read_bytes())


def test_the_door_offers_each_connection_with_its_request_readable_and_passes_declined_ones_on_whole():
    offered = []

    def decline(conn: socket.socket, peer: tuple) -> bool:
        offered.append(conn.recv(65536, socket.MSG_PEEK))
        return False

    class Upper(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data.upper())
            self.transport.close()

    async def scenario():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        door = Door(listener, Upper, 16, decline)
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(b"get / http/1.1\r\n\r\n")
        answer = await reader.read()
        writer.close()
        address = listener.getsockname()
        door.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)
        return answer

    assert asyncio.run(scenario()) == b"GET / HTTP/1.1\r\n\r\n"
    assert offered == [b"get / http/1.1\r\n\r\n"]  # the kernel handed it over with its first bytes (deferred accept)
