"""An upstream that encodes the body (Content-Encoding) although hubproxy asks for identity: its
bytes are not the archive, so they are refused with a one-line 502 and nothing is cached, whether
the body really is encoded or the header only claims it."""

from __future__ import annotations

import pytest


def _nothing_stored(proxy) -> bool:
    return not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))


def test_hubproxy_asks_every_hop_for_identity(proxy, origin, archives):
    model = origin.register(archives.small)

    assert proxy.get(f"/{model.handle}")[0] == 200

    asked = {r["site"]: r["accept_encoding"] for r in origin.requests()}
    assert asked == {"tfhub": "identity", "kaggle": "identity", "gcs": "identity"}


ENCODINGS = [
    pytest.param({"content_encoding": "gzip"}, id="really-gzip"),
    pytest.param({"content_encoding": "deflate"}, id="really-deflate"),
    pytest.param({"claimed_encoding": "br"}, id="claimed-br"),
    pytest.param({"claimed_encoding": "gzip"}, id="claimed-gzip"),
]


@pytest.mark.parametrize("switches", ENCODINGS)
def test_an_encoded_answer_is_a_502_with_one_line_naming_the_encoding(proxy, origin, archives, switches):
    model = origin.register(archives.small)
    origin.faults(model, **switches)

    status, headers, reason = proxy.get(f"/{model.handle}")

    assert (status, headers["X-Cache"]) == (502, "MISS")
    assert b"Content-Encoding" in reason and reason.count(b"\n") == 1
    assert _nothing_stored(proxy)


@pytest.mark.parametrize("switches", ENCODINGS)
def test_after_an_encoded_answer_the_next_request_fetches_the_archive_afresh(proxy, origin, archives, switches):
    model = origin.register(archives.small)
    origin.faults(model, **switches)
    assert proxy.get(f"/{model.handle}")[0] == 502

    origin.faults(model, **{name: None for name in switches})

    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.small.read_bytes())


def test_an_explicit_identity_encoding_is_accepted(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, claimed_encoding="identity")

    status, headers, body = proxy.get(f"/{model.handle}")

    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.small.read_bytes())
    assert "Content-Encoding" not in headers
