"""A corpus of hostile request shapes, each sent on a raw socket with a good request pipelined after
it (or alone, where an answer must come without more bytes): each is refused with a 4xx or a clean
close (or, where the shape is legal, answered below 500), never a 5xx, never a traceback in the log;
the connection never desyncs (anything answered after the refused request is the good request's own
answer); nothing is written outside the cache dir. The front (serve/front.py) sees every byte before
aiohttp does, so the corpus holds it to aiohttp's answers too."""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
from dataclasses import dataclass

import pytest

from tests.conftest import stand_in_archive, start_proxy

TOKEN = "hostile-corpus-admin-token-0123"
GOOD = b"GET /healthz HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n"
REFUSED, ANSWERED = "refused", "answered"  # 4xx or a clean close; any status below 500


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes  # "{model}" is replaced by a cached model's handle
    expect: str = REFUSED
    status: int | None = None  # exactly this status, when the shape has one right answer
    closes: bool = False  # the connection must close after the first response
    keeps: bool = False  # the connection must stay open: the pipelined request is answered too
    alone: bool = False  # sent without the good request after it: answered with no more bytes to come


def _get(target: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"GET {target} {version}", "Host: mirror", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


CASES = [
    # request lines
    Case("garbage line", b"GARBAGE\r\n\r\n"),
    Case("no target", b"GET\r\n\r\n"),
    Case("unknown version", b"GET / HTTP/9.9\r\nHost: mirror\r\n\r\n"),
    Case("extra token in the line", b"GET / HTTP/1.1 extra\r\nHost: mirror\r\n\r\n"),
    Case("binary line", b"\x00\x01\x02\x03\xff\xfe\r\n\r\n"),
    Case("NUL in the target", b"GET /google/\x00x/1 HTTP/1.1\r\nHost: mirror\r\n\r\n"),
    Case("space in the target", b"GET /google/x y/1 HTTP/1.1\r\nHost: mirror\r\n\r\n"),
    Case("non-UTF-8 target", b"GET /google/\xff\xfe/1 HTTP/1.1\r\nHost: mirror\r\n\r\n"),
    Case("request line of 100 KB", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: mirror\r\n\r\n"),
    Case("asterisk target", b"GET * HTTP/1.1\r\nHost: mirror\r\n\r\n"),
    Case("OPTIONS asterisk", b"OPTIONS * HTTP/1.1\r\nHost: mirror\r\n\r\n", ANSWERED),
    Case("lower-case method", b"get / HTTP/1.1\r\nHost: mirror\r\n\r\n"),
    # lines ending in a bare LF: a front waiting for CRLF CRLF would hang; aiohttp answers 400 at once
    Case("lines ending in a bare LF", b"GET /healthz HTTP/1.1\nHost: mirror\n\n", status=400, alone=True),
    Case("absolute-form target off the hub", _get("http://127.0.0.1:9/anything")),
    Case("authority-form GET", _get("127.0.0.1:9")),
    # headers
    Case("one header of 64 KB", _get("/", "X-Big: " + "a" * 65_536)),
    Case("1000 headers", _get("/", *[f"X-H{n}: v" for n in range(1000)])),
    Case("header without a colon", _get("/", "NoColonHere")),
    Case("space before the colon", _get("/", "X-Bad : v")),
    Case("obsolete line folding", _get("/", "X-Folded: a", " b")),
    Case("NUL in a header value", _get("/", "X-Nul: a\x00b")),
    Case("non-UTF-8 User-Agent", _get("/google/x/1", "User-Agent: \xff\xfe\xfd"), ANSWERED),
    Case("two Content-Lengths that differ", _get("/healthz", "Content-Length: 1", "Content-Length: 2") + b"xx"),
    Case("negative Content-Length", _get("/healthz", "Content-Length: -1")),
    Case("non-numeric Content-Length", _get("/healthz", "Content-Length: ten")),
    Case("Transfer-Encoding and Content-Length", _get("/healthz", "Transfer-Encoding: chunked", "Content-Length: 4")
         + b"0\r\n\r\n"),
    Case("unknown Transfer-Encoding", _get("/healthz", "Transfer-Encoding: gzip")),
    Case("bad chunk size", _get("/healthz", "Transfer-Encoding: chunked") + b"zz\r\nhello\r\n0\r\n\r\n"),
    # Host
    Case("no Host on HTTP/1.1", b"GET /google/x/1 HTTP/1.1\r\n\r\n", ANSWERED),
    Case("two Host fields", _get("/", "Host: other")),
    Case("Host with a path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", ANSWERED),
    Case("Host with a bad port", b"GET / HTTP/1.1\r\nHost: mirror:99999\r\n\r\n", ANSWERED),
    Case("empty Host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", ANSWERED),
    # Connection tokens are whole tokens: "close" inside another token closes nothing
    Case("Connection: Upgrade-close", _get("/healthz", "Connection: Upgrade-close"), status=200, keeps=True),
    # ranges on a cached archive
    *[Case(f"Range: {value}", _get("/{model}", f"Range: {value}"), ANSWERED) for value in (
        "bytes=abc", "bytes=5-1", "bytes=-0", "bytes=0-", "bytes=--1", "items=0-1", "bytes=99999999999999999999-",
        "bytes=0-0," * 2000 + "1-1", "bytes=18446744073709551616-18446744073709551617", "bytes=\xff-")],
    # traversal, plain and percent-encoded
    *[Case(f"traversal {target}", _get(target)) for target in (
        "/../../etc/passwd", "/google/x/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
        "/google/%2E%2E%2F%2E%2E%2Fetc/passwd", "/google/x/%252e%252e%252f/1", "/google/%c0%ae%c0%ae/1",
        "/google/x/1%00.tar.gz", "/google\\..\\..\\etc\\passwd", "/hubproxy/v1/files/../../../etc/passwd",
        "/hubproxy/v1/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/admin/../etc/passwd", "//etc/passwd")],
    # methods
    *[Case(f"{method} on a model", f"{method} /{{model}} HTTP/1.1\r\nHost: mirror\r\nContent-Length: 0\r\n\r\n"
           .encode()) for method in ("DELETE", "PUT", "PATCH", "PROPFIND", "TRACE", "FOO", "X" * 300)],
    Case("POST with a body to a model", b"POST /{model} HTTP/1.1\r\nHost: mirror\r\nContent-Length: 5\r\n\r\nhello"),
    Case("HEAD of a model", b"HEAD /{model} HTTP/1.1\r\nHost: mirror\r\n\r\n", ANSWERED),
    # admin
    Case("admin without a token", _get("/admin/ls"), status=401),
    Case("admin with a wrong token", _get("/admin/ls", "Authorization: Bearer nope"), status=401),
    Case("non-UTF-8 Host on the browse page", b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n", status=400),
    Case("non-UTF-8 admin Authorization",
         b"GET /admin/ls HTTP/1.1\r\nHost: mirror\r\nAuthorization: Bearer \xff\xfe\r\n\r\n", status=401),
    Case("HTTP/1.0 with Transfer-Encoding", b"GET /healthz HTTP/1.0\r\nHost: mirror\r\n"
         b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ANSWERED, closes=True),
    Case("CONNECT without --intercept", b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n", status=405),
]



@pytest.fixture(scope="module")
def corpus_proxy(origin, tmp_path_factory):
    """One proxy for the whole corpus, an archive cached, an admin token set; its dir's other files
    are listed so a case writing outside the cache shows."""
    home = tmp_path_factory.mktemp("hostile")
    config = home / "hubproxy.toml"
    config.write_text(f'admin_token = "{TOKEN}"\n')
    proxy = start_proxy(origin, home / "cache", "--config", str(config), log_dir=home)
    model = origin.register(stand_in_archive(home / "cached.tar.gz", 100_000))
    assert proxy.get(f"/{model.handle}")[0] == 200
    yield proxy, model, home
    proxy.stop()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name[:60]) for c in CASES])
def test_hostile_request_is_refused_cleanly_without_desync(corpus_proxy, case):
    proxy, model, home = corpus_proxy
    outside_before = _outside_the_cache(home, proxy)
    log_before = proxy.log.stat().st_size

    raw = case.raw.replace(b"{model}", model.handle.encode())
    sent = raw if case.alone else raw + GOOD
    responses = _parsed(_exchange(proxy.url, sent), first_method=raw.split(b" ", 1)[0].decode("latin-1"))

    if responses:
        first = responses[0][0]
        assert first < 500, f"{case.name}: {first}"
        if case.status is not None:
            assert first == case.status, f"{case.name}: {first}"
        elif case.expect == REFUSED:
            assert 400 <= first < 500, f"{case.name}: {first}"
    else:
        assert case.expect == REFUSED and case.status is None, f"{case.name}: closed without an answer"
    assert all(r == (200, b"ok\n") for r in responses[1:2]), f"desync after {case.name}: {responses}"
    assert len(responses) <= 2, f"desync after {case.name}: {responses}"
    if case.closes:
        assert len(responses) == 1, f"{case.name}: the pipelined request was answered on the same connection"
    if case.keeps:
        assert len(responses) == 2, f"{case.name}: the connection closed before the pipelined request: {responses}"
    assert _parsed(_exchange(proxy.url, GOOD)) == [(200, b"ok\n")], "the proxy stopped answering"
    assert "Traceback" not in _log_since(proxy, log_before)
    assert _outside_the_cache(home, proxy) == outside_before


def _exchange(base_url: str, data: bytes) -> bytes:
    """Send bytes and read until the server closes (the pipelined GOOD asks it to, a refusal closes);
    a server that waits for bytes that never come fails the case by timing out."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # refused before all was sent: what it answered is still readable
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


class _Unclosable(io.BytesIO):
    def close(self) -> None:  # http.client closes its file after each body; the next response follows
        pass


def _parsed(received: bytes, first_method: str = "GET") -> list[tuple[int, bytes]]:
    """(status, body) of each response in the bytes, in order; the first answers `first_method`."""
    stream, responses = _Unclosable(received), []
    while stream.tell() < len(received):
        response = http.client.HTTPResponse(_Socket(stream), method=first_method if not responses else "GET")
        response.begin()
        responses.append((response.status, response.read()))
    return responses


class _Socket:
    def __init__(self, stream: io.BytesIO):
        self._stream = stream

    def makefile(self, mode: str) -> io.BytesIO:
        return self._stream


def _log_since(proxy, offset: int) -> str:
    with proxy.log.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _outside_the_cache(home, proxy) -> set[str]:
    return {str(p.relative_to(home)) for p in home.rglob("*")
            if proxy.cache_dir not in p.parents and p != proxy.cache_dir and p != proxy.log}
