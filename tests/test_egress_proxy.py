"""Egress through a corporate proxy (--egress-proxy): a real tinyproxy, with BasicAuth, is the only way
out; every upstream hop (tfhub -> Kaggle -> storage, resumes, kagglehub's RPCs, relayed signed URLs)
passes it, as its Via header in the origin's request log shows; parents are dialled directly; a
stopped proxy or wrong credentials are a 502 naming the proxy, and its password is never written."""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests import test_interception, test_origin_kaggle_api
from tests.conftest import ROOT, hub_load, loaded_output
from tests.origin_control import stop_process
from tests.test_behind_load_balancer import self_signed, start_tls_nginx
from tests.test_kagglehub_through_mirror import _upstreams, run_kagglehub
from tests.test_origin_kaggle_api import BIG, download_location, downloaded, md5s

ca, members, archive = test_interception.ca, test_origin_kaggle_api.members, test_origin_kaggle_api.archive

TINYPROXY = shutil.which("tinyproxy")

VIA_NAME = "egress-test-proxy"  # what tinyproxy writes into the Via header of every request it forwards
USER, PASSWORD = "hubproxy", "egress-Pa55-never-logged"
_REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


@dataclasses.dataclass
class ForwardProxy:
    """A tinyproxy process on 127.0.0.1: its port, its own log, and the URL to reach it by."""
    process: subprocess.Popen
    port: int
    log: Path

    def url(self, password: str | None = PASSWORD) -> str:
        credentials = "" if password is None else f"{USER}:{password}@"
        return f"http://{credentials}127.0.0.1:{self.port}"

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the proxy received, in order."""
        return _REQUEST_LINE.findall(self.log.read_text())

    def stop(self) -> None:
        stop_process(self.process)


def _unused_port() -> socket.socket:
    """A socket bound to a free loopback port, never listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def start_tinyproxy(directory: Path, port: int) -> ForwardProxy:
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "tinyproxy.log"
    conf = directory / "tinyproxy.conf"
    conf.write_text(f'Port {port}\nListen 127.0.0.1\nTimeout 600\nLogFile "{log}"\nLogLevel Info\n'
                    f'PidFile "{directory / "tinyproxy.pid"}"\nMaxClients 100\nAllow 127.0.0.1\n'
                    f'ViaProxyName "{VIA_NAME}"\nBasicAuth {USER} {PASSWORD}\n')
    process = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (log.exists() and "Accepting connections" in log.read_text()):  # its own "I listen" line
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"tinyproxy did not start: {log.read_text() if log.exists() else 'no log'}")
        time.sleep(0.05)
    return ForwardProxy(process, port, log)


@pytest.fixture
def egress(tmp_path):
    if TINYPROXY is None:
        pytest.skip("tinyproxy not installed (apt-get install tinyproxy)")
    with _unused_port() as reserved:
        port = reserved.getsockname()[1]
    proxy = start_tinyproxy(tmp_path / "egress", port)
    yield proxy
    proxy.stop()


def _assert_password_never_written(password: str, mirror, body: bytes = b"") -> None:
    assert password not in mirror.log.read_text()
    assert password.encode() not in body
    assert password.encode() not in mirror.get("/metrics")[2]


def _all_via_the_proxy(origin_requests: list[dict]) -> bool:
    return bool(origin_requests) and all(VIA_NAME in (r["via"] or "") for r in origin_requests)


