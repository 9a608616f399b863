"""The admin API is off without a token, refuses wrong tokens, never logs them, and steers the
live cache; offline mode never contacts upstream."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from tests.conftest import http_request

TOKEN = "s3cret-admin-token-0123456789"


@pytest.fixture
def admin_proxy(proxy_factory, clean_origin, tmp_path):
    config = tmp_path / "hubproxy.toml"
    config.write_text(f'admin_token = "{TOKEN}"\n')
    return proxy_factory(tmp_path / "cache", "--config", config)


def _admin(proxy, path, body=None, token=TOKEN):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    method = "GET" if body is None else "POST"
    request_body = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(proxy.url + path, data=request_body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_admin_is_absent_without_a_token(proxy):
    status, _, _ = http_request(proxy.url + "/admin/ls", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 404


def test_admin_needs_the_right_token_and_never_logs_it(admin_proxy, origin):
    assert _admin(admin_proxy, "/admin/ls", token=None)[0] == 401
    assert _admin(admin_proxy, "/admin/ls", token="wrong-token-wrong-token")[0] == 401
    status, entries = _admin(admin_proxy, "/admin/ls")
    assert (status, entries) == (200, [])
    admin_proxy.stop()
    assert TOKEN not in admin_proxy.log.read_text()


def test_admin_purge_pin_evict_and_verify(admin_proxy, origin, tmp_path):
    blobs = []
    for name in "ab":
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(b"\x1f\x8b" + os.urandom(50_000))
        blobs.append(origin.register(path))
    for model in blobs:
        assert admin_proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    a, b = (f"tfhub:/{m.handle}" for m in blobs)

    assert _admin(admin_proxy, "/admin/pin", {"handles": [a]}) == (200, {"pinned": [a]})
    status, result = _admin(admin_proxy, "/admin/evict", {"max_size": "0"})
    assert (status, result["removed"]) == (200, [b])
    assert admin_proxy.get(f"/{blobs[1].handle}")[1]["X-Cache"] == "MISS"

    original = (tmp_path / "a.tar.gz").read_bytes()
    [blob] = [p for p in (admin_proxy.cache_dir / "blobs").rglob("*") if p.is_file() and p.read_bytes() == original]
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    status, result = _admin(admin_proxy, "/admin/verify", {})
    assert status == 200 and [finding["keys"] for finding in result["bad"]] == [[a]]

    status, result = _admin(admin_proxy, "/admin/purge", {"handles": [f"https://tfhub.dev/{blobs[1].handle}"]})
    assert (status, result["removed"]) == (200, [b])
    assert _admin(admin_proxy, "/admin/evict", {"nonsense": 1})[0] == 400


def test_offline_mode_serves_hits_and_never_goes_upstream(proxy_factory, clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    online = proxy_factory(tmp_path / "cache")
    assert online.get(f"/{model.handle}")[0] == 200
    online.stop()
    before = len(origin.requests())

    offline = proxy_factory(tmp_path / "cache", "--mode", "offline")

    assert offline.get(f"/{model.handle}")[1]["X-Cache"] == "HIT"
    status, _, reason = offline.get("/google/not-cached/1")
    assert status == 504 and b"tfhub:/google/not-cached/1" in reason and b"offline" in reason
    assert len(origin.requests()) == before
