"""The real tensorflow_hub client loads real SavedModels through hubproxy, fetching each archive once."""

from __future__ import annotations

from tests.conftest import hub_load, loaded_output, model_dirs
from hubproxy.handles import tfhub_cache_name


def test_two_fresh_clients_cost_one_upstream_fetch(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    handle = f"{proxy.url}/{model.handle}"

    first = hub_load(handle, tmp_path / "tfhub-a")
    second = hub_load(handle, tmp_path / "tfhub-b")

    assert loaded_output(first) == archives.expected(archives.small)
    assert loaded_output(second) == archives.expected(archives.small)
    assert origin.object_gets(model) == 1
    # tensorflow_hub names its cache entry after the handle exactly as typed.
    assert [p.name for p in model_dirs(tmp_path / "tfhub-a")] == [tfhub_cache_name(handle)]


def test_kaggle_spelling_loads_and_shares_the_blob(proxy, origin, archives, tmp_path):
    model = origin.register(archives.padded)

    via_kaggle = hub_load(f"{proxy.url}{model.kaggle_path}", tmp_path / "tfhub-kaggle")
    via_tfhub = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub-tfhub")

    assert loaded_output(via_kaggle) == archives.expected(archives.padded)
    assert loaded_output(via_tfhub) == archives.expected(archives.padded)
    blobs = [p for p in (proxy.cache_dir / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1, "two spellings of one model must share one content-addressed blob"


def test_hit_after_signed_url_expired_needs_no_upstream(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    status, _, _ = proxy.get(f"/{model.handle}?tf-hub-format=compressed")
    assert status == 200
    signed = [r for r in origin.requests("gcs") if r["method"] == "GET"]
    assert len(signed) == 1

    origin.control("POST", "advance_clock", {"seconds": 7 * 24 * 3600})
    requests_before = len(origin.requests())
    result = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert loaded_output(result) == archives.expected(archives.small)
    assert len(origin.requests()) == requests_before, "a HIT must not contact any upstream"
