"""Bytes that don't match the origin's own x-goog-hash must never reach a client as a clean response."""

from __future__ import annotations

import http.client

import pytest

from tests.conftest import download_fails, hub_load, loaded_output, model_dirs


def test_premise_direct_download_with_a_flipped_byte_is_silently_accepted(clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.padded)
    origin.faults(model, corrupt_at=archives.padded.stat().st_size - 200_000)

    result = hub_load(f"{origin.urls['tfhub']}/{model.handle}", tmp_path / "tfhub")

    assert loaded_output(result) == archives.expected(archives.padded)
    assert len(model_dirs(tmp_path / "tfhub")) == 1  # a corrupt model, trusted for ever


def _corrupt_model(origin, archives):
    model = origin.register(archives.padded)
    origin.faults(model, corrupt_at=archives.padded.stat().st_size - 200_000)
    return model


def test_corrupt_upstream_makes_the_client_fail_and_caches_nothing(proxy, origin, archives, tmp_path):
    model = _corrupt_model(origin, archives)

    failed = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert failed.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))


def test_after_a_corrupt_upstream_the_next_request_fetches_afresh(proxy, origin, archives, tmp_path):
    model = _corrupt_model(origin, archives)
    download_fails(proxy, model)

    origin.faults(model, corrupt_at=None)

    assert loaded_output(hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")) == \
        archives.expected(archives.padded)
    assert origin.object_gets(model) == 2


def test_no_client_gets_the_archive_tail_before_it_is_verified(proxy, origin, archives):
    model = origin.register(archives.padded)
    size = archives.padded.stat().st_size
    origin.faults(model, corrupt_at=size - 200_000)

    connection = http.client.HTTPConnection(proxy.url.removeprefix("http://"), timeout=120)
    connection.request("GET", f"/{model.handle}?tf-hub-format=compressed")
    response = connection.getresponse()
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()

    # The README promises the last MiB waits for verification.
    assert len(cut.value.partial) <= size - 1024 * 1024
