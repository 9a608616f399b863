"""Requests with bytes we don't expect: a header that is not UTF-8 is a client's mistake (a 4xx with
one line, never a 500 or a traceback); repeated header fields and scheme spellings mean what the
RFCs say they mean; framing we cannot trust ends the connection; CONNECT is a method we refuse."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from tests.conftest import ADMIN_TOKEN as TOKEN
from tests.conftest import raw_exchange


@pytest.fixture
def cached(admin_proxy, origin, tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(20_000))
    model = origin.register(archive)
    status, headers, _ = admin_proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"]) == (200, "MISS")
    return f"/{model.handle}", hashlib.sha256(archive.read_bytes()).hexdigest()


def _one_line_refusal(proxy, request: bytes, status: int) -> None:
    got, received = raw_exchange(proxy.url, request)
    assert got == status, received[:300]
    body = received.partition(b"\r\n\r\n")[2]
    assert body.count(b"\n") == 1, body
    log = proxy.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_a_host_header_that_is_not_utf8_is_a_400_on_the_browse_page(admin_proxy, cached):
    _one_line_refusal(admin_proxy, b"GET / HTTP/1.1\r\nHost: caf\xe9\xff:8080\r\nConnection: close\r\n\r\n", 400)


def test_an_authorization_that_is_not_utf8_is_a_401_on_the_admin_api(admin_proxy):
    _one_line_refusal(admin_proxy, b"GET /admin/ls HTTP/1.1\r\nHost: mirror\r\nAuthorization: Bearer \xff\xfe"
                                   b"\r\nConnection: close\r\n\r\n", 401)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(admin_proxy, scheme):
    status, _, _ = admin_proxy.get("/admin/ls", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert status == 200


@pytest.mark.parametrize("authorization", [TOKEN, f"Basic {TOKEN}", f"Bearer{TOKEN}"])
def test_a_token_without_the_bearer_scheme_is_refused(admin_proxy, authorization):
    status, headers, _ = admin_proxy.get("/admin/ls", headers={"Authorization": authorization})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"


def test_two_if_none_match_fields_are_one_list(admin_proxy, cached):
    path, sha256 = cached
    request = (f"GET {path} HTTP/1.1\r\nHost: mirror\r\nIf-None-Match: \"other\"\r\n"
               f"If-None-Match: \"{sha256}\"\r\nConnection: close\r\n\r\n").encode()
    status, received = raw_exchange(admin_proxy.url, request)
    assert status == 304, received[:300]


def test_http10_with_transfer_encoding_closes_after_the_response(admin_proxy):
    """RFC 9112 6.1: its framing is faulty whatever it says; the connection must not be reused."""
    host, port = admin_proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: mirror\r\nConnection: keep-alive\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):  # the default keep-alive (75 s) outlasts this timeout
            received += chunk
    assert received.split(b" ", 2)[1] in (b"200", b"400"), received[:300]


def test_connect_without_interception_is_a_405_naming_the_allowed_methods(admin_proxy):
    status, received = raw_exchange(admin_proxy.url, b"CONNECT tfhub.dev:443 HTTP/1.1\r\nHost: tfhub.dev:443\r\n"
                                                      b"Connection: close\r\n\r\n")
    assert status == 405, received[:300]
    head = received.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\nallow: get, head" in head
