"""kagglehub through the mirror: real kagglehub 1.0.3 talks to https://api.kaggle.com as always,
through HTTPS_PROXY, and gets its RPCs answered and its files from the mirror's cache: a second
client costs no storage GET, a cut file resumes whole, offline mode answers from stored metadata,
a private model's token passes through and nothing of it is stored."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import requests

from tests import test_interception, test_origin_kaggle_api
from tests.conftest import run_cli
from tests.test_origin_kaggle_api import (BIG, MEMBERS, RPC_PATH, download_location, downloaded, kagglehub_process,
                                          md5s)

# Fixtures shared with the tests of interception and of the emulator's Kaggle API.
ca = test_interception.ca
members = test_origin_kaggle_api.members
archive = test_origin_kaggle_api.archive

INSTANCE = {"ownerSlug": "google", "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2", "instanceSlug": "default"}


def _upstreams(origin) -> dict:
    return {name: origin.urls[name] for name in ("tfhub", "kaggle", "gcs", "kaggle-api")}


@pytest.fixture
def mirror(proxy_factory, clean_origin, ca, tmp_path):
    """An intercepting mirror whose kaggle-api upstream is the origin emulator."""
    return proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, upstreams=_upstreams(clean_origin))


def run_kagglehub(mirror, ca_dir: Path, handle: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """kagglehub.model_download in its own process, as a user runs it behind HTTPS_PROXY: it talks to
    https://api.kaggle.com and trusts the interception CA through REQUESTS_CA_BUNDLE."""
    return kagglehub_process(handle, cache, HTTPS_PROXY=mirror.url, REQUESTS_CA_BUNDLE=str(ca_dir / "trust-bundle.pem"),
                             **env)


def rpc(base_url: str, name: str, body: dict, **headers: str) -> requests.Response:
    return requests.post(base_url + RPC_PATH + name, json=body, headers=headers, allow_redirects=False, timeout=60)


def file_url(mirror, model, path: str = BIG) -> str:
    return f"{mirror.url}/hubproxy/v1/files/google/{model.model}/tensorFlow2/default/{model.version}/{path}"


def test_kagglehub_downloads_a_version_through_https_proxy_and_a_second_client_costs_no_storage_get(
        mirror, clean_origin, archive, members, ca, tmp_path):
    model = clean_origin.register(archive)

    first = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh-a"))
    gets_after_first = len(clean_origin.storage_gets(model))
    second = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh-b"))

    assert first == second == md5s(members)
    assert gets_after_first == len(MEMBERS)
    assert len(clean_origin.storage_gets(model)) == len(MEMBERS), "the second client was served from the mirror"
    assert len(clean_origin.rpcs("ListModelInstanceVersionFiles")) == 1, "a version's file list is kept"
    assert mirror.metric("hubproxy_connects_total", outcome="intercepted") >= 2


def test_kagglehub_without_a_version_asks_the_latest_and_gets_it(mirror, clean_origin, archive, members, ca,
                                                                 tmp_path):
    first = clean_origin.register(archive)
    clean_origin.register(archive, like=first, version="2")

    files = downloaded(run_kagglehub(mirror, ca, first.kaggle_instance_handle, tmp_path / "kh-a"))
    again = downloaded(run_kagglehub(mirror, ca, first.kaggle_instance_handle, tmp_path / "kh-b"))

    assert files == again == md5s(members)
    assert len(clean_origin.rpcs("GetModelInstance")) == 1, "the latest version is reused within the TTL"
    assert {r["body"]["versionNumber"] for r in clean_origin.rpcs("ListModelInstanceVersionFiles")} == {2}


def test_a_versions_file_list_is_kept_for_ever_while_the_latest_version_expires(
        proxy_factory, clean_origin, archive, members, ca, tmp_path):
    """With a TTL of 0s, GetModelInstance (which version is the latest) goes upstream every time,
    but the file list of a given version never does again: a version's files don't change."""
    model = clean_origin.register(archive)
    mirror = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--kaggle-metadata-ttl", "0s",
                           upstreams=_upstreams(clean_origin))

    files = downloaded(run_kagglehub(mirror, ca, model.kaggle_instance_handle, tmp_path / "kh-a"))
    again = downloaded(run_kagglehub(mirror, ca, model.kaggle_instance_handle, tmp_path / "kh-b"))

    assert files == again == md5s(members)
    assert len(clean_origin.rpcs("GetModelInstance")) == 2, "the latest version is asked again once the TTL is over"
    assert [r["body"]["versionNumber"] for r in clean_origin.rpcs("ListModelInstanceVersionFiles")] == [1], \
        "a version's file list went upstream once"


