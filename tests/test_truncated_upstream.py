"""An upstream transfer cut short must never reach tensorflow_hub as a complete archive.

The hazard is real: tensorflow_hub reads with urllib (no error on a body shorter than its
Content-Length) and ends tar extraction quietly at a member boundary, then trusts the directory for
ever. The first test shows that against the origin directly; the rest show hubproxy stops it.
"""

from __future__ import annotations

import pytest

from tests.conftest import (compressed_offset_of_member, download_fails, hub_load, loaded_output, model_dirs,
                            raw_request)


def test_premise_direct_download_cut_at_member_boundary_is_silently_accepted(clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.padded)
    origin.faults(model, truncate_at=compressed_offset_of_member(archives.padded, "assets/pad-b.bin"))

    result = hub_load(f"{origin.urls['tfhub']}/{model.handle}", tmp_path / "tfhub")

    assert loaded_output(result) == archives.expected(archives.padded)  # "success"...
    [cached] = model_dirs(tmp_path / "tfhub")
    assert not (cached / "assets" / "pad-b.bin").exists()  # ...with a file missing, cached for ever


CUTS = ["member-boundary", "early", "tiny-archive"]


def _cut_model(origin, archives, where: str):
    """A model whose upstream transfer is cut at `where`: (model, its archive)."""
    archive = archives.small if where == "tiny-archive" else archives.padded
    model = origin.register(archive)
    cut = {"member-boundary": lambda: compressed_offset_of_member(archive, "assets/pad-b.bin"),
           "early": lambda: 100_000,
           "tiny-archive": lambda: archive.stat().st_size - 100}[where]()
    origin.faults(model, truncate_at=cut)
    return model, archive


@pytest.mark.parametrize("where", CUTS)
def test_cut_upstream_makes_the_client_fail_and_caches_nothing(proxy, origin, archives, tmp_path, where):
    model, _ = _cut_model(origin, archives, where)

    failed = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert failed.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))
    assert not any((proxy.cache_dir / "tmp").iterdir())


@pytest.mark.parametrize("where", CUTS)
def test_after_a_cut_upstream_the_next_request_fetches_afresh(proxy, origin, archives, tmp_path, where):
    model, archive = _cut_model(origin, archives, where)
    download_fails(proxy, model)

    origin.faults(model, truncate_at=None)
    healed = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert loaded_output(healed) == archives.expected(archive)
    whole = [g for g in origin.storage_gets(model) if g["range"] is None]  # the cut one's resumes asked ranges
    assert len(whole) == 2, "the next request must fetch afresh"


def test_http10_client_gets_a_verified_archive_with_its_length(proxy, origin, archives):
    """HTTP/1.0 has no chunked encoding, so a cut could not be signalled: such clients wait for
    the verified archive and get it with a Content-Length, or get an error status."""
    good = origin.register(archives.padded)

    status, body = raw_request(proxy.url, f"GET /{good.handle} HTTP/1.0\r\n\r\n".encode())

    assert (status, body) == (200, archives.padded.read_bytes())


def test_http10_client_of_a_cut_upstream_gets_an_error_status(proxy, origin, archives):
    bad = origin.register(archives.padded)
    origin.faults(bad, truncate_at=compressed_offset_of_member(archives.padded, "assets/pad-b.bin"))

    status, body = raw_request(proxy.url, f"GET /{bad.handle} HTTP/1.0\r\n\r\n".encode())

    assert status == 502 and b"upstream" in body
