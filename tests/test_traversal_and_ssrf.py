"""Hostile requests: traversal, open-proxy use and redirect-based SSRF are refused, with a reason,
before anything is fetched or any file outside the cache is touched."""

from __future__ import annotations

import pytest

from tests.conftest import raw_request


def _get(proxy, target: str, extra_headers: str = "") -> tuple[int, bytes]:
    return raw_request(proxy.url, f"GET {target} HTTP/1.1\r\nHost: mirror\r\n{extra_headers}Connection: close\r\n\r\n".encode())


@pytest.mark.parametrize("target", [
    "/../../../../etc/passwd",
    "/google/../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/google/%2e%2e%2f%2e%2e%2fetc/passwd",
    "/google/x/..%2f..%2f..%2fetc%2fpasswd",
    "/google/x/%252e%252e/1",
    "/google\\..\\..\\etc\\passwd",
    "/tfhub-modules/../../etc/passwd",
])
def test_traversal_is_refused(proxy, origin, target):
    status, body = _get(proxy, target)
    assert status == 400
    assert b"root:" not in body
    assert body.count(b"\n") == 1, "one-line reason"
    assert origin.requests() == []


@pytest.mark.parametrize("target, why", [
    ("//", b"empty handle"),
    ("/google", b"at least a publisher and a model"),
    ("/" + "/".join(["a"] * 17), b"more than 16"),
    ("/google/" + "x" * 600 + "/1", b"longer than"),
    ("/google/<script>/1", b"invalid handle segment"),
    ("/google/x/1?tf-hub-format=uncompressed", b"only tf-hub-format=compressed"),
])
def test_empty_or_absurd_handles_are_refused_with_a_reason(proxy, origin, target, why):
    status, body = _get(proxy, target)
    assert status == 400
    assert why in body
    assert origin.requests() == []


def test_absolute_form_targets_are_refused(proxy, origin):
    status, body = _get(proxy, f"{origin.urls['canary']}/anything")
    assert status == 400 and b"not an open proxy" in body
    assert origin.requests() == []


def test_connect_is_refused(proxy, origin):
    canary = origin.urls["canary"].removeprefix("http://")
    status, _ = raw_request(proxy.url, f"CONNECT {canary} HTTP/1.1\r\nHost: {canary}\r\n\r\n".encode())
    assert 400 <= status < 500
    assert origin.requests() == []


def test_host_header_does_not_choose_the_upstream(proxy, origin):
    canary = origin.urls["canary"].removeprefix("http://")
    raw_request(proxy.url, f"GET /google/host-header-probe/1 HTTP/1.1\r\nHost: {canary}\r\nConnection: close\r\n\r\n".encode())
    assert origin.requests("canary") == []
    assert [r["path"] for r in origin.requests("tfhub")] == ["/google/host-header-probe/1"]


def test_redirect_to_a_host_off_the_allowlist_is_a_502_and_never_followed(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, redirect_to=f"{origin.urls['canary']}/metadata/secrets")

    status, _, reason = proxy.get(f"/{model.handle}")

    assert status == 502 and b"not an allowed host" in reason
    assert origin.requests("canary") == []


def test_oversized_headers_are_refused(proxy, origin):
    status, _ = _get(proxy, "/google/x/1", extra_headers=f"X-Padding: {'a' * 20000}\r\n")
    assert status in (400, 431)
    assert origin.requests() == []


def test_writes_stay_inside_the_cache_dir(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    for target in ("/../escape/1", "/%2e%2e/escape/1", f"/{model.handle}"):
        _get(proxy, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", proxy.log.name])
    assert sorted(p.name for p in proxy.cache_dir.iterdir()) == ["blobs", "flights", "index", "metadata", "tmp"]