def test_the_redirect_names_the_mirror_never_the_signed_url(mirror, clean_origin, archive, members):
    model = clean_origin.register(archive)
    body = {**INSTANCE, "modelSlug": model.model, "versionNumber": 1, "path": BIG}

    answer = rpc(mirror.url, "DownloadModelInstanceVersion", body)

    assert answer.status_code == 302
    location = answer.headers["Location"]
    assert location == file_url(mirror, model)
    assert clean_origin.urls["gcs"] not in location and "Signature" not in location
    miss = requests.get(location, timeout=60)  # a plain HTTP client on the mirror's port
    hit = requests.get(location, headers={"Range": "bytes=1000-"}, timeout=60)
    assert (miss.status_code, miss.headers["X-Cache"], miss.content) == (200, "MISS", members[BIG])
    assert miss.headers["Content-Length"] == str(len(members[BIG])) and miss.headers["Accept-Ranges"] == "bytes"
    assert (hit.status_code, hit.headers["X-Cache"], hit.content) == (206, "HIT", members[BIG][1000:])
    assert len(clean_origin.storage_gets(model, BIG)) == 1


def test_clients_asking_for_one_file_at_once_cost_one_storage_get(mirror, clean_origin, archive, members):
    model = clean_origin.register(archive)
    clean_origin.faults(model, BIG, hold_after=1_000_000)
    bodies = []
    clients = [threading.Thread(target=lambda: bodies.append(requests.get(file_url(mirror, model), timeout=120)))
               for _ in range(3)]
    for client in clients:
        client.start()
    mirror.wait_for_metric("hubproxy_flight_readers", 3)
    clean_origin.wait_held(1)
    clean_origin.release()
    for client in clients:
        client.join(timeout=120)

    assert sorted(b.headers["X-Cache"] for b in bodies) == ["JOIN", "JOIN", "MISS"]
    assert {b.content for b in bodies} == {members[BIG]}
    assert len(clean_origin.storage_gets(model, BIG)) == 1


