"""The admin API is off without a token, refuses wrong tokens, never logs them, and steers the
live cache; a malformed body is a one-line 4xx that changes nothing (never a 500); a pinned entry
is purged only when asked explicitly; offline mode never contacts upstream."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from tests.conftest import ADMIN_TOKEN as TOKEN
from tests.conftest import http_request

JSON = "application/json"


@pytest.fixture
def two_cached(admin_proxy, origin, tmp_path):
    """Two models fetched through the admin proxy: (their origin Models, their index keys)."""
    models = []
    for name in "ab":
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(b"\x1f\x8b" + os.urandom(50_000))
        models.append(origin.register(path))
    for model in models:
        assert admin_proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    return models, [f"tfhub:/{m.handle}" for m in models]


def _post_bytes(proxy, path, data: bytes, content_type: str = JSON, token: str | None = TOKEN):
    """(status, parsed JSON on 2xx or the reason text otherwise)."""
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(proxy.url + path, data=data, headers=headers, method="POST")
    return _answer(request)


def _answer(request: urllib.request.Request):
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _admin(proxy, path, body=None, token=TOKEN):
    if body is not None:
        return _post_bytes(proxy, path, json.dumps(body).encode(), token=token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _answer(urllib.request.Request(proxy.url + path, headers=headers))


def _listing(proxy) -> dict[str, bool]:
    """Every index entry's key → whether it is pinned."""
    status, entries = _admin(proxy, "/admin/ls")
    assert status == 200
    return {entry["key"]: entry["pinned"] for entry in entries}


def _one_line(reason: str) -> bool:
    return reason.endswith("\n") and reason.count("\n") == 1 and reason.strip() != ""


# -- the door: who may use the API -------------------------------------------------------------

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


# -- what each operation does --------------------------------------------------------------------

def test_evict_to_zero_spares_a_pinned_entry_until_it_is_unpinned(admin_proxy, two_cached):
    models, (a, b) = two_cached
    assert _admin(admin_proxy, "/admin/pin", {"handles": [a]}) == (200, {"pinned": [a]})

    status, result = _admin(admin_proxy, "/admin/evict", {"max_size": "0B"})
    assert (status, result["removed"]) == (200, [b])
    assert _listing(admin_proxy) == {a: True}
    assert admin_proxy.get(f"/{models[1].handle}")[1]["X-Cache"] == "MISS"

    assert _admin(admin_proxy, "/admin/unpin", {"handles": [a]}) == (200, {"unpinned": [a]})
    status, result = _admin(admin_proxy, "/admin/evict", {"max_size": "0B"})
    assert (status, sorted(result["removed"])) == (200, [a, b])


def test_verify_names_and_quarantines_a_corrupted_blob(admin_proxy, two_cached, tmp_path):
    _, (a, _) = two_cached
    original = (tmp_path / "a.tar.gz").read_bytes()
    [blob] = [p for p in (admin_proxy.cache_dir / "blobs").rglob("*") if p.is_file() and p.read_bytes() == original]
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))

    status, result = _admin(admin_proxy, "/admin/verify", {})
    assert status == 200 and [finding["keys"] for finding in result["bad"]] == [[a]]


def test_purge_by_handle_url_removes_that_entry_only(admin_proxy, two_cached):
    models, (a, b) = two_cached
    status, result = _admin(admin_proxy, "/admin/purge", {"handles": [f"https://tfhub.dev/{models[1].handle}"]})
    assert (status, result["removed"]) == (200, [b])
    assert _listing(admin_proxy) == {a: False}


def test_purge_of_a_pinned_entry_needs_include_pinned(admin_proxy, two_cached):
    _, (a, b) = two_cached
    assert _admin(admin_proxy, "/admin/pin", {"handles": [a]})[0] == 200

    status, reason = _admin(admin_proxy, "/admin/purge", {"handles": ["tfhub:/google/*"]})
    assert status == 409 and _one_line(reason)
    assert "1 of the 2" in reason and "include_pinned" in reason
    assert _listing(admin_proxy) == {a: True, b: False}

    status, reason = _admin(admin_proxy, "/admin/purge", {"handles": ["tfhub:/google/*"], "dry_run": True})
    assert status == 409 and "include_pinned" in reason

    status, result = _admin(admin_proxy, "/admin/purge", {"handles": ["tfhub:/google/*"], "include_pinned": True})
    assert (status, result["removed"]) == (200, [a, b])
    assert _listing(admin_proxy) == {}


# -- bad bodies: a one-line 4xx, nothing changed, never a 500 ------------------------------------

