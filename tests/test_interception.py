"""Zero code: clients keep https://tfhub.dev/... handles and reach the mirror through HTTPS_PROXY.
hubproxy answers CONNECT for the hub hosts only, terminates TLS with leaves from its name-constrained
CA, serves the requests inside from the same cache, and dials nothing for any other host (unless the
operator allowed a plain tunnel)."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import ROOT, _hub_client_args, _quiet_env, loaded_output, model_dirs, raw_exchange, run_cli

from hubproxy.handles import tfhub_cache_name


@pytest.fixture
def ca(tmp_path):
    ca_dir = tmp_path / "ca"
    result = run_cli("ca", "init", "--ca-dir", ca_dir)
    assert result.returncode == 0, result.stderr
    return ca_dir


@pytest.fixture
def intercepting(proxy_factory, clean_origin, ca, tmp_path):
    return proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca)


def _trusting(ca_dir) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _through_tunnel(proxy, host: str, path: str, ca_dir, headers: dict | None = None, method: str = "GET"):
    """A real https request to `host` through the proxy's CONNECT (http.client's own tunnel)."""
    proxy_host, proxy_port = proxy.url.removeprefix("http://").split(":")
    connection = http.client.HTTPSConnection(proxy_host, int(proxy_port), context=_trusting(ca_dir), timeout=120)
    connection.set_tunnel(host, 443)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _hub_load_through_proxy(handle: str, tfhub_dir, proxy, ca_dir) -> subprocess.CompletedProcess:
    env = _quiet_env(TFHUB_CACHE_DIR=str(tfhub_dir), HTTPS_PROXY=proxy.url, https_proxy=proxy.url,
                     SSL_CERT_FILE=str(ca_dir / "trust-bundle.pem"), NO_PROXY="", no_proxy="")
    return subprocess.run(_hub_client_args(handle), capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_tensorflow_hub_keeps_its_tfhub_dev_handle_through_https_proxy(intercepting, origin, archives, ca, tmp_path):
    model = origin.register(archives.padded)
    handle = f"https://tfhub.dev/{model.handle}"

    first = _hub_load_through_proxy(handle, tmp_path / "tfhub-a", intercepting, ca)
    second = _hub_load_through_proxy(handle, tmp_path / "tfhub-b", intercepting, ca)

    assert loaded_output(first) == loaded_output(second) == archives.expected(archives.padded)
    assert origin.object_gets(model) == 1, "the second client, with a fresh cache, was served from the mirror's"
    assert [d.name for d in model_dirs(tmp_path / "tfhub-a")] == [tfhub_cache_name(handle)]
    assert intercepting.metric("hubproxy_connects_total", outcome="intercepted") == 2


def test_tensorflow_hub_keeps_its_kaggle_handle_through_https_proxy(intercepting, origin, archives, ca, tmp_path):
    model = origin.register(archives.small)
    handle = f"https://www.kaggle.com{model.kaggle_path}"

    loaded = _hub_load_through_proxy(handle, tmp_path / "tfhub", intercepting, ca)

    assert loaded_output(loaded) == archives.expected(archives.small)
    assert [d.name for d in model_dirs(tmp_path / "tfhub")] == [tfhub_cache_name(handle)]


def test_hits_inside_the_tunnel_stream_the_same_bytes_with_ranges(intercepting, origin, archives, ca):
    model = origin.register(archives.padded)
    body = archives.padded.read_bytes()
    path = f"/{model.handle}?tf-hub-format=compressed"

    miss = _through_tunnel(intercepting, "tfhub.dev", path, ca)
    hit = _through_tunnel(intercepting, "tfhub.dev", path, ca)
    part = _through_tunnel(intercepting, "tfhub.dev", path, ca, headers={"Range": "bytes=100-"})

    assert (miss[0], miss[1]["X-Cache"], miss[2]) == (200, "MISS", body)
    assert (hit[0], hit[1]["X-Cache"], hit[2]) == (200, "HIT", body)
    assert (part[0], part[2]) == (206, body[100:])


def test_a_tunnel_request_never_reaches_the_mirrors_own_pages(intercepting, origin, ca):
    for path in ("/metrics", "/", "/admin/ls", "/healthz"):
        status, _, body = _through_tunnel(intercepting, "tfhub.dev", path, ca)
        assert status in (400, 404) and b"hubproxy_" not in body and b"<html" not in body, path


def test_a_request_for_another_host_inside_a_tunnel_is_misdirected(intercepting, ca):
    status, _, body = _through_tunnel(intercepting, "tfhub.dev", "/google/x/1", ca, headers={"Host": "evil.example"})
    assert status == 421 and b"tfhub.dev" in body


@pytest.mark.parametrize("target", ["evil.example:443", "tfhub.dev:8443", "{canary}"])
def test_connect_to_anything_but_a_hub_host_is_refused_and_dials_nothing(intercepting, origin, target):
    target = target.format(canary=origin.urls["canary"].removeprefix("http://"))
    status, response = raw_exchange(intercepting.url, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert status == 403 and target.split(":")[0].encode() in response
    assert origin.requests() == []
    assert intercepting.metric("hubproxy_connects_total", outcome="refused") == 1


@pytest.mark.parametrize("head", [b"CONNECT tfhub.dev HTTP/1.1\r\n\r\n", b"CONNECT tfhub.dev:443 HTTP/1.1\n\n\r\n\r\n",
                                  b"CONNECT tfhub.dev:443 SPDY/3\r\n\r\n"])
def test_a_malformed_connect_is_a_400(intercepting, origin, head):
    status, response = raw_exchange(intercepting.url, head)
    assert status == 400 and b"CONNECT" in response
    assert origin.requests() == []


def test_a_tunnel_the_operator_allowed_is_a_plain_byte_pipe(proxy_factory, clean_origin, ca, tmp_path):
    canary = clean_origin.urls["canary"].removeprefix("http://")
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "127.0.0.1")
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"CONNECT {canary} HTTP/1.1\r\nHost: {canary}\r\n\r\n".encode())
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        assert reader.readline() == b"\r\n"
        sock.sendall(f"GET /through HTTP/1.1\r\nHost: {canary}\r\nConnection: close\r\n\r\n".encode())
        assert b"canary" in reader.read()
    assert [r["path"] for r in clean_origin.requests("canary")] == ["/through"]
    assert proxy.metric("hubproxy_connects_total", outcome="tunnelled") == 1


def test_absolute_form_http_proxy_requests_for_hub_hosts_are_served(intercepting, origin, archives):
    """HTTP_PROXY clients (urllib here) send absolute-form targets."""
    model = origin.register(archives.small)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": intercepting.url}))
    with opener.open(f"http://tfhub.dev/{model.handle}?tf-hub-format=compressed", timeout=60) as response:
        assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
        assert response.read() == archives.small.read_bytes()
    status, _ = raw_exchange(intercepting.url, (f"GET {origin.urls['canary']}/x HTTP/1.1\r\nHost: a\r\n"
                                                "Connection: close\r\n\r\n").encode())
    assert status == 403
    assert origin.requests("canary") == []


def test_the_mirror_port_still_serves_plain_requests_when_intercepting(intercepting, origin, archives):
    model = origin.register(archives.small)
    status, headers, body = intercepting.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.small.read_bytes())
    assert intercepting.get("/healthz")[0] == 200


def test_intercept_without_a_ca_is_a_one_line_error(tmp_path):
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--cache-dir", tmp_path / "cache", "--intercept")
    assert result.returncode == 2 and "ca_dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    missing = run_cli("serve", "--listen", "127.0.0.1:0", "--cache-dir", tmp_path / "cache", "--intercept",
                      "--ca-dir", tmp_path / "no-ca")
    assert missing.returncode == 2 and "no-ca" in missing.stderr and "Traceback" not in missing.stderr


def test_importing_the_proxy_door_needs_no_tensorflow():
    probe = subprocess.run([sys.executable, "-c", "import hubproxy.serve.intercept, sys; "
                            "print('tensorflow' in sys.modules)"], capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == "False"


def test_an_https_hub_target_sent_in_the_clear_is_refused(intercepting, origin, archives):
    """GET https://tfhub.dev/... in absolute form, on the proxy's plain port: the client asked for TLS it is
    not getting, so the answer is a refusal naming CONNECT, not the archive in the clear."""
    model = origin.register(archives.small)
    target = f"https://tfhub.dev/{model.handle}?tf-hub-format=compressed"

    status, response = raw_exchange(intercepting.url, f"GET {target} HTTP/1.1\r\nHost: tfhub.dev\r\n"
                                                      "Connection: close\r\n\r\n".encode())

    body = response.partition(b"\r\n\r\n")[2]
    assert status == 403 and b"https://tfhub.dev" in body and b"CONNECT" in body and body.count(b"\n") == 1, body
    assert origin.requests() == []
    assert intercepting.metric("hubproxy_proxy_requests_total", outcome="refused") == 1