def test_a_model_loads_through_the_egress_proxy_and_every_hop_passes_it(proxy_factory, clean_origin, archives,
                                                                       egress, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    mirror = proxy_factory(tmp_path / "cache", "--egress-proxy", egress.url())

    assert loaded_output(hub_load(f"{mirror.url}/{model.handle}", tmp_path / "tfhub")) == \
        archives.expected(archives.small)

    hops = origin.requests()
    assert [r["site"] for r in hops] == ["tfhub", "kaggle", "gcs"]
    assert _all_via_the_proxy(hops), hops
    dialled = [target.split("/")[2] for _, target in egress.requests()]  # absolute-form: http://host:port/...
    assert dialled == [origin.urls[site].removeprefix("http://") for site in ("tfhub", "kaggle", "gcs")]
    _assert_password_never_written(PASSWORD, mirror)


def test_a_resumed_transfer_goes_through_the_egress_proxy(proxy_factory, clean_origin, archives, egress, tmp_path):
    origin = clean_origin
    model = origin.register(archives.padded)
    origin.faults(model, cut_once_at=1 << 20)
    mirror = proxy_factory(tmp_path / "cache", "--egress-proxy", egress.url())

    status, _, body = mirror.get(f"/{model.handle}")

    assert (status, body) == (200, archives.padded.read_bytes())
    storage = [r for r in origin.requests("gcs") if r["path"] == "/" + model.object]
    assert [r["range"] is not None for r in storage] == [False, True]  # the first GET, then the resume
    assert _all_via_the_proxy(storage), storage


def test_kagglehub_rpcs_and_relayed_storage_urls_go_through_the_egress_proxy(proxy_factory, clean_origin, archive,
                                                                            members, ca, egress, tmp_path):
    origin = clean_origin
    mirror = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--egress-proxy", egress.url(),
                           upstreams=_upstreams(origin))
    public, private = origin.register(archive), origin.register(archive, private=True)

    files = downloaded(run_kagglehub(mirror, ca, public.kaggle_handle, tmp_path / "kh"))
    kagglehubs = origin.requests()
    signed = download_location(origin, private, BIG, Authorization=private.authorization())  # the test's own ask
    asked_before_the_relay = len(origin.requests())
    relayed = requests.get(signed.replace(origin.urls["gcs"], "http://storage.googleapis.com"),
                           proxies={"http": mirror.url}, timeout=60)

    assert files == md5s(members)
    assert {r["site"] for r in kagglehubs} == {"kaggle-api", "gcs"} and _all_via_the_proxy(kagglehubs), kagglehubs
    assert (relayed.status_code, relayed.headers["X-Cache"], relayed.content) == (200, "PASS", members[BIG])
    relay_hops = origin.requests()[asked_before_the_relay:]
    assert [r["site"] for r in relay_hops] == ["gcs"] and _all_via_the_proxy(relay_hops), relay_hops


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (apt-get install nginx)")
def test_an_https_upstream_is_reached_through_the_egress_proxys_connect(proxy_factory, clean_origin, archives, egress,
                                                                       tmp_path, monkeypatch):
    """As in the field, where every upstream is https: the proxy tunnels, TLS is end to end (nginx
    terminating it in front of the origin's storage, with a certificate hubproxy is told to trust)."""
    origin = clean_origin
    model = origin.register(archives.small, public_bucket=True)
    cert, key = self_signed(tmp_path)
    nginx, port = start_tls_nginx(tmp_path / "nginx", origin.urls["gcs"].removeprefix("http://"), cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # hubproxy's process inherits it
    try:
        mirror = proxy_factory(tmp_path / "cache", "--egress-proxy", egress.url(),
                               upstreams={"tfhub": origin.urls["tfhub"], "gcs": f"https://127.0.0.1:{port}"})
        status, _, body = mirror.get(f"/{model.object}")
    finally:
        stop_process(nginx)

    assert (status, body) == (200, archives.small.read_bytes())
    assert egress.requests() == [("CONNECT", f"127.0.0.1:{port}")]
    assert [r["path"] for r in origin.requests("gcs")] == ["/" + model.object]
    _assert_password_never_written(PASSWORD, mirror)


def test_a_redirect_off_the_allowlist_is_refused_before_the_egress_proxy_is_asked(proxy_factory, clean_origin,
                                                                                 archives, egress, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    origin.faults(model, redirect_to=f"{origin.urls['canary']}/metadata/secrets")
    mirror = proxy_factory(tmp_path / "cache", "--egress-proxy", egress.url())

    status, _, body = mirror.get(f"/{model.handle}")

    assert status == 502 and b"not an allowed host" in body
    assert origin.requests("canary") == []
    dialled = [target.split("/")[2] for _, target in egress.requests()]  # the allowed hops, through the proxy
    assert dialled == [origin.urls[site].removeprefix("http://") for site in ("tfhub", "kaggle")]


def test_a_stopped_egress_proxy_is_a_502_naming_it_and_nothing_is_cached(proxy_factory, clean_origin, archives,
                                                                        egress, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    mirror = proxy_factory(tmp_path / "cache", "--egress-proxy", egress.url(), "--retries", "1")
    egress.stop()

    status, _, body = mirror.get(f"/{model.handle}")

    assert status == 502
    assert f"cannot reach the egress proxy http://127.0.0.1:{egress.port}".encode() in body, body
    assert origin.requests() == []
    assert not [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
    _assert_password_never_written(PASSWORD, mirror, body)


@pytest.mark.parametrize("scheme, password, status", [
    ("http", None, 407),  # a plain request without credentials: the proxy's 407 comes back as an answer
    ("https", None, 407),  # the CONNECT refused
    ("https", "wrong-Pa55-also-never-logged", 401),  # tinyproxy answers a wrong password with 401
])
def test_a_refusing_egress_proxy_is_a_502_naming_it_never_the_password(proxy_factory, clean_origin, archives, egress,
                                                                      tmp_path, scheme, password, status):
    origin = clean_origin
    model = origin.register(archives.small, public_bucket=True)
    gcs = origin.urls["gcs"].replace("http://", f"{scheme}://")
    mirror = proxy_factory(tmp_path / "cache", "--egress-proxy", egress.url(password),
                           upstreams={"tfhub": origin.urls["tfhub"], "gcs": gcs})

    answer, _, body = mirror.get(f"/{model.object}")

    assert answer == 502
    assert f"the egress proxy http://127.0.0.1:{egress.port} refused".encode() in body, body
    assert f": {status} ".encode() in body and b"check the credentials" in body, body
    assert origin.requests() == []
    assert egress.requests() and egress.requests()[0][0] == ("CONNECT" if scheme == "https" else "GET")
    _assert_password_never_written(password or PASSWORD, mirror, body)


def test_parents_are_dialled_directly_not_through_the_egress_proxy(proxy_factory, clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    parent = proxy_factory(tmp_path / "parent")
    with _unused_port() as dead:  # an egress proxy that refuses every connection
        child = proxy_factory(tmp_path / "child", "--parent", parent.url, "--retries", "0",
                              "--egress-proxy", f"http://127.0.0.1:{dead.getsockname()[1]}")

        status, _, body = child.get(f"/{model.handle}")

    assert (status, body) == (200, archives.small.read_bytes())
    assert origin.object_gets(model) == 1


def test_the_egress_proxy_setting_comes_from_toml_and_env_and_bad_ones_are_one_line(tmp_path):
    from hubproxy.config import ConfigError, load_settings

    toml = tmp_path / "hubproxy.toml"
    toml.write_text('egress_proxy = "http://u:p@proxy.corp:3128"\n')
    assert load_settings(toml, environ={}).egress_proxy == "http://u:p@proxy.corp:3128"
    assert load_settings(toml, environ={"HUBPROXY_EGRESS_PROXY": "http://other:8080"}).egress_proxy == \
        "http://other:8080"
    assert PASSWORD not in repr(load_settings(environ={"HUBPROXY_EGRESS_PROXY": f"http://u:{PASSWORD}@p:1"}))
    for bad in (f"https://u:{PASSWORD}@proxy:3128", f"socks5://u:{PASSWORD}@proxy:1080", f"u:{PASSWORD}@proxy:3128",
                f"http://u:{PASSWORD}@proxy:3128/path", f"http://u:{PASSWORD}@proxy:99999"):
        with pytest.raises(ConfigError, match="egress_proxy must be http://") as refused:
            load_settings(environ={"HUBPROXY_EGRESS_PROXY": bad})
        assert PASSWORD not in str(refused.value) and "\n" not in str(refused.value)


def test_a_bad_egress_proxy_flag_is_one_line_without_the_password(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--cache-dir", str(tmp_path / "c"),
                             "--egress-proxy", f"https://u:{PASSWORD}@proxy:3128"],
                            check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "egress_proxy must be http://" in result.stderr
    assert PASSWORD not in result.stderr and "Traceback" not in result.stderr
