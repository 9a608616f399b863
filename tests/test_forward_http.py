"""Plain HTTP forwarding (HTTP_PROXY) to the hosts the operator allowed with --tunnel: an http://
absolute-form request is sent on and its answer streamed back unstored, hop-by-hop headers dropped
both ways; anything else (another host, https://, user information) is refused and dials nothing; an
upstream that is unreachable, late or silent is a one-line 502/504 or a cut body. The canary site of
the origin emulator (tests/origin.py) is the host forwarded to."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time

import pytest
import requests

from tests import test_interception
from tests.conftest import raw_exchange

ca = test_interception.ca


@pytest.fixture
def tunnelling(proxy_factory, clean_origin, ca, tmp_path):
    """An intercepting proxy whose operator allowed 127.0.0.1, where the canary site listens."""
    return proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1")


def test_an_http_proxy_request_for_a_tunnel_host_is_forwarded_as_plain_http(tunnelling, clean_origin, tmp_path):
    """requests through HTTP_PROXY: the request and its answer pass end to end, hop-by-hop headers
    (RFC 9110 7.6.1) dropped both ways, no redirect followed, nothing cached, each one counted."""
    canary, proxies = clean_origin.urls["canary"], {"http": tunnelling.url}
    sent = {"Connection": "keep-alive, X-Private", "X-Private": "hop", "Keep-Alive": "timeout=9",
            "Proxy-Authorization": "Basic aHVicHJveHk6c2VjcmV0", "X-End": "kept"}

    echoed = requests.post(f"{canary}/_echo?q=1&sig=a%2Fb", data=b"payload", headers=sent, proxies=proxies,
                           timeout=60)
    again = requests.get(f"{canary}/_echo", proxies=proxies, timeout=60)
    redirect = requests.get(f"{canary}/_redirect", proxies=proxies, allow_redirects=False, timeout=60)

    assert echoed.status_code == 200, echoed.text
    seen = echoed.json()
    assert (seen["method"], seen["target"], seen["body"]) == ("POST", "/_echo?q=1&sig=a%2Fb", "payload")
    arrived = {name.lower(): value for name, value in seen["headers"]}
    assert arrived["x-end"] == "kept" and arrived["host"] == canary.removeprefix("http://")
    assert not {"x-private", "keep-alive", "proxy-authorization"} & set(arrived), arrived
    assert "hubproxy" in arrived["via"]
    assert echoed.headers["X-Canary-End"] == "kept" and "hubproxy" in echoed.headers["Via"]
    assert "X-Canary-Hop" not in echoed.headers and "timeout=5" not in echoed.headers.get("Keep-Alive", "")
    assert again.status_code == 200 and again.json()["method"] == "GET"
    assert (redirect.status_code, redirect.headers["Location"]) == (302, "/_elsewhere")
    assert [r["path"] for r in clean_origin.requests("canary")] == ["/_echo", "/_echo", "/_redirect"]
    assert tunnelling.metric("hubproxy_proxy_requests_total", outcome="tunnelled") == 3
    assert not [p for p in (tmp_path / "cache").rglob("blobs/**/*") if p.is_file()], "nothing is stored"


def test_a_forwarded_answers_cookie_is_the_clients_not_the_proxys(proxy_factory, clean_origin, ca, tmp_path):
    """By name, not address (a cookie jar ignores cookies from IP addresses): localhost, the canary's."""
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "localhost")
    url = clean_origin.urls["canary"].replace("127.0.0.1", "localhost") + "/_echo"

    first = requests.get(url, proxies={"http": proxy.url}, timeout=60)
    second = requests.get(url, proxies={"http": proxy.url}, timeout=60)

    assert first.cookies.get("canary") == "seen", "Set-Cookie reached the client"
    assert "cookie" not in {name.lower() for name, _ in second.json()["headers"]}, "the proxy kept none to send on"


def test_a_forwarded_body_keeps_its_encoding(tunnelling, clean_origin):
    """The bytes pass as they came: a gzip body is not decoded on the way (its Content-Encoding stays)."""
    answer = requests.get(clean_origin.urls["canary"] + "/_gzip", proxies={"http": tunnelling.url}, stream=True,
                          timeout=60)
    raw = answer.raw.read(decode_content=False)

    assert (answer.status_code, answer.headers["Content-Encoding"]) == (200, "gzip")
    assert raw[:2] == b"\x1f\x8b" and gzip.decompress(raw) == b"canary " * 100


