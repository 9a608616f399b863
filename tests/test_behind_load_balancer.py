"""Behind a load balancer (--trusted-proxy): real nginx terminating TLS (deploy/lb/nginx.conf) and real
haproxy (deploy/lb/haproxy.cfg) in front of hubproxy. Their X-Forwarded-* make the browse page's and
kagglehub's redirect URLs say https://<public host> and the access log name the client; anybody else's
(a direct client, or one spoofing them through the balancer) change nothing, and malformed ones are
ignored, never an error. Clients connect from their own loopback addresses (127.0.0.2, 127.0.0.3)."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import test_interception
from tests.conftest import ROOT, Proxy
from tests.origin_control import stop_process
from tests.test_cluster_behind_haproxy import HAPROXY_CFG, _free_port, _lb_env, _wait_for_states
from tests.test_interception import _through_tunnel
from tests.test_kagglehub_through_mirror import INSTANCE
from tests.test_origin_kaggle_api import BIG, RPC_PATH

ca = test_interception.ca

NGINX_CONF = ROOT / "deploy" / "lb" / "nginx.conf"
LB = "127.0.0.1/32"  # the balancers connect from here; clients from other loopback addresses
CLIENT, STRANGER = "127.0.0.2", "127.0.0.3"
SPOOFED = {"X-Forwarded-For": "203.0.113.66", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}


# -- harness -----------------------------------------------------------------------------------

def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 signed by its own key: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _wait_for_port(port: int, process: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, f"{name} exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"{name} never listened on {port}"
        time.sleep(0.05)


def start_tls_nginx(prefix: Path, backend: str, cert: Path, key: Path) -> tuple[subprocess.Popen, int]:
    """deploy/lb/nginx.conf as shipped, but for its addresses: TLS on a free loopback port, `backend`
    (host:port) as its only server, its pid and logs under prefix."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^\s*server hubproxy-\d[^;]*;\n", text, re.MULTILINE)
    text = text.replace(servers[0], f"        server {backend};\n")
    for line in servers[1:]:
        text = text.replace(line, "")
    text = (text.replace("/tmp/hubproxy-lb-nginx.pid", str(prefix / "nginx.pid"))
            .replace("http {", "http {\n    access_log off;", 1)
            .replace("listen 8080;", f"listen 127.0.0.1:{port} ssl;\n        ssl_certificate {cert};\n"
                                     f"        ssl_certificate_key {key};"))
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    process = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_port(port, process, "nginx")
    return process, port


