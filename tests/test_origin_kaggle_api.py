"""The origin emulator's Kaggle models API (tests/origin_kaggle.py) and the per-file storage objects
behind it, checked with kagglesdk's own request and response classes and with kagglehub itself."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests
from kagglehub.clients import download_file
from kagglehub.handle import parse_model_handle
from kagglesdk.models.types.model_api_service import (
    ApiDownloadModelInstanceVersionRequest,
    ApiGetModelInstanceRequest,
    ApiListModelInstanceVersionFilesRequest,
    ApiListModelInstanceVersionFilesResponse,
    ApiModelInstance,
)
from kagglesdk.models.types.model_enums import ModelFramework

from tests.origin_control import Model, Origin

RPC_PATH = "/v1/models.ModelApiService/"
TESTS = Path(__file__).parent
MEMBERS = {  # a SavedModel's shape; the variables file spans more than one of kagglehub's 1 MiB reads
    "saved_model.pb": 40_000,
    "fingerprint.pb": 56,
    "variables/variables.data-00000-of-00001": 1_600_000,
    "variables/variables.index": 900,
    "assets/vocab.txt": 120,
}
BIG = "variables/variables.data-00000-of-00001"


# ---------------------------------------------------------------- harness


@pytest.fixture
def members(tmp_path) -> dict[str, bytes]:
    return {name: os.urandom(size) for name, size in MEMBERS.items()}


@pytest.fixture
def archive(tmp_path, members) -> Path:
    """A .tar.gz shaped like a hub archive of a SavedModel: directory entries, then files."""
    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for folder in ("variables", "assets"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def kaggle_request(cls, model: Model, **fields):
    """A kagglesdk request for model, its fields set as kagglehub sets them from the handle."""
    handle = parse_model_handle(model.kaggle_handle)
    request = cls()
    request.owner_slug, request.model_slug, request.instance_slug = handle.owner, handle.model, handle.variation
    request.framework = handle.framework_enum()
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def post(origin: Origin, rpc: str, request, **headers: str) -> requests.Response:
    """One RPC as kagglesdk's KaggleHttpClient sends it: a POST of the request's to_dict() as JSON."""
    return requests.post(origin.urls["kaggle-api"] + RPC_PATH + rpc, json=type(request).to_dict(request),
                         headers=headers, allow_redirects=False, timeout=30)


def answer_as(response: requests.Response, cls):
    """The answer parsed as kagglesdk parses it, after checking it holds nothing kagglesdk would drop."""
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    parsed = cls.from_json(response.text)
    assert cls.to_dict(parsed) == response.json()  # every field known to kagglesdk, none at its default
    return parsed


def error_of(response: requests.Response) -> tuple[int, dict]:
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == response.status_code and body["message"]
    return response.status_code, body


def download_location(origin: Origin, model: Model, path: str | None = None, **headers: str) -> str:
    request = kaggle_request(ApiDownloadModelInstanceVersionRequest, model, version_number=int(model.version))
    if path:
        request.path = path
    response = post(origin, "DownloadModelInstanceVersion", request, **headers)
    assert response.status_code == 302, response.text
    return response.headers["Location"]


def b64_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def run_kagglehub(origin: Origin, handle: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """kagglehub.model_download in its own process, sent to the emulator: kagglesdk's LOCALHOST
    environment reached through HTTP_PROXY, which requests keeps across the storage redirect."""
    return kagglehub_process(handle, cache, KAGGLE_API_ENVIRONMENT="LOCALHOST", HTTP_PROXY=origin.urls["kaggle-api"],
                             **env)


def kagglehub_process(handle: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """kagglehub.model_download(handle) in its own process, with KAGGLEHUB_CACHE=cache, no proxy
    and no Kaggle setting of ours but `env`."""
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("KAGGLE")}
    clean.update(HOME=str(cache.parent), KAGGLE_CONFIG_DIR=str(cache.parent / "kaggle-config"),
                 KAGGLEHUB_CACHE=str(cache), NO_PROXY="", **env)
    return subprocess.run([sys.executable, str(TESTS / "kagglehub_client.py"), handle], capture_output=True,
                          text=True, timeout=300, env=clean)


def downloaded(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["files"]


def md5s(members: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(data).hexdigest() for name, data in members.items()}


# ---------------------------------------------------------------- the RPCs, with kagglesdk's classes


def test_get_model_instance_names_the_latest_version(clean_origin, archive):
    first = clean_origin.register(archive)
    clean_origin.register(archive, like=first, version="2")
    answer = answer_as(post(clean_origin, "GetModelInstance", kaggle_request(ApiGetModelInstanceRequest, first)),
                       ApiModelInstance)
    assert answer.version_number == 2 and answer.slug == "default"
    assert answer.framework == ModelFramework.MODEL_FRAMEWORK_TENSOR_FLOW_2
    assert answer.total_uncompressed_bytes == sum(MEMBERS.values())


def test_unknown_models_and_methods_answer_json_errors(clean_origin, archive):
    model = clean_origin.register(archive)
    unknown = kaggle_request(ApiGetModelInstanceRequest, model, model_slug="no-such-model")
    assert error_of(post(clean_origin, "GetModelInstance", unknown))[0] == 404
    other_framework = kaggle_request(ApiGetModelInstanceRequest, model, framework=ModelFramework.MODEL_FRAMEWORK_JAX)
    assert error_of(post(clean_origin, "GetModelInstance", other_framework))[0] == 404
    missing_version = kaggle_request(ApiDownloadModelInstanceVersionRequest, model, version_number=7)
    assert error_of(post(clean_origin, "DownloadModelInstanceVersion", missing_version))[0] == 404
    missing_file = kaggle_request(ApiDownloadModelInstanceVersionRequest, model, version_number=1, path="nope.pb")
    assert error_of(post(clean_origin, "DownloadModelInstanceVersion", missing_file))[0] == 404
    assert error_of(post(clean_origin, "NoSuchRpc", unknown))[0] == 404
    not_json = requests.post(clean_origin.urls["kaggle-api"] + RPC_PATH + "GetModelInstance", data=b"{", timeout=30)
    assert error_of(not_json)[0] == 400


def test_file_list_pages_with_next_page_token(clean_origin, archive):
    model = clean_origin.register(archive)
    names, tokens, token = [], [], None
    while True:
        request = kaggle_request(ApiListModelInstanceVersionFilesRequest, model, version_number=1, page_size=2)
        request.page_token = token
        page = answer_as(post(clean_origin, "ListModelInstanceVersionFiles", request),
                         ApiListModelInstanceVersionFilesResponse)
        assert len(page.files) <= 2
        names += [(f.name, f.size) for f in page.files]
        if not page.next_page_token:
            break
        token = page.next_page_token
        tokens.append(token)
    assert names == sorted(MEMBERS.items())  # plain files only: no directory entries
    assert len(tokens) == 2 and len(set(tokens)) == 2
    assert sorted(model.files) == sorted(MEMBERS)


def test_more_than_25_files_leave_a_next_page_token_for_kagglehub(clean_origin, archive):
    few, many = clean_origin.register(archive), clean_origin.register(archive, extra_files=21)
    for model, more in ((few, False), (many, True)):  # kagglehub asks for pageSize 25 and no token
        request = kaggle_request(ApiListModelInstanceVersionFilesRequest, model, version_number=1, page_size=25)
        page = answer_as(post(clean_origin, "ListModelInstanceVersionFiles", request),
                         ApiListModelInstanceVersionFilesResponse)
        assert (page.next_page_token != "") is more
    assert len(many.files) == 26
    whole = requests.get(download_location(clean_origin, many), timeout=30).content
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == sorted(many.files)


def test_download_with_a_path_redirects_to_that_files_signed_url(clean_origin, archive, members):
    model = clean_origin.register(archive)
    location = download_location(clean_origin, model, "variables/variables.index")
    assert location.startswith(f"{clean_origin.urls['gcs']}/{model.files['variables/variables.index']}?")
    assert "X-Goog-Signature=" in location and "X-Goog-Expires=600" in location
    assert requests.get(location, timeout=30).content == members["variables/variables.index"]
    archive_location = download_location(clean_origin, model)
    assert archive_location.startswith(f"{clean_origin.urls['gcs']}/{model.object}?")
    assert requests.get(archive_location, timeout=30).content == archive.read_bytes()


def test_file_urls_are_signed_and_expire(clean_origin, archive):
    model = clean_origin.register(archive)
    location = download_location(clean_origin, model, "saved_model.pb")
    assert requests.get(location.split("?")[0], timeout=30).status_code == 403
    assert requests.get(location.replace("X-Goog-Signature=", "X-Goog-Signature=0"), timeout=30).status_code == 403
    clean_origin.control("POST", "advance_clock", {"seconds": 601})
    expired = requests.get(location, timeout=30)
    assert expired.status_code == 400 and b"<Code>ExpiredToken</Code>" in expired.content
    assert requests.get(download_location(clean_origin, model, "saved_model.pb"), timeout=30).status_code == 200


# ---------------------------------------------------------------- per-file objects


def test_file_objects_carry_length_etag_and_both_hashes(clean_origin, archive, members):
    google_crc32c = pytest.importorskip("google_crc32c")
    model = clean_origin.register(archive)
    data = members[BIG]
    response = requests.head(download_location(clean_origin, model, BIG), timeout=30)
    crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    assert response.headers["x-goog-hash"] == f"crc32c={crc},md5={b64_md5(data)}"
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert response.headers["Accept-Ranges"] == "bytes"


def test_file_objects_answer_ranges_with_206(clean_origin, archive, members):
    model = clean_origin.register(archive)
    url, data = download_location(clean_origin, model, BIG), members[BIG]
    for header, start in (("bytes=300000-", 300_000), ("bytes=-10", len(data) - 10)):
        response = requests.get(url, headers={"Range": header}, timeout=30)
        assert response.status_code == 206 and response.content == data[start:]
        assert response.headers["Content-Range"] == f"bytes {start}-{len(data) - 1}/{len(data)}"
    assert requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=30).status_code == 416
    gets = clean_origin.storage_gets(model, BIG)
    assert [g["range"] for g in gets] == ["bytes=300000-", "bytes=-10", f"bytes={len(data)}-"]


def test_kagglehub_resume_of_a_partial_file_arrives_whole(clean_origin, archive, members, tmp_path):
    # kagglehub's own download_file: it sees the partial file, asks for `Range: bytes=N-`, appends
    # what comes back and checks the whole against x-goog-hash's md5; a 200 there would fail it.
    model = clean_origin.register(archive)
    out, data = tmp_path / "variables.data", members[BIG]
    out.write_bytes(data[:250_000])
    request = kaggle_request(ApiDownloadModelInstanceVersionRequest, model, version_number=1, path=BIG)
    with requests.post(clean_origin.urls["kaggle-api"] + RPC_PATH + "DownloadModelInstanceVersion",
                       json=request.to_dict(), stream=True, timeout=30) as response:
        download_file(response, str(out), parse_model_handle(model.kaggle_handle))
    assert out.read_bytes() == data
    assert [(g["range"], g["status"]) for g in clean_origin.storage_gets(model, BIG)][-1] == ("bytes=250000-", 206)


def test_faults_switch_on_member_files_alone(clean_origin, archive, members):
    model = clean_origin.register(archive)
    clean_origin.faults(model, BIG, status=503, status_count=1)
    url = download_location(clean_origin, model, BIG)
    assert requests.get(url, timeout=30).status_code == 503
    assert requests.get(url, timeout=30).content == members[BIG]
    clean_origin.faults(model, BIG, truncate_at=100_000)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=30)
    assert requests.get(download_location(clean_origin, model, "saved_model.pb"), timeout=30).status_code == 200
    assert requests.get(download_location(clean_origin, model), timeout=30).content == archive.read_bytes()


def test_crafted_archive_exposes_only_its_plain_files(clean_origin, tmp_path):
    path = tmp_path / "crafted.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("../escaped.txt", "/absolute.txt", "inside/ok.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("inside/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    model = clean_origin.register(path)
    assert list(model.files) == ["inside/ok.txt"]
    not_an_archive = tmp_path / "page.html"
    not_an_archive.write_text("<html>sign in</html>")
    assert clean_origin.register(not_an_archive).files == {}


# ---------------------------------------------------------------- private models


def test_private_model_refuses_requests_without_its_token(clean_origin, archive):
    model = clean_origin.register(archive, private=True)
    calls = {
        "GetModelInstance": kaggle_request(ApiGetModelInstanceRequest, model),
        "ListModelInstanceVersionFiles": kaggle_request(ApiListModelInstanceVersionFilesRequest, model,
                                                        version_number=1),
        "DownloadModelInstanceVersion": kaggle_request(ApiDownloadModelInstanceVersionRequest, model,
                                                       version_number=1, path="saved_model.pb"),
    }
    for rpc, request in calls.items():
        for refused in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!"}):
            assert error_of(post(clean_origin, rpc, request, **refused)) == (401, {"code": 401,
                                                                                  "message": "Unauthenticated"})
        for scheme in ("Bearer", "Basic"):
            assert post(clean_origin, rpc, request, Authorization=model.authorization(scheme)).status_code in (200, 302)
    legacy = f"{clean_origin.urls['kaggle']}{model.kaggle_download_path}"
    assert requests.get(legacy, allow_redirects=False, timeout=30).status_code == 401
    log = clean_origin.rpcs()
    assert [r["authorization"] for r in log[:3]] == [False, True, True]
    assert model.token not in json.dumps(clean_origin.requests())


# ---------------------------------------------------------------- kagglehub itself


def test_kagglehub_fetches_each_file_of_a_version(clean_origin, archive, members, tmp_path):
    model = clean_origin.register(archive)
    assert downloaded(run_kagglehub(clean_origin, model.kaggle_handle, tmp_path / "cache")) == md5s(members)
    assert [r["path"].rsplit("/", 1)[1] for r in clean_origin.rpcs()][:1] == ["ListModelInstanceVersionFiles"]
    assert len(clean_origin.rpcs("DownloadModelInstanceVersion")) == len(MEMBERS)
    assert clean_origin.rpcs("GetModelInstance") == []
    assert sorted(g["path"] for g in clean_origin.storage_gets(model)) == sorted("/" + o for o in model.files.values())
    assert clean_origin.rpcs("ListModelInstanceVersionFiles")[0]["body"] == {
        "ownerSlug": "google", "modelSlug": model.model, "instanceSlug": "default",
        "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2", "versionNumber": 1, "pageSize": 25}


def test_kagglehub_without_a_version_gets_the_latest(clean_origin, archive, tmp_path):
    first = clean_origin.register(archive)
    newer_archive = tmp_path / "newer.tar.gz"
    with tarfile.open(newer_archive, "w:gz") as tar:
        info = tarfile.TarInfo("saved_model.pb")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"new"))
    clean_origin.register(newer_archive, like=first, version="2")
    files = downloaded(run_kagglehub(clean_origin, first.kaggle_instance_handle, tmp_path / "cache"))
    assert files == {"saved_model.pb": hashlib.md5(b"new").hexdigest()}
    assert [r["body"] for r in clean_origin.rpcs("GetModelInstance")] == [{
        "ownerSlug": "google", "modelSlug": first.model, "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2",
        "instanceSlug": "default"}]


def test_kagglehub_takes_the_archive_past_25_files(clean_origin, archive, members, tmp_path):
    model = clean_origin.register(archive, extra_files=21)
    files = downloaded(run_kagglehub(clean_origin, model.kaggle_handle, tmp_path / "cache"))
    assert sorted(files) == sorted(model.files) and len(files) == 26
    assert [g["path"] for g in clean_origin.storage_gets(model)] == ["/" + model.object]
    assert [r["body"].get("path") for r in clean_origin.rpcs("DownloadModelInstanceVersion")] == [None]


def test_kagglehub_resumes_a_cut_file_with_a_range(clean_origin, archive, members, tmp_path):
    model = clean_origin.register(archive)
    clean_origin.faults(model, BIG, truncate_at=1_200_000)  # past kagglehub's first 1 MiB read
    assert run_kagglehub(clean_origin, model.kaggle_handle, tmp_path / "cache").returncode != 0
    clean_origin.faults(model, BIG, truncate_at=None)
    assert downloaded(run_kagglehub(clean_origin, model.kaggle_handle, tmp_path / "cache")) == md5s(members)
    resumed = [g for g in clean_origin.storage_gets(model, BIG) if g["range"]]
    assert len(resumed) == 1 and resumed[0]["status"] == 206 and resumed[0]["range"].endswith("-")
    assert 0 < int(resumed[0]["range"].removeprefix("bytes=").rstrip("-")) <= 1_200_000


def test_kagglehub_needs_the_token_of_a_private_model(clean_origin, archive, members, tmp_path):
    model = clean_origin.register(archive, private=True)
    refused = run_kagglehub(clean_origin, model.kaggle_handle, tmp_path / "anonymous")
    assert refused.returncode != 0 and "401" in refused.stderr
    assert clean_origin.storage_gets(model) == []
    files = downloaded(run_kagglehub(clean_origin, model.kaggle_handle, tmp_path / "cache",
                                     KAGGLE_API_TOKEN=model.token))
    assert files == md5s(members)
    # requests drops Authorization on the redirect to another host: storage needs only the signature
    assert {g["authorization"] for g in clean_origin.storage_gets(model)} == {False}