def test_a_file_two_versions_share_is_stored_once(mirror, clean_origin, archive, members, tmp_path):
    first = clean_origin.register(archive)
    second = clean_origin.register(archive, like=first, version="2")

    bodies = [requests.get(file_url(mirror, model, path), timeout=60).content
              for model in (first, second) for path in MEMBERS]

    assert bodies == [members[path] for path in MEMBERS] * 2
    blobs = [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
    assert sorted(p.name for p in blobs) == sorted({hashlib.sha256(members[path]).hexdigest() for path in MEMBERS})
    assert len(clean_origin.storage_gets(first)) == len(clean_origin.storage_gets(second)) == len(MEMBERS)


def test_an_archive_fetched_by_its_tfhub_handle_and_by_kagglehub_is_stored_once(mirror, clean_origin, archive, ca,
                                                                                tmp_path):
    """More than 25 files: kagglehub takes the archive (DownloadModelInstanceVersion without a path),
    the very bytes tensorflow_hub got by the tfhub handle; two keys name them, one blob holds them."""
    model = clean_origin.register(archive, extra_files=30)
    status, headers, tfhub_bytes = mirror.get(f"/{model.handle}?tf-hub-format=compressed")
    assert (status, headers["X-Cache"]) == (200, "MISS")

    files = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh"))

    assert len(files) == len(MEMBERS) + 30
    blobs = [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in blobs] == [hashlib.sha256(tfhub_bytes).hexdigest()]
    keys = run_cli("cache", "ls", "--json", "--cache-dir", tmp_path / "cache")
    assert keys.returncode == 0, keys.stderr
    assert sorted(entry["key"] for entry in json.loads(keys.stdout)) == [
        f"kaggle-file:/google/{model.model}/tensorFlow2/default/1", f"tfhub:/{model.handle}"]


def test_a_file_that_does_not_match_its_x_goog_hash_is_cut_and_never_stored(mirror, clean_origin, archive, members):
    model = clean_origin.register(archive)
    clean_origin.faults(model, BIG, corrupt_at=1_500_000)

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(file_url(mirror, model), timeout=60)
    clean_origin.faults(model, BIG, corrupt_at=None)
    again = requests.get(file_url(mirror, model), timeout=60)

    assert (again.headers["X-Cache"], again.content) == ("MISS", members[BIG])
    assert len(clean_origin.storage_gets(model, BIG)) == 2, "the corrupt copy was not kept"


@pytest.fixture
def big_file_archive(tmp_path) -> tuple[Path, bytes]:
    """An archive of one 4 MiB file: cut at 3 MiB, the mirror has sent kagglehub more than its
    1 MiB holdback, so kagglehub keeps a partial file to resume."""
    data = os.urandom(4 << 20)
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(BIG)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path, data


def test_a_cut_file_resumed_with_kagglehubs_range_arrives_whole(mirror, clean_origin, big_file_archive, ca,
                                                                tmp_path):
    path, data = big_file_archive
    model = clean_origin.register(path)
    clean_origin.faults(model, BIG, truncate_at=3 << 20, throttle_bps=4 << 20)  # paced: the mirror streams meanwhile
    cut = run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh")
    assert cut.returncode != 0
    kept = (tmp_path / "kh" / "models" / model.kaggle_handle / BIG).stat().st_size
    assert 0 < kept < len(data), "kagglehub kept part of the file to resume"
    clean_origin.faults(model, BIG, truncate_at=None, throttle_bps=None)

    files = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh"))

    assert files == {BIG: hashlib.md5(data).hexdigest()}
    resumed = [line for line in _access_lines(mirror) if line["path"].endswith(BIG) and line["status"] == 206]
    assert [line["bytes"] for line in resumed] == [len(data) - kept], "resumed with a Range, answered 206"
    ranges = {g["range"] for g in clean_origin.storage_gets(model, BIG) if g["range"]}
    assert ranges <= {f"bytes={3 << 20}-"}, "the mirror fetched the file whole (and resumed only its own cuts)"


def test_more_than_25_files_take_the_archive_through_the_mirror(mirror, clean_origin, archive, ca, tmp_path):
    model = clean_origin.register(archive, extra_files=30)

    files = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh-a"))
    again = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh-b"))

    assert sorted(files) == sorted(model.files) and len(files) == len(MEMBERS) + 30
    assert files == again
    assert [g["path"] for g in clean_origin.storage_gets(model)] == ["/" + model.object]


def _access_lines(proxy) -> list[dict]:
    """The proxy's access lines, every one: it is stopped first (it flushes them at shutdown)."""
    proxy.stop()
    lines = []
    for text in proxy.log.read_text().splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines


def test_offline_mode_answers_from_stored_metadata_and_cached_files(proxy_factory, clean_origin, archive, members,
                                                                    ca, tmp_path):
    model = clean_origin.register(archive)
    online = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, upstreams=_upstreams(clean_origin))
    downloaded(run_kagglehub(online, ca, model.kaggle_instance_handle, tmp_path / "kh-a"))
    online.stop()
    asked_online = len(clean_origin.requests())
    offline = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--mode", "offline",
                            upstreams=_upstreams(clean_origin))

    files = downloaded(run_kagglehub(offline, ca, model.kaggle_instance_handle, tmp_path / "kh-b"))
    unknown = rpc(offline.url, "GetModelInstance", {**INSTANCE, "modelSlug": "never-seen"})

    assert files == md5s(members)
    assert len(clean_origin.requests()) == asked_online, "offline, nothing reached upstream"
    assert unknown.status_code == 504 and "google/never-seen/tensorFlow2/default" in unknown.json()["message"]


@pytest.mark.parametrize("mode, status, outcome", [("fallback", 200, "STALE"), ("online", 502, "MISS")])
def test_fallback_answers_from_the_stored_copy_when_upstream_fails_and_online_does_not(
        proxy_factory, clean_origin, archive, tmp_path, mode, status, outcome):
    model = clean_origin.register(archive)
    body = {**INSTANCE, "modelSlug": model.model}
    first = proxy_factory(tmp_path / "cache", upstreams=_upstreams(clean_origin))
    stored = rpc(first.url, "GetModelInstance", body)
    first.stop()
    down = {**_upstreams(clean_origin), "kaggle-api": "http://127.0.0.1:9"}  # nothing listens there
    later = proxy_factory(tmp_path / "cache", "--mode", mode, "--kaggle-metadata-ttl", "0s", "--retries", "0",
                          upstreams=down)

    answer = rpc(later.url, "GetModelInstance", body)

    assert stored.status_code == 200 and stored.json()["versionNumber"] == 1
    assert (answer.status_code, answer.headers["X-Cache"]) == (status, outcome)
    assert answer.json() == stored.json() if mode == "fallback" else "cannot reach upstream" in answer.json()["message"]