@pytest.mark.parametrize("tunnel", ["*.example.org", "127.0.0.2"])
def test_an_http_proxy_request_for_a_host_no_tunnel_glob_matches_is_refused(proxy_factory, clean_origin, ca,
                                                                             tmp_path, tunnel):
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", tunnel)

    answer = requests.get(clean_origin.urls["canary"] + "/_echo", proxies={"http": proxy.url}, timeout=60)

    assert answer.status_code == 403 and "127.0.0.1" in answer.text and answer.text.count("\n") == 1
    assert clean_origin.requests("canary") == []
    assert proxy.metric("hubproxy_proxy_requests_total", outcome="refused") == 1


def test_an_https_target_in_absolute_form_is_not_forwarded_as_plain_http(tunnelling, clean_origin):
    """GET https://host/ sent to a proxy in the clear: forwarding it as http:// would downgrade it."""
    target = clean_origin.urls["canary"].replace("http://", "https://") + "/_echo"
    status, response = raw_exchange(tunnelling.url, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                                    .encode())

    assert status == 403 and b"CONNECT" in response
    assert clean_origin.requests("canary") == []


def test_an_absolute_form_target_with_user_information_is_not_forwarded(tunnelling, clean_origin):
    target = clean_origin.urls["canary"].replace("http://", "http://user:secret@") + "/_echo"
    status, response = raw_exchange(tunnelling.url, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                                    .encode())

    assert status == 400 and b"user information" in response and b"secret" not in response
    assert clean_origin.requests("canary") == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_tunnel_host_whose_answer_never_comes_is_a_504_after_the_headers_deadline(proxy_factory, clean_origin, ca,
                                                                                     tmp_path, method):
    """With a body or without, the deadline runs once the request has been sent on."""
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1",
                          "--upstream-headers-deadline", "1s")

    answer = requests.request(method, f"{clean_origin.urls['canary']}/_hold", data=b"body" if method == "POST" else None,
                              proxies={"http": proxy.url}, timeout=60)

    assert answer.status_code == 504 and "within 1s" in answer.text and answer.text.count("\n") == 1


def test_a_tunnel_host_that_does_not_answer_is_a_502(proxy_factory, clean_origin, ca, tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1")

    answer = requests.get("http://127.0.0.1:9/nothing-listens", proxies={"http": proxy.url}, timeout=60)

    assert answer.status_code == 502 and "127.0.0.1:9" in answer.text and answer.text.count("\n") == 1


def _config(tmp_path, text: str):
    config = tmp_path / "hubproxy.toml"
    config.write_text(text)
    return config


def test_a_forwarded_answer_that_falls_silent_mid_body_is_cut_after_the_read_timeout(proxy_factory, clean_origin,
                                                                                    archives, ca, tmp_path):
    """A host that stops sending after its headers must not hold the client (nor a drain) for good."""
    model = clean_origin.register(archives.small, public_bucket=True)
    clean_origin.faults(model, hold_after=1000)
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1",
                          "--config", _config(tmp_path, "read_timeout_seconds = 1.0\n"))
    connection = http.client.HTTPConnection(*proxy.url.removeprefix("http://").split(":"), timeout=30)

    connection.request("GET", f"{clean_origin.urls['gcs']}/{model.object}")
    answer = connection.getresponse()

    assert answer.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:  # a timeout here: nothing cut the silent answer
        answer.read()
    assert cut.value.partial == archives.small.read_bytes()[:1000]
    proxy.wait_for_log("cutting a forwarded answer")
    connection.close()


def test_a_tunnel_host_silent_for_the_read_timeout_before_its_headers_is_a_504(proxy_factory, clean_origin, ca,
                                                                                tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1",
                          "--config", _config(tmp_path, "read_timeout_seconds = 1.0\n"))

    answer = requests.get(f"{clean_origin.urls['canary']}/_hold", proxies={"http": proxy.url}, timeout=60)

    assert answer.status_code == 504 and "read_timeout_seconds" in answer.text and answer.text.count("\n") == 1


def test_an_upload_slower_than_the_headers_deadline_is_answered(proxy_factory, clean_origin, ca, tmp_path):
    """The headers deadline is for the host's answer: it starts once the client's body has been sent on,
    however long the client takes to upload it."""
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1",
                          "--upstream-headers-deadline", "1s")
    echo = clean_origin.urls["canary"] + "/_echo"

    with socket.create_connection(tuple(proxy.url.removeprefix("http://").split(":")), timeout=60) as sock:
        sock.sendall(f"POST {echo} HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nConnection: close\r\n\r\nfirst"
                     .encode())
        _wait_until(lambda: clean_origin.requests("canary", "/_echo"), "the request reached the host")
        witness = requests.get(f"{clean_origin.urls['canary']}/_hold", proxies={"http": proxy.url}, timeout=60)
        assert witness.status_code == 504  # a deadline started after the upload's would have passed by now
        sock.sendall(b" later")
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        body = answer.read()

    assert answer.status == 200, body
    assert json.loads(body)["body"] == "first later"


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
