"""Checks of the origin emulator (tests/origin.py) run as a real process on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import pytest

ORIGIN = Path(__file__).with_name("origin.py")


# ---------------------------------------------------------------- harness


def start_origin(ports_file: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, str(ORIGIN), "--ports-file", str(ports_file), *extra])
    for _ in range(200):  # up to ~10 s
        if ports_file.exists():
            return proc, json.loads(ports_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"origin exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("origin did not write its ports file")


def stop_origin(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    proc, urls = start_origin(tmp_path_factory.mktemp("origin") / "ports.json", "--signing-secret", "s3cret")
    yield urls
    stop_origin(proc)


@pytest.fixture(autouse=True)
def clean_origin(urls):
    control(urls, "POST", "reset", {})
    yield


def control(urls: dict, method: str, name: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{urls['tfhub']}/_control/{name}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def raw(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request without following redirects."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def make_archive(path: Path, payload_size: int = 300_000) -> bytes:
    """A tar.gz of random (incompressible) bytes, larger than one 256 KiB chunk."""
    payload = os.urandom(payload_size)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("saved_model.pb")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path.read_bytes()


class Registered:
    def __init__(self, urls: dict, tmp_path: Path, name: str, bucket: str = "kaggle-models-data/1234"):
        self.urls = urls
        self.data = make_archive(tmp_path / f"{name}.tar.gz")
        self.handle = f"google/{name}/classifier/1"
        self.object = f"{bucket}/{name}.tar.gz"
        self.info = control(urls, "POST", "models", {
            "handle": self.handle, "owner": "google", "model": name, "framework": "tensorFlow2",
            "variation": "classifier", "version": "1", "object": self.object,
            "file": str(tmp_path / f"{name}.tar.gz"),
        })

    @property
    def tfhub_url(self) -> str:
        return f"{self.urls['tfhub']}/{self.handle}?tf-hub-format=compressed"

    @property
    def download_url(self) -> str:
        return f"{self.urls['kaggle']}/api/v1/models/google/{self.handle.split('/')[1]}/tensorFlow2/classifier/1/download"

    def signed_url(self) -> str:
        status, headers, _ = raw(self.download_url)
        assert status == 302
        return headers["Location"]

    def faults(self, **switches) -> None:
        control(self.urls, "POST", "faults", {"object": self.object, **switches})


@pytest.fixture
def model(urls, tmp_path, request):
    return Registered(urls, tmp_path, request.node.name.replace("_", "-").lower()[:40])


def requests_log(urls: dict) -> list[tuple]:
    return [(r["site"], r["method"], r["path"], r["status"]) for r in control(urls, "GET", "requests")["requests"]]


# ---------------------------------------------------------------- the chain


def test_redirect_chain_yields_exact_bytes_and_is_logged(urls, model):
    with urllib.request.urlopen(model.tfhub_url, timeout=10) as resp:
        assert resp.read() == model.data
        assert resp.geturl().startswith(f"{urls['gcs']}/{model.object}?X-Goog-Algorithm=GOOG4-HMAC-SHA256")
    download_path = urllib.parse.urlsplit(model.download_url).path
    assert requests_log(urls) == [
        ("tfhub", "GET", f"/{model.handle}", 302),
        ("kaggle", "GET", download_path, 302),
        ("gcs", "GET", f"/{model.object}", 200),
    ]


def test_tfhub_page_and_unknown_handle(urls, model):
    status, headers, body = raw(f"{urls['tfhub']}/{model.handle}")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    status, _, body = raw(f"{urls['tfhub']}/nobody/nothing/1?tf-hub-format=compressed")
    assert (status, body) == (404, b"Not found")


def test_kaggle_model_page_redirects_to_download(urls, model):
    name = model.handle.split("/")[1]
    url = f"{urls['kaggle']}/models/google/{name}/frameworks/tensorFlow2/variations/classifier/versions/1"
    status, headers, _ = raw(url + "?tf-hub-format=compressed")
    assert status == 302 and headers["Location"] == model.download_url
    assert raw(url.replace(name, "missing"))[0] == 404


def test_object_headers_carry_hashes(model):
    google_crc32c = pytest.importorskip("google_crc32c")
    md5 = hashlib.md5(model.data)
    crc = base64.b64encode(google_crc32c.value(model.data).to_bytes(4, "big")).decode()
    assert {k: model.info[k] for k in ("md5", "crc32c", "size")} == {"md5": md5.hexdigest(), "crc32c": crc,
                                                                     "size": len(model.data)}
    status, headers, body = raw(model.signed_url(), "HEAD")
    assert status == 200 and body == b""
    assert headers["x-goog-hash"] == f"crc32c={crc},md5={base64.b64encode(md5.digest()).decode()}"
    assert headers["ETag"] == f'"{md5.hexdigest()}"'
    assert headers["Content-Length"] == str(len(model.data))
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Accept-Ranges"] == "bytes" and headers["Last-Modified"]


# ---------------------------------------------------------------- GCS access rules


def test_bad_signature_is_403(model):
    url = model.signed_url()
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    status, _, body = raw(tampered)
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body


def test_signature_expires_with_emulator_clock(urls, model):
    url = model.signed_url()
    assert raw(url, "HEAD")[0] == 200
    control(urls, "POST", "advance_clock", {"seconds": 601})
    status, _, body = raw(url)
    assert status == 400 and b"<Code>ExpiredToken</Code>" in body
    assert fetch(model.tfhub_url) == model.data  # a fresh URL is signed on the moved clock


def test_unsigned_access_only_for_public_bucket(urls, tmp_path, model):
    assert raw(f"{urls['gcs']}/{model.object}")[0] == 403
    public = Registered(urls, tmp_path, "public", bucket="tfhub-modules/google/public/1")
    assert fetch(f"{urls['gcs']}/{public.object}") == public.data
    status, _, body = raw(f"{urls['gcs']}/tfhub-modules/none.tar.gz")
    assert status == 404 and b"<Code>NoSuchKey</Code>" in body


def test_ranges(model):
    url, data, size = model.signed_url(), model.data, len(model.data)
    cases = {"bytes=10-19": (10, 20), "bytes=1000-": (1000, size), "bytes=-7": (size - 7, size)}
    for header, (start, stop) in cases.items():
        status, headers, body = raw(url, headers={"Range": header})
        assert status == 206 and body == data[start:stop]
        assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
    status, headers, _ = raw(url, headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"


# ---------------------------------------------------------------- faults


def test_truncate_at_cuts_the_body(model):
    model.faults(truncate_at=1000)
    with pytest.raises(http.client.IncompleteRead) as caught:
        fetch(model.tfhub_url)
    assert caught.value.partial == model.data[:1000]


def test_corrupt_at_flips_exactly_one_byte(model):
    model.faults(corrupt_at=5)
    body = fetch(model.tfhub_url)
    assert len(body) == len(model.data)
    diffs = [i for i, (a, b) in enumerate(zip(body, model.data)) if a != b]
    assert diffs == [5] and body[5] == model.data[5] ^ 0xFF


def test_status_fault_counts_down(model):
    model.faults(status=503, status_count=2)
    url = model.signed_url()
    assert [raw(url)[0] for _ in range(3)] == [503, 503, 200]


def test_hold_after_waits_for_release(urls, model):
    model.faults(hold_after=4096)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("body", fetch(model.tfhub_url)))
    reader.start()
    assert control(urls, "GET", "wait_held?count=1&timeout=10")["held"] == 1
    assert reader.is_alive()
    control(urls, "POST", "release", {})
    reader.join(timeout=10)
    assert result["body"] == model.data


def test_throttle_slows_the_body(model):
    model.faults(throttle_bps=400_000)
    started = time.monotonic()
    status, _, body = raw(model.signed_url(), headers={"Range": "bytes=-100000"})
    assert status == 206 and len(body) == 100_000
    assert time.monotonic() - started >= 0.2


def test_html_and_down_faults(model):
    url = model.signed_url()
    model.faults(html=True)
    status, headers, body = raw(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and body.startswith(b"<")
    model.faults(html=None, down=True)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        raw(url)


def test_cut_once_at_cuts_one_request_and_a_resume_succeeds(model):
    model.faults(cut_once_at=1000)
    url = model.signed_url()
    with pytest.raises(http.client.IncompleteRead) as caught:
        fetch(url)
    assert caught.value.partial == model.data[:1000]
    status, _, body = raw(url, headers={"Range": "bytes=1000-", "If-Match": f'"{model.info["md5"]}"'})
    assert (status, body) == (206, model.data[1000:])
    assert fetch(url) == model.data  # used up


def test_cut_every_cuts_each_request_after_its_own_bytes(model):
    model.faults(cut_every=1000)
    url = model.signed_url()
    for start in (0, 1000, 2000):
        with pytest.raises(http.client.IncompleteRead) as caught:
            raw(url, headers={"Range": f"bytes={start}-"})
        assert caught.value.partial == model.data[start:start + 1000]


def test_replaced_object_has_a_new_etag_and_fails_the_old_if_match(urls, model):
    url = model.signed_url()
    old_etag = raw(url, "HEAD")[1]["ETag"]
    model.faults(replaced=True)
    status, headers, _ = raw(url, "HEAD")
    assert status == 200 and headers["ETag"] != old_etag
    status, _, body = raw(url, headers={"Range": "bytes=10-", "If-Match": old_etag})
    assert status == 412 and b"<Code>PreconditionFailed</Code>" in body
    assert raw(url, headers={"Range": "bytes=10-", "If-Match": headers["ETag"]})[0] == 206
    logged = control(urls, "GET", "requests")["requests"]
    assert [r["if_match"] for r in logged if r["status"] == 412] == [old_etag]


def test_ignore_if_match_answers_a_stale_if_match_206_under_the_new_etag(model):
    url = model.signed_url()
    old_etag = raw(url, "HEAD")[1]["ETag"]
    model.faults(replaced=True, ignore_if_match=True)

    status, headers, body = raw(url, headers={"Range": "bytes=10-", "If-Match": old_etag})

    assert (status, body) == (206, model.data[10:])
    assert headers["ETag"] not in (None, old_etag)


def test_hold_headers_sends_nothing_until_released(urls, model):
    model.faults(hold_headers=True)
    url, result = model.signed_url(), {}
    reader = threading.Thread(target=lambda: result.setdefault("answer", raw(url)))
    reader.start()
    assert control(urls, "GET", "wait_held?count=1&timeout=10")["held"] == 1
    assert "answer" not in result
    control(urls, "POST", "release", {})
    reader.join(timeout=10)
    assert result["answer"][0] == 200 and result["answer"][2] == model.data


def test_redirect_to_canary_is_logged(urls, model):
    model.faults(redirect_to=f"{urls['canary']}/metadata")
    assert fetch(model.tfhub_url) == b"canary"
    assert ("canary", "GET", "/metadata", 200) in requests_log(urls)
    assert not any(site == "gcs" for site, *_ in requests_log(urls))


@pytest.mark.parametrize("encoding, wbits", [("gzip", 16 + zlib.MAX_WBITS), ("deflate", zlib.MAX_WBITS)])
def test_content_encoding_really_encodes_the_body_with_matching_length_and_hashes(model, encoding, wbits):
    model.faults(content_encoding=encoding)
    status, headers, body = raw(model.signed_url())
    assert (status, headers["Content-Encoding"], int(headers["Content-Length"])) == (200, encoding, len(body))
    assert zlib.decompress(body, wbits=wbits) == model.data
    assert f"md5={base64.b64encode(hashlib.md5(body).digest()).decode()}" in headers["x-goog-hash"]


def test_claimed_encoding_only_adds_the_header(model):
    model.faults(claimed_encoding="br")
    status, headers, body = raw(model.signed_url())
    assert (status, headers["Content-Encoding"], body) == (200, "br", model.data)


def test_content_type_is_sent_as_raw_utf8_bytes(model):
    model.faults(content_type="application/x-tar; name=\u2603")
    status, headers, _ = raw(model.signed_url())
    assert status == 200
    assert headers["Content-Type"].encode("latin-1") == "application/x-tar; name=\u2603".encode()


def test_no_checksum_drops_x_goog_hash_and_etag(model):
    model.faults(no_checksum=True)
    status, headers, body = raw(model.signed_url())
    assert (status, body, int(headers["Content-Length"])) == (200, model.data, len(model.data))
    assert "x-goog-hash" not in headers and "ETag" not in headers


def test_redirect_to_is_sent_verbatim(model):
    crafted = "http://127.0.0.2:1\\@127.0.0.1:2/x"
    model.faults(redirect_to=crafted)
    status, headers, _ = raw(model.download_url)
    assert (status, headers["Location"]) == (302, crafted)


def test_reset_clears_faults_and_log(urls, model):
    model.faults(status=500)
    assert raw(model.signed_url())[0] == 500
    control(urls, "POST", "reset", {})
    assert requests_log(urls) == []
    assert fetch(model.tfhub_url) == model.data


def test_sigterm_stops_cleanly(tmp_path):
    proc, urls = start_origin(tmp_path / "ports.json")
    assert set(urls) == {"tfhub", "kaggle", "kaggle-api", "gcs", "canary"}
    assert all(u.startswith("http://127.0.0.1:") for u in urls.values())
    assert stop_origin(proc) == 0
