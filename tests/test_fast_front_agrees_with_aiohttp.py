"""HEAD and 304 hits are answered by a front that skips aiohttp; it must never answer differently.

Each fast answer is compared with aiohttp's answer to the same request plus a header the front
leaves to aiohttp (If-Modified-Since, which a hit's HEAD and 304 ignore), and a connection that
mixes both kinds must get its responses in request order.
"""

from __future__ import annotations

import http.client
import json
import socket

import pytest

NOT_FOR_THE_FRONT = "If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\n"


def _exchange(proxy, request: bytes, responses: int = 1) -> list[tuple[int, str, list[tuple[str, str]], bytes]]:
    """Send raw bytes on one connection; read `responses` responses: (status, version, headers, body)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        return [_read_response(reader, method) for method in _methods(request)[:responses]]


def _read_response(reader, method: str) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """One response off a stream that carries several (http.client closes the stream after one)."""
    version, status, _ = reader.readline().decode().split(" ", 2)
    headers = []
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers.append((name, value.strip()))
    length = int(dict(headers).get("Content-Length", 0))
    body = b"" if method == "HEAD" or status == "304" else reader.read(length)
    return int(status), version, headers, body


def _methods(request: bytes) -> list[str]:
    return [part.split(b" ", 1)[0].decode() for part in request.split(b"\r\n\r\n") if part]


def _without_date(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name != "Date"]


@pytest.fixture
def cached(proxy, origin, archives) -> tuple[str, str]:
    """(mirror path, ETag) of an archive in the cache."""
    model = origin.register(archives.small)
    assert proxy.get(f"/{model.handle}?tf-hub-format=compressed")[0] == 200
    return f"/{model.handle}", proxy.get(f"/{model.handle}", method="HEAD")[1]["ETag"]


@pytest.mark.parametrize("request_text", [
    "HEAD {path} HTTP/1.1\r\nHost: mirror\r\n{extra}\r\n",
    "HEAD {path}?tf-hub-format=compressed HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n{extra}\r\n",
    "HEAD {path} HTTP/1.0\r\nConnection: Keep-Alive\r\n{extra}\r\n",
    "HEAD {path} HTTP/1.0\r\n{extra}\r\n",
    "GET {path} HTTP/1.1\r\nHost: mirror\r\nIf-None-Match: {etag}\r\n{extra}\r\n",
    "GET {path} HTTP/1.1\r\nHost: mirror\r\nIf-None-Match: \"other\", {etag}\r\nConnection: close\r\n{extra}\r\n",
    "HEAD {path} HTTP/1.1\r\nHost: mirror\r\nif-none-match: *\r\n{extra}\r\n",
])
def test_fast_answers_equal_aiohttp_answers(proxy, cached, request_text):
    path, etag = cached
    fast = _exchange(proxy, request_text.format(path=path, etag=etag, extra="").encode())[0]
    full = _exchange(proxy, request_text.format(path=path, etag=etag, extra=NOT_FOR_THE_FRONT).encode())[0]

    assert fast[0] in (200, 304)
    assert (fast[0], fast[1], _without_date(fast[2]), fast[3]) == (full[0], full[1], _without_date(full[2]), full[3])


def test_mixed_connection_keeps_request_order_across_the_hand_over(proxy, cached, archives):
    path, etag = cached
    request = (f"HEAD {path} HTTP/1.1\r\nHost: m\r\n\r\n"
               f"GET {path} HTTP/1.1\r\nHost: m\r\nIf-None-Match: {etag}\r\n\r\n"
               f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n"  # a body: aiohttp's from here on
               f"HEAD {path} HTTP/1.1\r\nHost: m\r\n\r\n"
               f"GET /google/not-cached-here/1 HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").encode()

    responses = _exchange(proxy, request, responses=5)

    assert [r[0] for r in responses] == [200, 304, 200, 200, 404]
    assert responses[2][3] == archives.small.read_bytes()
    assert [r[3] for r in responses[:2] + responses[3:4]] == [b"", b"", b""]


@pytest.mark.parametrize("oddity", [
    "X-Folded: a\r\n b\r\n",  # obs-fold: aiohttp refuses it
    "Bad Header: x\r\n",
    "Content-Length: 5\r\n",  # a body on a HEAD: aiohttp reads it
])
def test_requests_the_front_does_not_understand_get_aiohttp_answers(proxy, cached, oddity):
    path, _ = cached
    head = f"HEAD {path} HTTP/1.1\r\nHost: m\r\n{oddity}Connection: close\r\n\r\n"
    body = "hello" if "Content-Length" in oddity else ""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall((head + body).encode())
        response = http.client.HTTPResponse(sock, method="HEAD")
        response.begin()
    expected = 200 if body else 400  # what aiohttp itself answers
    assert response.status == expected


def test_fast_answers_are_counted_and_logged(proxy, cached):
    path, _ = cached
    before = proxy.metric("hubproxy_requests_total", outcome="HIT")

    for _ in range(3):
        assert _exchange(proxy, f"HEAD {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())[0][0] == 200

    assert proxy.metric("hubproxy_requests_total", outcome="HIT") == before + 3
    proxy.stop()  # flushes the access log
    lines = [json.loads(line) for line in proxy.log.read_text().splitlines() if line.startswith("{")]
    heads = [line for line in lines if line["method"] == "HEAD" and line["path"] == path and line["status"] == 200]
    assert len(heads) == 4  # the fixture's own HEAD, then ours
    assert all(line["outcome"] == "HIT" and line["handle"] == "tfhub:" + path for line in heads)