def get(host: str, port: int, path: str, *, source: str, headers: dict | None = None, method: str = "GET",
        body: bytes | None = None, tls: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    """One request from the loopback address `source`; (status, headers, body)."""
    if tls is None:
        connection = http.client.HTTPConnection(host, port, timeout=60, source_address=(source, 0))
    else:
        connection = http.client.HTTPSConnection(host, port, timeout=60, source_address=(source, 0), context=tls)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def access_lines(proxy: Proxy, path: str, count: int) -> list[dict]:
    """The access log's lines for path, once there are `count` of them (lines are flushed in batches)."""
    deadline = time.monotonic() + 30
    while True:
        lines = [json.loads(line) for line in proxy.log.read_text().splitlines() if line.startswith('{"handle"')]
        found = [line for line in lines if line["path"] == path]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"the access log never had {count} lines for {path}: {found}"
        time.sleep(0.05)


@pytest.fixture
def cached_model(clean_origin, archives):
    return clean_origin.register(archives.small)


@pytest.fixture
def mirror(proxy_factory, clean_origin, cached_model, tmp_path) -> Proxy:
    """A mirror trusting LB, with cached_model cached (so the browse page has a row)."""
    proxy = proxy_factory(tmp_path / "cache", "--trusted-proxy", LB)
    assert proxy.get(f"/{cached_model.handle}")[0] == 200
    return proxy


def _port(proxy: Proxy) -> int:
    return int(proxy.url.rpartition(":")[2])


# -- through real balancers --------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (apt-get install nginx)")
def test_behind_nginx_terminating_tls_urls_say_https_and_the_log_names_the_client(mirror, cached_model, tmp_path):
    cert, key = self_signed(tmp_path)
    nginx, port = start_tls_nginx(tmp_path / "nginx", mirror.url.removeprefix("http://"), cert, key)
    tls = ssl.create_default_context(cafile=str(cert))
    try:
        status, _, page = get("localhost", port, "/", source=CLIENT, tls=tls, headers=SPOOFED)
        rpc = {**INSTANCE, "modelSlug": cached_model.model, "versionNumber": 1, "path": BIG}
        redirect, headers, _ = get("localhost", port, RPC_PATH + "DownloadModelInstanceVersion", source=CLIENT,
                                   tls=tls, method="POST", body=json.dumps(rpc).encode(),
                                   headers={"Content-Type": "application/json"})
    finally:
        stop_process(nginx)

    assert status == 200
    assert f"https://localhost:{port}/{cached_model.handle}".encode() in page, page
    assert b"http://127.0.0.1" not in page and b"evil.example" not in page
    assert redirect == 302
    assert headers["Location"].startswith(f"https://localhost:{port}/hubproxy/v1/files/google/{cached_model.model}/")
    assert [line["client"] for line in access_lines(mirror, "/", 1)] == [CLIENT]  # not the spoofed 203.0.113.66


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (apt-get install haproxy)")
def test_behind_haproxy_the_log_names_the_client_and_spoofed_headers_do_not_pass(mirror, cached_model, tmp_path):
    backend = mirror.url.removeprefix("http://")
    env = _lb_env(tmp_path, [backend] * 3)
    with (tmp_path / "haproxy.log").open("wb") as log:
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log, stderr=log)
    try:
        _wait_for_states(Path(env["HUBPROXY_LB_ADMIN_SOCKET"]), {f"replica{n}": 2 for n in (1, 2, 3)}, haproxy)
        host, port = env["HUBPROXY_LB_BIND"].split(":")
        status, _, page = get(host, int(port), "/", source=CLIENT, headers={**SPOOFED, "Host": f"hub.test:{port}"})
    finally:
        stop_process(haproxy)

    assert status == 200
    assert f"http://hub.test:{port}/{cached_model.handle}".encode() in page, page  # its Proto and Host, set
    assert b"evil.example" not in page and b"https://" not in page
    assert [line["client"] for line in access_lines(mirror, "/", 1)] == [CLIENT]


# -- straight to the mirror --------------------------------------------------------------------

def test_forwarded_headers_from_an_untrusted_peer_change_nothing(mirror, cached_model):
    status, _, page = get("127.0.0.1", _port(mirror), "/", source=STRANGER, headers=SPOOFED)

    assert status == 200
    assert f"{mirror.url}/{cached_model.handle}".encode() in page and b"evil.example" not in page
    assert [line["client"] for line in access_lines(mirror, "/", 1)] == [STRANGER]


def test_without_trusted_proxies_forwarded_headers_change_nothing(proxy, clean_origin, archives):
    model = clean_origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[0] == 200

    status, _, page = get("127.0.0.1", _port(proxy), "/", source="127.0.0.1", headers=SPOOFED)

    assert status == 200 and f"{proxy.url}/{model.handle}".encode() in page and b"evil.example" not in page
    assert [line["client"] for line in access_lines(proxy, "/", 1)] == ["127.0.0.1"]


def test_forwarded_headers_inside_an_intercepted_tunnel_are_the_clients_own_and_ignored(
        proxy_factory, clean_origin, archives, ca, tmp_path):
    """The balancer saw only ciphertext: what is inside the tunnel, the client wrote."""
    model = clean_origin.register(archives.small)
    mirror = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--trusted-proxy", LB)

    status, _, _ = _through_tunnel(mirror, "tfhub.dev", f"/{model.handle}", ca, headers=SPOOFED)

    assert status == 200
    assert [line["client"] for line in access_lines(mirror, f"/{model.handle}", 1)] == ["127.0.0.1"]