def test_a_string_of_handles_is_refused_and_purges_nothing(admin_proxy, two_cached):
    """A string is not a list: iterated, its lone '*' would purge everything, pinned included."""
    _, (a, b) = two_cached
    assert _admin(admin_proxy, "/admin/pin", {"handles": [a]})[0] == 200
    before = _listing(admin_proxy)
    assert before == {a: True, b: False}

    status, reason = _admin(admin_proxy, "/admin/purge", {"handles": "tfhub:/x/*"})
    assert status == 400 and _one_line(reason) and "handles" in reason
    assert _listing(admin_proxy) == before


def test_a_number_for_handles_is_a_400_not_a_500(admin_proxy, origin):
    status, reason = _admin(admin_proxy, "/admin/purge", {"handles": 7})
    assert status == 400 and _one_line(reason) and "handles" in reason
    admin_proxy.stop()
    assert "Traceback" not in admin_proxy.log.read_text()


def _json(body) -> bytes:
    return json.dumps(body).encode()


BAD_BODIES = {
    # name: (endpoint, body bytes, content type, expected status, words the reason must carry)
    "not JSON": ("purge", b"{handles: [", JSON, 400, ["JSON"]),
    "a JSON array": ("purge", _json(["tfhub:/google/x/1"]), JSON, 400, ["JSON object"]),
    "unknown field": ("evict", _json({"max_size": "1G", "nonsense": 1}), JSON, 400, ["nonsense"]),
    "dry_run a string": ("purge", _json({"handles": ["/google/x/1"], "dry_run": "yes"}), JSON, 400, ["dry_run"]),
    "include_pinned a number": ("purge", _json({"handles": ["/google/x/1"], "include_pinned": 1}), JSON, 400,
                                ["include_pinned"]),
    "an empty handle": ("purge", _json({"handles": [""]}), JSON, 400, ["handles[0]"]),
    "a number among handles": ("pin", _json({"handles": ["/google/x/1", 7]}), JSON, 400, ["handles[1]"]),
    "no handles at all": ("unpin", _json({"handles": []}), JSON, 400, ["handles"]),
    "2000 handles": ("purge", _json({"handles": ["/google/x/1"] * 2000}), JSON, 400, ["handles", "1000"]),
    "a 100 KiB body": ("purge", _json({"handles": ["/google/x/1"], "pad": "x" * 100_000}), JSON, 413, ["KiB"]),
    "max_size a number": ("evict", _json({"max_size": 12}), JSON, 400, ["max_size"]),
    "max_size not a size": ("evict", _json({"max_size": "lots"}), JSON, 400, ["max_size"]),
    "older_than not a duration": ("evict", _json({"older_than": "ages"}), JSON, 400, ["older_than"]),
    "evict with two selectors": ("evict", _json({"max_size": "1G", "older_than": "30d"}), JSON, 400,
                                 ["max_size", "older_than"]),
    "evict with no selector": ("evict", _json({"dry_run": True}), JSON, 400, ["max_size"]),
    "a bad handle URL": ("purge", _json({"handles": ["https://tfhub.dev/google"]}), JSON, 400, ["handles[0]"]),
    "a handle with a newline": ("purge", _json({"handles": ["https://tfhub.dev/google/x/1\nX: y"]}), JSON, 400,
                                ["handles[0]"]),
    "a handle that is no key, path or glob": ("purge", _json({"handles": ["google/x/1"]}), JSON, 400,
                                              ["handles[0]"]),
    "a key of no upstream": ("purge", _json({"handles": ["ftp:/google/x/1"]}), JSON, 400, ["handles[0]"]),
    "a field on verify": ("verify", _json({"repair": True}), JSON, 400, ["repair"]),
    "not sent as JSON": ("pin", _json({"handles": ["/google/x/1"]}), "text/plain", 415, ["application/json"]),
    "deeply nested": ("purge", b"[" * 30_000 + b"]" * 30_000, JSON, 400, ["JSON"]),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_a_bad_body_is_a_one_line_4xx_that_changes_nothing(name, admin_proxy, two_cached):
    endpoint, data, content_type, expected, words = BAD_BODIES[name]
    _, (a, _) = two_cached
    assert _admin(admin_proxy, "/admin/pin", {"handles": [a]})[0] == 200
    before = _listing(admin_proxy)

    status, reason = _post_bytes(admin_proxy, f"/admin/{endpoint}", data, content_type)
    assert status == expected, reason
    assert _one_line(reason), reason
    assert all(word in reason for word in words), reason
    assert _listing(admin_proxy) == before
    admin_proxy.stop()
    assert "Traceback" not in admin_proxy.log.read_text()


# -- offline mode --------------------------------------------------------------------------------

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
