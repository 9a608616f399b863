"""Signed bundles carry models across an air gap; anything tampered, unsigned or signed by another
key is refused before a single file is published."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest

from tests.conftest import hub_load_offline, loaded_output, run_cli, start_proxy
from tests.test_restart import _dead_upstreams


@pytest.fixture
def exported(proxy, origin, archives, tmp_path):
    """A signed bundle of two models (one with a Kaggle alias) exported from a proxy's cache."""
    small, padded = origin.register(archives.small), origin.register(archives.padded)
    for model in (small, padded):
        assert proxy.get(f"/{model.handle}")[0] == 200
    key = tmp_path / "signing.pem"
    assert run_cli("keys", "generate", "--out", key).returncode == 0
    listing = tmp_path / "models.txt"
    small_handles = [f"https://tfhub.dev/{small.handle}", f"https://www.kaggle.com{small.kaggle_path}"]
    listing.write_text(" ".join(small_handles) + f"\nhttps://tfhub.dev/{padded.handle}\n")
    out = tmp_path / "models.bundle.tar"
    result = run_cli("bundle", "export", "--out", out, "--sign-key", key, "--cache-dir", proxy.cache_dir,
                     "--file", listing)
    assert result.returncode == 0, result.stderr
    return out, key.with_name("signing.pub.pem"), small_handles, f"https://tfhub.dev/{padded.handle}"


def test_generated_private_key_is_0600_and_never_overwritten(tmp_path):
    key = tmp_path / "k.pem"
    assert run_cli("keys", "generate", "--out", key).returncode == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "k.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = run_cli("keys", "generate", "--out", key)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_round_trip_into_tfhub_cache_dir_loads_offline(exported, archives, tmp_path):
    bundle, public, small_handles, padded_handle = exported
    tfdir = tmp_path / "air-gapped-tfhub"

    result = run_cli("bundle", "import", bundle, "--verify-key", public, "--tfhub-dir", tfdir)

    assert result.returncode == 0, result.stderr
    for handle in small_handles:
        assert loaded_output(hub_load_offline(handle, tfdir)) == archives.expected(archives.small)
    assert loaded_output(hub_load_offline(padded_handle, tfdir)) == archives.expected(archives.padded)


def test_round_trip_into_a_fresh_proxy_cache_serves_with_upstream_down(exported, origin, archives, tmp_path):
    bundle, public, small_handles, _ = exported
    cache = tmp_path / "air-gapped-proxy-cache"

    result = run_cli("bundle", "import", bundle, "--verify-key", public, "--cache-dir", cache)
    assert result.returncode == 0, result.stderr

    offline_proxy = start_proxy(origin, cache, upstreams=_dead_upstreams())
    try:
        path = small_handles[0].removeprefix("https://tfhub.dev")
        status, headers, body = offline_proxy.get(path)
        kaggle_status, kaggle_headers, _ = offline_proxy.get(small_handles[1].removeprefix("https://www.kaggle.com"))
    finally:
        offline_proxy.stop()
    assert (status, headers["X-Cache"], body) == (200, "HIT", archives.small.read_bytes())
    assert (kaggle_status, kaggle_headers["X-Cache"]) == (200, "HIT")


def _flip_byte(bundle: Path, member_name: str, offset_in_member: int = 10) -> None:
    with tarfile.open(bundle) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(member_name))
        position = member.offset_data + min(offset_in_member, member.size - 1)
    data = bytearray(bundle.read_bytes())
    data[position] ^= 0x01
    bundle.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, reason", [
    ("archive", "does not match its sha256"),
    ("manifest", "signature does not verify"),
    ("signature", "signature does not verify"),
])
def test_tampered_bundles_are_refused_and_nothing_is_written(exported, tmp_path, tamper, reason):
    bundle, public, _, _ = exported
    _flip_byte(bundle, {"archive": "blobs/", "manifest": "manifest.json", "signature": "manifest.sig"}[tamper])
    tfdir = tmp_path / "air-gapped-tfhub"

    result = run_cli("bundle", "import", bundle, "--verify-key", public, "--tfhub-dir", tfdir)

    assert result.returncode != 0
    assert reason in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not tfdir.exists()


def test_a_bundle_signed_by_another_key_is_refused(exported, tmp_path):
    bundle, _, _, _ = exported
    assert run_cli("keys", "generate", "--out", tmp_path / "other.pem").returncode == 0
    tfdir = tmp_path / "air-gapped-tfhub"
    result = run_cli("bundle", "import", bundle, "--verify-key", tmp_path / "other.pub.pem", "--tfhub-dir", tfdir)
    assert result.returncode != 0 and "signature does not verify" in result.stderr
    assert not tfdir.exists()


def test_unsigned_bundles_need_explicit_consent(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[0] == 200
    bundle = tmp_path / "unsigned.tar"
    handle = f"https://tfhub.dev/{model.handle}"
    assert run_cli("bundle", "export", "--out", bundle, "--cache-dir", proxy.cache_dir, handle).returncode == 0
    _, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    assert run_cli("keys", "generate", "--out", tmp_path / "k.pem").returncode == 0
    tfdir = tmp_path / "tfhub"

    refused = run_cli("bundle", "import", bundle, "--verify-key", public, "--tfhub-dir", tfdir)
    assert refused.returncode != 0 and "unsigned" in refused.stderr
    assert not tfdir.exists()

    accepted = run_cli("bundle", "import", bundle, "--allow-unsigned", "--tfhub-dir", tfdir)
    assert accepted.returncode == 0, accepted.stderr
    assert loaded_output(hub_load_offline(handle, tfdir)) == archives.expected(archives.small)


def test_a_bundle_missing_a_listed_archive_is_refused(exported, tmp_path):
    bundle, public, _, _ = exported
    partial = tmp_path / "partial.tar"
    with tarfile.open(bundle) as source, tarfile.open(partial, "w") as target:
        blobs = [m for m in source.getmembers() if m.name.startswith("blobs/")]
        for member in source.getmembers():
            if member is not blobs[-1]:  # the signed manifest still lists it
                target.addfile(member, source.extractfile(member))
    tfdir = tmp_path / "air-gapped-tfhub"

    result = run_cli("bundle", "import", partial, "--verify-key", public, "--tfhub-dir", tfdir)

    assert result.returncode != 0 and "missing from the bundle" in result.stderr
    assert not tfdir.exists()
