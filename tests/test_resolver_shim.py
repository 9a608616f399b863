"""`hubproxy.use_mirror()`: the real tensorflow_hub keeps its handles (tfhub.dev, Kaggle, the China
mirror) and its cache names, and every archive comes from the mirror.

Every shim client runs with HTTP(S)_PROXY pointed at a dead loopback port and only 127.0.0.1 exempt: a
handle the shim fails to send to the mirror fails at once instead of reaching for its real host, so no
DNS lookup of tfhub.dev, kaggle.com or hub.tensorflow.google.cn ever happens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hubproxy
from hubproxy import shim
from hubproxy.handles import tfhub_cache_name
from tests.conftest import _quiet_env, hub_load_offline, loaded_output, model_dirs, run_cli

CLIENT = Path(__file__).with_name("hub_client_shim.py")
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


def shim_load(handle: str, tfhub_cache_dir: Path, *mirrors: str, env_mirror: str | None = None):
    """The real tensorflow_hub, in its own process, after hubproxy.use_mirror(mirror) for each mirror
    (use_mirror() reading HUBPROXY_MIRROR=env_mirror when none is given)."""
    only_loopback = {name: DEAD for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    env = _quiet_env(TFHUB_CACHE_DIR=str(tfhub_cache_dir), no_proxy="127.0.0.1", NO_PROXY="127.0.0.1",
                     **only_loopback)
    env.pop("HUBPROXY_MIRROR", None)
    if env_mirror is not None:
        env["HUBPROXY_MIRROR"] = env_mirror
    return subprocess.run([sys.executable, str(CLIENT), handle, *mirrors], capture_output=True, text=True,
                          timeout=600, env=env)


def _cache_names(tfhub_cache_dir: Path) -> list[str]:
    return [p.name for p in model_dirs(tfhub_cache_dir)]


# -- real clients through a real mirror ------------------------------------------------------

SPELLINGS = {  # how users type a model's handle for each hub the shim claims
    "tfhub.dev": lambda model: f"https://tfhub.dev/{model.handle}",
    "kaggle": lambda model: f"https://www.kaggle.com{model.kaggle_path}",
    "hub.tensorflow.google.cn": lambda model: f"https://hub.tensorflow.google.cn/{model.handle}",
}


@pytest.mark.parametrize("hub, mirror_from", [("tfhub.dev", "argument"), ("kaggle", "argument"),
                                               ("hub.tensorflow.google.cn", "HUBPROXY_MIRROR")])
def test_hub_handle_comes_from_the_mirror_and_keeps_its_own_cache_name(proxy, origin, archives, tmp_path, hub,
                                                                      mirror_from):
    model = origin.register(archives.small)
    handle = SPELLINGS[hub](model)
    from_argument = mirror_from == "argument"

    result = shim_load(handle, tmp_path / "tfhub", *([proxy.url] if from_argument else []),
                       env_mirror=None if from_argument else proxy.url)

    assert loaded_output(result) == archives.expected(archives.small)
    assert origin.object_gets(model) == 1
    assert proxy.metric("hubproxy_requests_total", outcome="MISS") == 1, "the archive must come through the mirror"
    assert _cache_names(tmp_path / "tfhub") == [tfhub_cache_name(handle)]


def test_second_shim_client_with_a_fresh_cache_costs_no_origin_download(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    handle = f"https://tfhub.dev/{model.handle}"

    first = shim_load(handle, tmp_path / "tfhub-a", proxy.url)
    second = shim_load(handle, tmp_path / "tfhub-b", proxy.url)

    assert loaded_output(first) == archives.expected(archives.small)
    assert loaded_output(second) == archives.expected(archives.small)
    assert origin.object_gets(model) == 1
    assert proxy.metric("hubproxy_requests_total", outcome="HIT") == 1


def test_cache_filled_without_the_shim_serves_a_shim_client_with_no_request(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    handle = f"https://tfhub.dev/{model.handle}"
    tfdir = tmp_path / "tfhub"
    warmed = run_cli("warmup", "--tfhub-dir", tfdir, "--via", proxy.url, handle)
    assert warmed.returncode == 0, warmed.stderr

    result = shim_load(handle, tfdir, DEAD)  # any request at all would fail: nothing listens there

    assert loaded_output(result) == archives.expected(archives.small)
    assert _cache_names(tfdir) == [tfhub_cache_name(handle)]


def test_cache_filled_through_the_shim_serves_plain_tensorflow_hub_offline(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    handle = f"https://www.kaggle.com{model.kaggle_path}"
    tfdir = tmp_path / "tfhub"
    assert loaded_output(shim_load(handle, tfdir, proxy.url)) == archives.expected(archives.small)

    assert loaded_output(hub_load_offline(handle, tfdir)) == archives.expected(archives.small)


def test_use_mirror_twice_is_harmless_and_the_last_url_wins(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)

    result = shim_load(f"https://tfhub.dev/{model.handle}", tmp_path / "tfhub", DEAD, proxy.url)

    assert loaded_output(result) == archives.expected(archives.small)
    assert origin.object_gets(model) == 1


def test_handles_of_other_hosts_are_left_to_tensorflow_hub(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    handle = f"{proxy.url}/{model.handle}"  # already a mirror URL: the shim must not claim it

    result = shim_load(handle, tmp_path / "tfhub", DEAD)

    assert loaded_output(result) == archives.expected(archives.small)
    assert _cache_names(tmp_path / "tfhub") == [tfhub_cache_name(handle)]


def test_a_model_the_mirror_cannot_serve_fails_with_the_mirrors_reason(proxy, tmp_path):
    result = shim_load("https://tfhub.dev/google/no-such-model/1", tmp_path / "tfhub", proxy.url)

    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert "HTTPError" in error and "404" in error and "not found upstream" in error, error
    assert model_dirs(tmp_path / "tfhub") == []


# -- which handles the shim claims, and where it sends them (pure) ---------------------------

@pytest.mark.parametrize("handle, path", [
    ("https://tfhub.dev/google/x/1", "/google/x/1"),
    ("https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5/",
     "/google/imagenet/mobilenet_v2_100_224/classification/5"),
    ("https://tfhub.dev/google/x/1?tf-hub-format=compressed", "/google/x/1"),
    ("http://tfhub.dev/google/x/1", "/google/x/1"),
    ("https://www.kaggle.com/models/google/x/frameworks/tensorFlow2/variations/default/versions/1",
     "/models/google/x/frameworks/tensorFlow2/variations/default/versions/1"),
    ("https://kaggle.com/models/google/x/frameworks/tensorFlow2/variations/default/versions/1",
     "/models/google/x/frameworks/tensorFlow2/variations/default/versions/1"),
    ("https://hub.tensorflow.google.cn/google/x/1", "/google/x/1"),
])
def test_hub_handles_map_to_the_same_model_on_the_mirror(handle, path):
    assert shim.is_mirrored(handle)
    assert shim.mirror_url("http://mirror:8080", handle) == f"http://mirror:8080{path}?tf-hub-format=compressed"


@pytest.mark.parametrize("handle", [
    "http://mirror:8080/google/x/1",
    "https://storage.googleapis.com/tfhub-modules/google/x/1.tar.gz",
    "https://www.kaggle.com/competitions/x",
    "https://tfhub.dev.example.com/google/x/1",
    "https://user@tfhub.dev/google/x/1",
    "gs://tfhub-modules/google/x/1.tar.gz",
    "/tmp/saved_model",
])
def test_other_handles_are_not_claimed(handle):
    assert not shim.is_mirrored(handle)


def test_a_mirror_under_a_path_keeps_its_path():
    assert (shim.mirror_url("https://hub.internal/tfhub", "https://tfhub.dev/google/x/1")
            == "https://hub.internal/tfhub/google/x/1?tf-hub-format=compressed")


# -- bad input -------------------------------------------------------------------------------

def test_use_mirror_with_no_url_and_no_hubproxy_mirror_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("HUBPROXY_MIRROR", raising=False)
    with pytest.raises(ValueError, match="HUBPROXY_MIRROR") as raised:
        hubproxy.use_mirror()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("url", ["ftp://mirror:8080", "mirror:8080", "http://", "http://mirror:8080/?x=1",
                                 "http://mirror:8080/#top"])
def test_use_mirror_refuses_what_is_not_an_http_base_url(url):
    with pytest.raises(ValueError, match="http") as raised:
        hubproxy.use_mirror(url)
    assert "\n" not in str(raised.value) and repr(url) in str(raised.value)


def test_a_bad_hubproxy_mirror_is_named_as_the_culprit(monkeypatch):
    monkeypatch.setenv("HUBPROXY_MIRROR", "mirror:8080")
    with pytest.raises(ValueError, match="HUBPROXY_MIRROR") as raised:
        hubproxy.use_mirror()
    assert "\n" not in str(raised.value)


# -- importing hubproxy stays cheap ----------------------------------------------------------

HEAVY = ("tensorflow", "tensorflow_hub", "tf_keras", "aiohttp", "diskcache", "cryptography", "click", "rich")


@pytest.mark.parametrize("statement", ["import hubproxy", "import hubproxy.shim",
                                       "import hubproxy; hubproxy.use_mirror"])
def test_importing_hubproxy_pulls_no_tensorflow_and_no_server_dependency(statement):
    probe = (f"{statement}; import sys; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=_quiet_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
