"""Cached archives are served from disk with the HTTP semantics download tools rely on."""

from __future__ import annotations

import base64
import hashlib

import pytest

from tests.conftest import raw_exchange


@pytest.fixture
def cached(proxy, origin, archives):
    model = origin.register(archives.padded)
    path = f"/{model.handle}?tf-hub-format=compressed"
    status, headers, _ = proxy.get(path)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    body = archives.padded.read_bytes()
    return proxy, path, body, hashlib.sha256(body).hexdigest()


def test_hit_carries_length_etag_digest_and_ranges(cached, origin):
    proxy, path, body, sha256 = cached
    requests_before = len(origin.requests())

    status, headers, received = proxy.get(path)

    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert received == body
    assert headers["Content-Length"] == str(len(body))
    assert headers["ETag"] == f'"{sha256}"'
    assert headers["Repr-Digest"] == "sha-256=:" + base64.b64encode(bytes.fromhex(sha256)).decode() + ":"
    assert headers["Accept-Ranges"] == "bytes"
    assert len(origin.requests()) == requests_before


def test_head_on_hit_sends_headers_only(cached):
    proxy, path, body, sha256 = cached
    status, headers, received = proxy.get(path, method="HEAD")
    assert (status, received) == (200, b"")
    assert headers["Content-Length"] == str(len(body))
    assert headers["ETag"] == f'"{sha256}"'


@pytest.mark.parametrize("spec, start, end", [("bytes=0-99", 0, 100), ("bytes=1000-", 1000, None),
                                              ("bytes=-500", -500, None)])
def test_single_range_gives_206(cached, spec, start, end):
    proxy, path, body, _ = cached
    status, headers, received = proxy.get(path, headers={"Range": spec})
    assert status == 206
    assert received == body[start:end]
    assert headers["Content-Range"].endswith(f"/{len(body)}")


def test_unsatisfiable_range_gives_416(cached):
    proxy, path, body, _ = cached
    status, headers, _ = proxy.get(path, headers={"Range": f"bytes={len(body) + 10}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(body)}"


@pytest.mark.parametrize("spec", ["Bytes=0-9", "BYTES=0-9"])
def test_range_unit_is_case_insensitive(cached, spec):
    proxy, path, body, _ = cached
    status, headers, received = proxy.get(path, headers={"Range": spec})
    assert (status, received) == (206, body[:10])
    assert headers["Content-Range"] == f"bytes 0-9/{len(body)}"


@pytest.mark.parametrize("spec", ["bytes=0-1,5-9", "bytes=0-1, 3-4", "items=0-1"])
def test_several_ranges_or_another_unit_get_the_whole_archive(cached, spec):
    """RFC 9110 lets a server ignore a Range it won't satisfy as asked; refusing it would break a
    client that only asked for more than it needed."""
    proxy, path, body, sha256 = cached
    status, headers, received = proxy.get(path, headers={"Range": spec})
    assert (status, received) == (200, body)
    assert headers["ETag"] == f'"{sha256}"'


def test_empty_suffix_range_is_unsatisfiable(cached):
    proxy, path, body, _ = cached
    status, headers, _ = proxy.get(path, headers={"Range": "bytes=-0"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(body)}"


@pytest.mark.parametrize("spec", ["bytes=abc", "bytes=9-3", "bytes=-", "bytes=1-2-3", "bytes = 0-9"])
def test_malformed_range_is_refused_with_a_reason(cached, spec):
    proxy, path, _, _ = cached
    status, _, reason = proxy.get(path, headers={"Range": spec})
    assert status == 400
    assert b"Range" in reason or b"range" in reason
    assert reason.count(b"\n") == 1


def test_if_none_match_with_the_sha256_gives_304(cached):
    proxy, path, _, sha256 = cached
    status, headers, received = proxy.get(path, headers={"If-None-Match": f'"{sha256}"'})
    assert (status, received) == (304, b"")
    assert headers["ETag"] == f'"{sha256}"'
    status, _, _ = proxy.get(path, headers={"If-None-Match": '"something-else"'})
    assert status == 200


@pytest.mark.parametrize("if_range", ["W/\"{sha256}\"", "{sha256}", "Sat, 01 Jan 2000 00:00:00 GMT", "{last_modified}"])
def test_if_range_without_a_strong_match_gives_the_whole_archive(cached, if_range):
    """A weak tag, an unquoted one or a date is no proof that the client's partial copy is of these bytes."""
    proxy, path, body, sha256 = cached
    _, hit, _ = proxy.get(path, method="HEAD")
    value = if_range.format(sha256=sha256, last_modified=hit["Last-Modified"])
    status, _, received = proxy.get(path, headers={"Range": "bytes=0-9", "If-Range": value})
    assert (status, received) == (200, body)


def test_head_carries_the_same_validators_as_get(cached):
    proxy, path, body, sha256 = cached
    _, got, _ = proxy.get(path)
    _, head, _ = proxy.get(path, method="HEAD")
    for name in ("ETag", "Last-Modified", "Content-Length", "Content-Type", "Accept-Ranges", "Repr-Digest",
                 "Cache-Control"):
        assert head[name] is not None and head[name] == got[name], name


@pytest.mark.parametrize("request_headers, status", [({}, 200), ({"Range": "bytes=0-9"}, 206),
                                                     ({"If-None-Match": "*"}, 304)])
def test_etag_has_one_spelling_whatever_the_answer(cached, request_headers, status):
    proxy, path, _, sha256 = cached
    for method in ("GET", "HEAD"):
        answered, headers, _ = proxy.get(path, headers=request_headers, method=method)
        assert (answered, headers.get_all("ETag")) == (status, [f'"{sha256}"']), method


def test_if_range_with_a_stale_etag_gives_the_whole_archive(cached):
    proxy, path, body, sha256 = cached
    status, _, received = proxy.get(path, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (status, received) == (200, body)
    status, _, received = proxy.get(path, headers={"Range": "bytes=0-9", "If-Range": f'"{sha256}"'})
    assert (status, received) == (206, body[:10])


def test_responses_do_not_announce_the_server_software(cached):
    proxy, path, _, _ = cached
    answers = [proxy.get(path), proxy.get(path, method="HEAD"), proxy.get("/%2e%2e/x"),
               proxy.get(path, method="DELETE"), proxy.get("/healthz")]
    for status, headers, body in answers:
        assert "python" not in (headers["Server"] or "").lower() and "aiohttp" not in (headers["Server"] or ""), status
        assert b"aiohttp" not in body and b"Python" not in body
    status, raw = raw_exchange(proxy.url, b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    assert status == 400 and b"aiohttp" not in raw and b"Python/" not in raw


def test_head_on_a_miss_asks_upstream_without_downloading(proxy, origin, archives):
    model = origin.register(archives.padded)

    status, headers, body = proxy.get(f"/{model.handle}", method="HEAD")

    assert (status, headers["X-Cache"], body) == (200, "MISS", b"")
    assert headers["Content-Length"] == str(archives.padded.stat().st_size)
    assert origin.object_gets(model) == 0
    assert not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))
