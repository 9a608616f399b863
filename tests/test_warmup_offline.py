"""Warmed TFHUB_CACHE_DIRs let the unchanged real tensorflow_hub load models with no hub at all."""

from __future__ import annotations

import tarfile

import pytest

from tests.conftest import hub_load_offline, loaded_output, run_cli, start_proxy
from tests.origin_control import start_origin, stop_process


@pytest.fixture
def own_origin(tmp_path):
    """An origin this test may stop, to prove the loads are offline."""
    origin, process = start_origin(tmp_path / "origin-ports.json")
    yield origin, process
    stop_process(process)


def _no_leftovers(tfdir):
    return [p.name for p in tfdir.iterdir() if p.name.endswith((".tmp", ".lock", ".part")) or p.name.startswith(".")]


def test_warmed_handles_and_aliases_load_offline(own_origin, archives, tmp_path):
    origin, origin_process = own_origin
    small, padded = origin.register(archives.small), origin.register(archives.padded)
    tfdir = tmp_path / "tfhub"
    proxy = start_proxy(origin, tmp_path / "proxy-cache")
    canonical = f"https://tfhub.dev/{small.handle}"
    kaggle = f"https://www.kaggle.com{small.kaggle_path}"
    mirror = f"{proxy.url}/{small.handle}"
    other = f"https://tfhub.dev/{padded.handle}"
    try:
        warmed = run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, canonical, "--alias", kaggle,
                         "--alias", mirror)
        assert warmed.returncode == 0, warmed.stderr
        warmed = run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, other)
        assert warmed.returncode == 0, warmed.stderr
        assert origin.object_gets(small) == 1, "one archive download serves every alias"
    finally:
        proxy.stop()
        stop_process(origin_process)

    for handle, archive in [(canonical, archives.small), (kaggle, archives.small), (mirror, archives.small),
                            (other, archives.padded)]:
        assert loaded_output(hub_load_offline(handle, tfdir)) == archives.expected(archive)
    assert _no_leftovers(tfdir) == []
    missing = hub_load_offline("https://tfhub.dev/google/never-warmed/1", tfdir)
    assert missing.returncode != 0, "the offline harness must really be offline"


def test_warmup_from_a_proxy_cache_needs_no_network(own_origin, archives, tmp_path):
    origin, origin_process = own_origin
    model = origin.register(archives.small)
    proxy = start_proxy(origin, tmp_path / "proxy-cache")
    status, _, _ = proxy.get(f"/{model.handle}")
    assert status == 200
    proxy.stop()
    stop_process(origin_process)

    handle = f"https://tfhub.dev/{model.handle}"
    warmed = run_cli("warmup", "--tfhub-dir", tmp_path / "tfhub", "--cache-dir", tmp_path / "proxy-cache", handle)

    assert warmed.returncode == 0, warmed.stderr
    assert loaded_output(hub_load_offline(handle, tmp_path / "tfhub")) == archives.expected(archives.small)


def test_warmup_straight_from_upstream_uses_the_verified_fetch(own_origin, archives, tmp_path):
    origin, _ = own_origin
    good, cut = origin.register(archives.padded), origin.register(archives.padded)
    origin.faults(cut, truncate_at=1_000_000)
    upstreams = [arg for name in ("tfhub", "kaggle", "gcs") for arg in ("--upstream", f"{name}={origin.urls[name]}")]
    tfdir = tmp_path / "tfhub"

    listing = _handle_file(tmp_path, [f"https://tfhub.dev/{good.handle}", f"https://tfhub.dev/{cut.handle}"])

    warmed = run_cli("warmup", "--tfhub-dir", tfdir, *upstreams, "--file", listing)

    assert warmed.returncode == 1
    assert f"failed: https://tfhub.dev/{cut.handle}" in warmed.stderr
    assert loaded_output(hub_load_offline(f"https://tfhub.dev/{good.handle}", tfdir)) == archives.expected(
        archives.padded)
    assert len([p for p in tfdir.iterdir() if p.is_dir()]) == 1
    assert _no_leftovers(tfdir) == []


def _handle_file(tmp_path, handles):
    listing = tmp_path / "handles.txt"
    listing.write_text("# models for the offline cluster\n" + "\n".join(handles) + "\n")
    return listing


def test_warmup_is_idempotent_and_force_refreshes(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    handle = f"https://tfhub.dev/{model.handle}"
    tfdir = tmp_path / "tfhub"

    first = run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, handle)
    again = run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, handle)
    forced = run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, "--force", handle)

    assert [r.returncode for r in (first, again, forced)] == [0, 0, 0]
    assert "written" in first.stdout and "present" in again.stdout and "written" in forced.stdout
    assert origin.object_gets(model) == 1  # the forced refresh is a proxy hit


def test_tfcache_ls_and_verify(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    handle = f"https://tfhub.dev/{model.handle}"
    tfdir = tmp_path / "tfhub"
    assert run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, handle).returncode == 0
    (tfdir / ("0" * 40)).mkdir()
    (tfdir / ("0" * 40) / "junk").write_text("not a model")

    listing = run_cli("tfcache", "ls", "--tfhub-dir", tfdir)
    verified = run_cli("tfcache", "verify", "--tfhub-dir", tfdir)

    assert handle in listing.stdout
    assert verified.returncode == 1
    assert "ok " in verified.stdout and "BAD " + "0" * 40 in verified.stdout


def test_a_refused_archive_fails_its_handle_and_warmup_goes_on(proxy, origin, archives, tmp_path):
    """An archive with a duplicate member is refused; the handles after it are still warmed."""
    duplicated = tmp_path / "duplicated.tar.gz"
    with tarfile.open(archives.small) as source, tarfile.open(duplicated, "w:gz") as target:
        for member in [*source.getmembers(), source.getmember("saved_model.pb")]:
            target.addfile(member, source.extractfile(member) if member.isfile() else None)
    bad, good = origin.register(duplicated), origin.register(archives.small)
    tfdir = tmp_path / "tfhub"
    listing = _handle_file(tmp_path, [f"https://tfhub.dev/{bad.handle}", f"https://tfhub.dev/{good.handle}"])

    warmed = run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, "--file", listing)

    assert "Traceback" not in warmed.stderr, warmed.stderr
    assert warmed.returncode == 1
    assert f"failed: https://tfhub.dev/{bad.handle}" in warmed.stderr
    assert "appears twice" in warmed.stdout
    assert loaded_output(hub_load_offline(f"https://tfhub.dev/{good.handle}", tfdir)) == archives.expected(
        archives.small)
    assert len([p for p in tfdir.iterdir() if p.is_dir()]) == 1
    assert _no_leftovers(tfdir) == []