def test_a_private_models_token_passes_through_and_nothing_of_it_is_stored(mirror, clean_origin, archive, members,
                                                                           ca, tmp_path):
    model = clean_origin.register(archive, private=True)

    files = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh", KAGGLE_API_TOKEN=model.token))

    assert files == md5s(members)
    authorized = [r for r in clean_origin.rpcs() if r["authorization"]]
    assert len(authorized) == 1 + len(MEMBERS), "the list and every download went upstream with the token"
    _assert_never_written(model.token, mirror, tmp_path / "cache")
    stored = [p for folder in ("blobs", "metadata") for p in (tmp_path / "cache" / folder).rglob("*") if p.is_file()]
    assert stored == [], "nothing of a private model is stored"


def test_a_private_models_signed_storage_url_through_the_proxy_is_relayed_and_not_stored(
        mirror, clean_origin, archive, members, ca, tmp_path):
    """Real Kaggle hands out https://storage.googleapis.com URLs, which kagglehub fetches through the
    same HTTPS_PROXY: the mirror relays them as they are (signature kept), and stores nothing."""
    model = clean_origin.register(archive, private=True)
    for path in model.files:
        signed = download_location(clean_origin, model, path, Authorization=model.authorization())
        clean_origin.faults(model, path, redirect_to=signed.replace(clean_origin.urls["gcs"],
                                                                    "https://storage.googleapis.com"))

    files = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh", KAGGLE_API_TOKEN=model.token))

    assert files == md5s(members)
    assert sorted(g["status"] for g in clean_origin.storage_gets(model)) == [200] * len(MEMBERS)
    assert mirror.metric("hubproxy_connects_total", outcome="intercepted") >= 2
    _assert_never_written(model.token, mirror, tmp_path / "cache")
    stored = [p for folder in ("blobs", "metadata") for p in (tmp_path / "cache" / folder).rglob("*") if p.is_file()]
    assert stored == []


def test_a_relayed_download_keeps_its_encoding_and_gets_a_clean_content_type(mirror, clean_origin, archive,
                                                                             members):
    """A relay passes bytes through unchanged, so the encoding that frames them must pass too (else the
    client takes gzip bytes for the file); a Content-Type that is no media type is not sent on."""
    model = clean_origin.register(archive, private=True)
    signed = download_location(clean_origin, model, BIG, Authorization=model.authorization())
    clean_origin.faults(model, BIG, content_encoding="gzip", content_type="application/x-tar; name=\u2603")

    answer = requests.get(signed.replace(clean_origin.urls["gcs"], "http://storage.googleapis.com"),
                          proxies={"http": mirror.url}, timeout=60)

    assert (answer.status_code, answer.headers["X-Cache"]) == (200, "PASS")
    assert answer.headers["Content-Encoding"] == "gzip"
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.content == members[BIG]  # as requests decodes it


def test_a_token_for_a_public_model_is_served_from_the_cache(proxy_factory, mirror, clean_origin, archive, members,
                                                             ca, tmp_path):
    """Checked once: the anonymous check is remembered per version, on disk, so neither a second
    client nor a restarted mirror asks upstream again."""
    model = clean_origin.register(archive)
    token = "a-token-the-origin-ignores-" + "7" * 16

    first = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh-a", KAGGLE_API_TOKEN=token))
    checked = _anonymous_rpcs(clean_origin)
    second = downloaded(run_kagglehub(mirror, ca, model.kaggle_handle, tmp_path / "kh-b", KAGGLE_API_TOKEN=token))
    after_second = _anonymous_rpcs(clean_origin)
    mirror.stop()
    restarted = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, upstreams=_upstreams(clean_origin))
    third = downloaded(run_kagglehub(restarted, ca, model.kaggle_handle, tmp_path / "kh-c", KAGGLE_API_TOKEN=token))

    assert first == second == third == md5s(members)
    assert checked, "the first client's calls were checked anonymously upstream"
    assert after_second == checked, "a second client with the token cost no anonymous check"
    assert _anonymous_rpcs(clean_origin) == checked, "nor did one after a restart: the answer is kept on disk"
    assert len(clean_origin.storage_gets(model)) == len(MEMBERS), "stored once, served from the cache after"
    assert not [r for r in clean_origin.requests() if r["authorization"]], "checked anonymously, never sent on"
    _assert_never_written(token, mirror, tmp_path / "cache")
    _assert_never_written(token, restarted, tmp_path / "cache")


