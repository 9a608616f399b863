"""Upstream errors become clear client errors; transient ones are retried; nothing bad is cached."""

from __future__ import annotations

import pytest


def test_unknown_model_is_a_404_with_the_upstream_reason(proxy):
    status, headers, reason = proxy.get("/google/no-such-model/1")
    assert (status, headers["X-Cache"]) == (404, "MISS")
    assert b"not found upstream" in reason


@pytest.mark.parametrize("code", [429, 500, 503])
def test_transient_errors_are_retried(proxy, origin, archives, code):
    model = origin.register(archives.small)
    origin.faults(model, status=code, status_count=2)

    status, headers, body = proxy.get(f"/{model.handle}")

    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert body == archives.small.read_bytes()
    assert origin.object_gets(model) == 3


def test_persistent_5xx_gives_502_after_bounded_retries(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, status=503)

    status, _, reason = proxy.get(f"/{model.handle}")

    assert status == 502
    assert b"503" in reason and b"after 4 attempts" in reason
    assert origin.object_gets(model) == 4


def test_persistent_5xx_stores_nothing(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, status=503)

    assert proxy.get(f"/{model.handle}")[0] == 502

    assert not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))


def test_dropped_connections_give_502_with_a_clear_message(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, down=True)
    status, _, reason = proxy.get(f"/{model.handle}")
    assert status == 502
    assert b"upstream" in reason


def test_html_instead_of_an_archive_is_refused(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, html=True)

    status, _, reason = proxy.get(f"/{model.handle}")

    assert status == 502 and b"HTML" in reason


def test_html_instead_of_an_archive_is_never_cached(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, html=True)
    assert proxy.get(f"/{model.handle}")[0] == 502

    origin.faults(model, html=None)

    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.small.read_bytes())


def test_denied_signed_url_is_a_502_naming_the_refusal(proxy, origin, archives):
    model = origin.register(archives.small)
    origin.faults(model, status=403)
    status, _, reason = proxy.get(f"/{model.handle}")
    assert status == 502 and b"refused: 403" in reason
    assert b"X-Goog-Signature" not in reason, "signed URLs must not leak into messages"
