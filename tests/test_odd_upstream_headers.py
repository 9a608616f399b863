"""An origin's Content-Type that is no valid media type (bytes that aren't latin-1, such as
`name=☃` sent as raw UTF-8) must not reach a client: hubproxy keeps a valid `type/subtype; k=v`
as the origin sent it and answers application/octet-stream otherwise, at fetch time, and also at
serve time for entries an older version stored with such a value. Each request is answered, also
when pipelined behind a good one, and after a restart."""

from __future__ import annotations

import http.client
import socket

import pytest

from hubproxy.cache.store import Store

SNOWMAN = "application/x-tar; name=☃"
OCTET_STREAM = "application/octet-stream"


def _pipelined_heads(proxy, *paths: str) -> list[tuple[int, str | None]]:
    """HEADs of paths sent at once on one connection: (status, Content-Type) of each answer."""
    host, port = proxy.url.removeprefix("http://").split(":")
    heads = b"".join(f"HEAD /{path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode() for path in paths)
    answers = []
    with socket.create_connection((host, int(port)), timeout=60) as sock, sock.makefile("rb") as stream:
        sock.sendall(heads)
        for _ in paths:  # one reader for all: each answer is a status line and headers, no body
            status_line = stream.readline()
            assert status_line, f"the connection closed after {len(answers)} answers"
            headers = http.client.parse_headers(stream)
            answers.append((int(status_line.split()[1]), headers.get("Content-Type")))
    return answers


@pytest.mark.parametrize("odd", [SNOWMAN, "application/x-tar; name=\ufffd", "not a media type", "text/ plain"])
def test_an_odd_content_type_is_sent_as_octet_stream_on_the_miss_and_the_hits(proxy, origin, archives, odd):
    model = origin.register(archives.small)
    origin.faults(model, content_type=odd)

    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["Content-Type"], body) == (200, OCTET_STREAM, archives.small.read_bytes())

    good = origin.register(archives.small)
    assert proxy.get(f"/{good.handle}")[0] == 200
    assert _pipelined_heads(proxy, good.handle, model.handle, good.handle) == [(200, OCTET_STREAM)] * 3


def test_an_odd_content_type_stays_harmless_after_a_restart(proxy_factory, clean_origin, archives, tmp_path):
    model = clean_origin.register(archives.small)
    clean_origin.faults(model, content_type=SNOWMAN)
    first = proxy_factory(tmp_path / "cache")
    assert first.get(f"/{model.handle}")[0] == 200
    first.stop()

    again = proxy_factory(tmp_path / "cache")

    assert _pipelined_heads(again, model.handle, model.handle) == [(200, OCTET_STREAM)] * 2


@pytest.mark.parametrize("stored", [SNOWMAN, "application/x-tar; name=\udce2\udc98\udc83", "x\r\nSet-Cookie: a=b"])
def test_an_entry_stored_by_an_older_version_with_an_odd_content_type_is_served_as_octet_stream(
        proxy_factory, clean_origin, archives, tmp_path, stored):
    model = clean_origin.register(archives.small)
    first = proxy_factory(tmp_path / "cache")
    assert first.get(f"/{model.handle}")[0] == 200
    first.stop()
    store = Store(tmp_path / "cache")
    [entry] = store.entries()
    store.add_key(entry.key, entry.sha256, entry.size, etag=entry.etag, content_type=stored, source=entry.source)
    store.close()

    again = proxy_factory(tmp_path / "cache")

    assert _pipelined_heads(again, model.handle, model.handle) == [(200, OCTET_STREAM)] * 2
    status, headers, body = again.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], headers["Content-Type"], body) == (200, "HIT", OCTET_STREAM,
                                                                             archives.small.read_bytes())


@pytest.mark.parametrize("valid", ["application/gzip", 'application/x-tar; charset="binary"; x-v=1.0'])
def test_a_valid_content_type_with_parameters_is_kept(proxy, origin, archives, valid):
    model = origin.register(archives.small)
    origin.faults(model, content_type=valid)

    miss = proxy.get(f"/{model.handle}")[1]["Content-Type"]
    hit = proxy.get(f"/{model.handle}")[1]["Content-Type"]

    assert miss == hit == valid