def _anonymous_rpcs(origin) -> list[dict]:
    return [r for r in origin.rpcs() if not r["authorization"]]


def _assert_never_written(token: str, proxy, cache_dir: Path) -> None:
    proxy.stop()  # its buffered log lines are flushed
    assert token.encode() not in proxy.log.read_bytes()
    for path in cache_dir.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("body, headers, status, names", [
    (b"{", {"Content-Type": "application/json"}, 400, "not JSON"),
    (b"[1]", {"Content-Type": "application/json"}, 400, "JSON object"),
    (b'{"ownerSlug": "google"}', {"Content-Type": "application/json"}, 400, "modelSlug"),
    (json.dumps({**INSTANCE, "modelSlug": "x", "surprise": 1}).encode(), {"Content-Type": "application/json"}, 400,
     "surprise"),
    (json.dumps({**INSTANCE, "modelSlug": "x", "versionNumber": "1"}).encode(), {"Content-Type": "application/json"},
     400, "versionNumber"),
    (json.dumps({**INSTANCE, "modelSlug": "../x", "versionNumber": 1}).encode(), {"Content-Type": "application/json"},
     400, "modelSlug"),
    (json.dumps({**INSTANCE, "modelSlug": "x", "versionNumber": 1, "path": "a/../../etc"}).encode(),
     {"Content-Type": "application/json"}, 400, "path segment"),
    (json.dumps({**INSTANCE, "modelSlug": "x", "framework": "TENSORFLOW", "versionNumber": 1}).encode(),
     {"Content-Type": "application/json"}, 400, "framework"),
    (b"{}", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    (b'{"ownerSlug": "' + b"x" * 70_000 + b'"}', {"Content-Type": "application/json"}, 413, "larger than"),
])
def test_bad_rpc_bodies_are_refused_in_one_line(mirror, clean_origin, body, headers, status, names):
    answer = requests.post(mirror.url + RPC_PATH + "DownloadModelInstanceVersion", data=body, headers=headers,
                           allow_redirects=False, timeout=60)
    assert answer.status_code == status
    assert answer.text.count("\n") == 1 and answer.text.endswith("\n")
    assert names in answer.json()["message"]
    assert clean_origin.rpcs() == []


def test_unknown_rpcs_and_paths_on_api_kaggle_com_are_404s(mirror, clean_origin, ca):
    from tests.test_interception import _through_tunnel

    for path, method in ((RPC_PATH + "DeleteModel", "POST"), ("/v1/datasets.DatasetApiService/ListDatasets", "POST"),
                         ("/metrics", "GET"), ("/hubproxy/v1/files/google/x/tensorFlow2/default/1/../../etc", "GET")):
        status, _, body = _through_tunnel(mirror, "api.kaggle.com", path, ca, method=method)
        assert status in (400, 404) and b"hubproxy_" not in body, path
    assert clean_origin.rpcs() == []


@pytest.mark.parametrize("named", ["{key}", "kaggle-file:/google/{model}/*"])
def test_the_admin_api_purges_kagglehubs_files_by_key_or_glob(proxy_factory, clean_origin, archive, members,
                                                              tmp_path, named):
    config = tmp_path / "hubproxy.toml"
    config.write_text('admin_token = "s3cret-admin-token-0123456789"\n')
    mirror = proxy_factory(tmp_path / "cache", "--config", config, upstreams=_upstreams(clean_origin))
    model = clean_origin.register(archive)
    assert requests.get(file_url(mirror, model), timeout=60).headers["X-Cache"] == "MISS"
    key = f"kaggle-file:/google/{model.model}/tensorFlow2/default/1/{BIG}"

    purged = requests.post(mirror.url + "/admin/purge", json={"handles": [named.format(key=key, model=model.model)]},
                           headers={"Authorization": "Bearer s3cret-admin-token-0123456789"}, timeout=60)

    assert purged.status_code == 200, purged.text
    assert purged.json()["removed"] == [key]
    assert requests.get(file_url(mirror, model), timeout=60).headers["X-Cache"] == "MISS"


def test_the_browse_page_links_a_kagglehub_file_to_its_own_url(mirror, clean_origin, archive):
    model = clean_origin.register(archive)
    assert requests.get(file_url(mirror, model), timeout=60).status_code == 200

    page = requests.get(mirror.url + "/", timeout=60).text

    assert f"<code>{file_url(mirror, model)}</code>" in page
