"""kagglehub against `serve --read-only` on a cache mounted read-only: a model seeded while the
cache was writable is served with upstream down (RPCs from stored metadata, files from blobs); a
new one passes through, its RPCs and files unstored; a cache with no metadata/ yet (seeded by
`bundle import`) still serves; nothing is ever written, and nothing is reported as an error."""

from __future__ import annotations

import pytest

from tests import test_interception, test_origin_kaggle_api
from tests.test_cache_disk_full import small_disk  # noqa: F401  (the tmpfs fixture, mounted per test)
from tests.test_kagglehub_through_mirror import _access_lines, _upstreams, run_kagglehub
from tests.test_origin_kaggle_api import MEMBERS, downloaded, md5s
from tests.test_read_only_cache_mount import _no_traceback, _tree

ca = test_interception.ca
members = test_origin_kaggle_api.members
archive = test_origin_kaggle_api.archive

DOWN = "http://127.0.0.1:9"  # nothing listens there


def _file_outcomes(proxy) -> list[str]:
    """X-Cache of every kagglehub file the proxy served (it is stopped to flush its access log)."""
    return [line["outcome"] for line in _access_lines(proxy) if "/hubproxy/v1/files/" in line["path"]]


@pytest.fixture
def read_only_after(small_disk):  # noqa: F811
    """read_only_after(forget=()): the cache's tree (as _tree) once the names in `forget` are removed
    from it and it is mounted read-only; writable again after the test."""
    def make(forget: tuple[str, ...] = ()) -> dict:
        for name in forget:
            (small_disk.cache_dir / name).rmdir()
        before = _tree(small_disk.cache_dir)
        small_disk.make_cache_read_only()
        return before

    yield make
    small_disk.make_cache_writable()


def test_kagglehub_is_served_a_seeded_model_from_a_read_only_cache_with_upstream_down(
        proxy_factory, clean_origin, small_disk, read_only_after, archive, members, ca, tmp_path):  # noqa: F811
    model = clean_origin.register(archive)
    seeder = proxy_factory(small_disk.cache_dir, "--intercept", "--ca-dir", ca, upstreams=_upstreams(clean_origin))
    assert downloaded(run_kagglehub(seeder, ca, model.kaggle_instance_handle, tmp_path / "kh-a")) == md5s(members)
    seeder.stop()
    before = read_only_after()
    down = {name: DOWN for name in _upstreams(clean_origin)}
    proxy = proxy_factory(small_disk.cache_dir, "--read-only", "--mode", "offline", "--intercept", "--ca-dir", ca,
                          upstreams=down)

    files = downloaded(run_kagglehub(proxy, ca, model.kaggle_instance_handle, tmp_path / "kh-b"))

    assert files == md5s(members)
    assert _file_outcomes(proxy) == ["HIT"] * len(MEMBERS)
    _no_traceback(proxy)
    assert _tree(small_disk.cache_dir) == before


def test_kagglehub_gets_a_new_model_passed_through_a_read_only_cache_without_metadata_storing_nothing(
        proxy_factory, clean_origin, small_disk, read_only_after, archive, members, archives, ca,  # noqa: F811
        tmp_path):
    seeder = proxy_factory(small_disk.cache_dir)
    assert seeder.get(f"/{clean_origin.register(archives.small).handle}")[1]["X-Cache"] == "MISS"
    seeder.stop()
    before = read_only_after(forget=("metadata",))  # as `bundle import --cache-dir` leaves a cache: no metadata/
    proxy = proxy_factory(small_disk.cache_dir, "--read-only", "--intercept", "--ca-dir", ca,
                          upstreams=_upstreams(clean_origin))
    model = clean_origin.register(archive)

    first = downloaded(run_kagglehub(proxy, ca, model.kaggle_handle, tmp_path / "kh-a"))
    second = downloaded(run_kagglehub(proxy, ca, model.kaggle_handle, tmp_path / "kh-b"))

    assert first == second == md5s(members)
    assert len(clean_origin.rpcs("ListModelInstanceVersionFiles")) == 2, "nothing kept: each client's list went up"
    assert len(clean_origin.storage_gets(model)) == 2 * len(MEMBERS), "each client's files passed through"
    assert _file_outcomes(proxy) == ["MISS"] * 2 * len(MEMBERS)
    _no_traceback(proxy)
    assert "cannot store" not in proxy.log.read_text(), "a read-only cache is asked no write"
    assert _tree(small_disk.cache_dir) == before
