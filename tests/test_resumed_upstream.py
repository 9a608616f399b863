"""A transfer cut mid-body is resumed where it broke (Range + If-Match on the same signed URL, or on
a fresh one when it expired), so clients see no error and the whole is still verified against the
origin's checksum; an object that changed in between, or a link that keeps breaking, fails as a
cut always did: the clients are cut and nothing is committed."""

from __future__ import annotations

import concurrent.futures
import hashlib
import math

from bench.downloads import download
from tests.conftest import hub_load, hub_load_started, loaded_output, model_dirs
from tests.test_kagglehub_through_mirror import ca, mirror, run_kagglehub  # noqa: F401 (fixtures)
from tests.test_origin_kaggle_api import BIG, archive, downloaded, md5s, members  # noqa: F401 (fixtures)

CUT = 2 << 20


def _stored_blobs(proxy) -> list:
    return [p for p in (proxy.cache_dir / "blobs").rglob("*") if p.is_file()]


def _nothing_committed(proxy) -> bool:
    return _stored_blobs(proxy) == [] and not any((proxy.cache_dir / "tmp").iterdir())


def _etag(archive_path) -> str:
    return f'"{hashlib.md5(archive_path.read_bytes()).hexdigest()}"'


def _held_then_cut(origin, archives):
    """A model whose first transfer pauses at CUT (until released) and is then cut there, once."""
    model = origin.register(archives.padded)
    origin.faults(model, hold_after=CUT, cut_once_at=CUT)
    return model


def test_a_transfer_cut_once_is_resumed_with_range_and_if_match_and_the_client_loads_the_model(
        proxy, origin, archives, tmp_path):
    model = origin.register(archives.padded)
    origin.faults(model, cut_once_at=CUT)

    loaded = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert loaded_output(loaded) == archives.expected(archives.padded)
    gets = origin.storage_gets(model)
    assert [(g["range"], g["if_match"]) for g in gets] == [(None, None), (f"bytes={CUT}-", _etag(archives.padded))]
    assert [p.read_bytes() for p in _stored_blobs(proxy)] == [archives.padded.read_bytes()]
    assert proxy.metric("hubproxy_upstream_resumes_total", reason="cut") == 1


def test_an_object_replaced_between_the_cut_and_the_resume_cuts_the_client_and_commits_nothing(
        proxy, origin, archives, tmp_path):
    model = _held_then_cut(origin, archives)
    client = hub_load_started(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")
    origin.wait_held(1)
    origin.faults(model, hold_after=None, replaced=True)
    origin.release()

    client.communicate(timeout=600)

    assert client.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert _nothing_committed(proxy)
    resume = origin.storage_gets(model)[-1]
    assert (resume["if_match"], resume["status"]) == (_etag(archives.padded), 412)
    assert len(origin.storage_gets(model)) == 2, "a changed object is not resumed again"


def test_a_signed_url_expired_at_resume_time_is_signed_afresh_through_the_chain_then_resumed(
        proxy, origin, archives, tmp_path):
    model = _held_then_cut(origin, archives)
    client = hub_load_started(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")
    origin.wait_held(1)
    origin.control("POST", "advance_clock", {"seconds": 3600})  # past the signed URL's lifetime
    origin.faults(model, hold_after=None)
    origin.release()

    out, err = client.communicate(timeout=600)

    assert client.returncode == 0, err[-3000:]
    gets = origin.storage_gets(model)
    assert [(g["range"], g["status"]) for g in gets] == [(None, 200), (f"bytes={CUT}-", 400), (f"bytes={CUT}-", 206)]
    assert len(origin.requests("tfhub", f"/{model.handle}")) == 2, "a fresh URL came from the first hop"
    assert [p.read_bytes() for p in _stored_blobs(proxy)] == [archives.padded.read_bytes()]


def _pieces(archive_path, every: int) -> int:
    return math.ceil(archive_path.stat().st_size / every)


def test_a_link_that_keeps_breaking_is_resumed_as_often_as_configured(proxy_factory, clean_origin, archives, tmp_path):
    every = 1 << 20
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, cut_every=every)
    proxy = proxy_factory(None, "--upstream-resumes", str(_pieces(archives.padded, every) - 1))

    loaded = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert loaded_output(loaded) == archives.expected(archives.padded)
    assert len(clean_origin.storage_gets(model)) == _pieces(archives.padded, every)


def test_a_link_that_breaks_more_often_than_configured_cuts_the_client_and_commits_nothing(
        proxy_factory, clean_origin, archives, tmp_path):
    every = 1 << 20
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, cut_every=every)
    resumes = _pieces(archives.padded, every) - 2
    proxy = proxy_factory(None, "--upstream-resumes", str(resumes))

    failed = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert failed.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert _nothing_committed(proxy)
    assert len(clean_origin.storage_gets(model)) == resumes + 1
    assert proxy.metric("hubproxy_upstream_resumes_total", reason="cut") == resumes


def test_a_kagglehub_file_cut_once_is_resumed_and_kagglehub_gets_every_file(
        mirror, clean_origin, archive, members, ca, tmp_path):  # noqa: F811 (fixtures)
    model = clean_origin.register(archive)
    clean_origin.faults(model, BIG, cut_once_at=1 << 20)

    files = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh"))

    assert files == md5s(members)
    assert [g["range"] for g in clean_origin.storage_gets(model, BIG)] == [None, f"bytes={1 << 20}-"]
    assert mirror.metric("hubproxy_upstream_resumes_total", reason="cut") == 1


def test_an_object_replaced_under_an_origin_ignoring_if_match_is_told_by_its_etag_and_not_resumed_again(
        proxy, origin, archives):
    """An origin that ignores If-Match answers the resume 206 from the replaced object: the other
    ETag on that 206 is what shows the bytes would not continue the ones already sent."""
    model = _held_then_cut(origin, archives)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        client = pool.submit(download, f"{proxy.url}/{model.handle}")
        origin.wait_held(1)
        origin.faults(model, hold_after=None, replaced=True, ignore_if_match=True)
        origin.release()
        got = client.result(timeout=600)

    assert got.status == 200 and not got.complete, f"the client was not cut: {got}"
    assert got.received <= CUT
    assert _nothing_committed(proxy)
    gets = origin.storage_gets(model)
    assert [(g["range"], g["if_match"], g["status"]) for g in gets] == [
        (None, None, 200), (f"bytes={CUT}-", _etag(archives.padded), 206)], "a changed object is not resumed again"
    assert "changed (another ETag)" in proxy.log.read_text()