@pytest.mark.parametrize("headers, client, base", [
    ({"X-Forwarded-For": "198.51.100.7"}, "198.51.100.7", None),
    ({"X-Forwarded-For": "198.51.100.7:4711"}, "198.51.100.7", None),
    ({"X-Forwarded-For": "[2001:db8::7]:443"}, "2001:db8::7", None),
    ({"X-Forwarded-For": "203.0.113.66, 198.51.100.7, 127.0.0.1"}, "198.51.100.7", None),  # right-most untrusted
    ({"X-Forwarded-For": "not-an-address"}, "127.0.0.1", None),
    ({"X-Forwarded-For": "198.51.100.7, junk, 127.0.0.1"}, "127.0.0.1", None),  # trust ends where it stops parsing
    ({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "hub.example.com"}, "127.0.0.1", "https://hub.example.com"),
    ({"X-Forwarded-Proto": "HTTPS", "X-Forwarded-Host": "[2001:db8::1]:8443"}, "127.0.0.1", "https://[2001:db8::1]:8443"),
    ({"X-Forwarded-Proto": "ftp"}, "127.0.0.1", None),
    ({"X-Forwarded-Proto": "https, http"}, "127.0.0.1", None),  # appended: no telling whose is whose
    ({"X-Forwarded-Host": "evil.example/<script>"}, "127.0.0.1", None),
    ({"X-Forwarded-Host": "evil example"}, "127.0.0.1", None),
    ({"X-Forwarded-Host": "a.example, b.example"}, "127.0.0.1", None),
])
def test_forwarded_values_from_a_trusted_peer_are_believed_when_they_parse(mirror, cached_model, headers, client,
                                                                           base):
    status, _, page = get("127.0.0.1", _port(mirror), "/", source="127.0.0.1", headers=headers)

    assert status == 200
    assert f"{base or mirror.url}/{cached_model.handle}".encode() in page, page
    assert [line["client"] for line in access_lines(mirror, "/", 1)] == [client]


@pytest.mark.parametrize("header_bytes, client", [
    (b"X-Forwarded-Host: \xc3\xa9vil.example\r\n", "127.0.0.1"),
    (b"X-Forwarded-For: \xff\xfe\r\n", "127.0.0.1"),
    (b"X-Forwarded-Proto: https\r\nX-Forwarded-Proto: http\r\n", "127.0.0.1"),
    (b"X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-For: 127.0.0.1\r\n", "198.51.100.7"),  # one list, two lines
])
def test_odd_forwarded_bytes_from_a_trusted_peer_are_never_a_500(mirror, header_bytes, client):
    port = _port(mirror)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sConnection: close\r\n\r\n" % (port, header_bytes))
        response = http.client.HTTPResponse(sock)
        response.begin()
        page = response.read()

    assert response.status == 200
    assert f"{mirror.url}/".encode() in page
    assert [line["client"] for line in access_lines(mirror, "/", 1)] == [client]


def test_trusted_proxies_come_from_toml_and_env_and_a_bad_cidr_is_one_line(tmp_path):
    from hubproxy.config import ConfigError, load_settings

    toml = tmp_path / "hubproxy.toml"
    toml.write_text('trusted_proxies = ["10.0.0.0/8", "192.0.2.1"]\n')
    assert [str(n) for n in load_settings(toml, environ={}).trusted_networks] == ["10.0.0.0/8", "192.0.2.1/32"]
    env = {"HUBPROXY_TRUSTED_PROXIES": "fd00::/8, 127.0.0.1"}
    assert load_settings(environ=env).trusted_proxies == ("fd00::/8", "127.0.0.1")
    for bad in ("10.0.0.1/8", "10.0.0.0/33", "lb.internal"):
        with pytest.raises(ConfigError, match=f"trusted_proxies: '{re.escape(bad)}' is not an IP network"):
            load_settings(environ={"HUBPROXY_TRUSTED_PROXIES": bad})
    result = subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--cache-dir", str(tmp_path / "c"),
                             "--trusted-proxy", "10.0.0.1/8"], check=False, capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "trusted_proxies: '10.0.0.1/8'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_request_bounds_stays_the_outermost_middleware_behind_a_load_balancer():
    """The connection learns where each request starts and ends from it (serve/front.py): no middleware may
    run before it, the one believing trusted proxies included."""
    from hubproxy.config import Settings
    from hubproxy.serve.app import create_app
    from hubproxy.serve.front import request_bounds

    app = create_app(Settings(trusted_proxies=(LB,)))

    assert app.middlewares[0] is request_bounds and len(app.middlewares) == 3
