"""Pure parts: handle routing/keys, the upstream host policy, and settings precedence."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from yarl import URL

from hubproxy.config import ConfigError, Settings, load_settings
from hubproxy.handles import BadHandle, parse_request_target, tfhub_cache_name
from hubproxy.units import parse_duration, parse_size
from hubproxy.fetch.errors import FetchFailed
from hubproxy.fetch.upstream import HostPolicy


@pytest.mark.parametrize("target, upstream, url", [
    ("/google/x/1?tf-hub-format=compressed", "tfhub", "https://tfhub.dev/google/x/1?tf-hub-format=compressed"),
    ("/google/x/1", "tfhub", "https://tfhub.dev/google/x/1?tf-hub-format=compressed"),
    ("/models/google/x/frameworks/tensorFlow2/variations/v/versions/1", "kaggle",
     "https://www.kaggle.com/models/google/x/frameworks/tensorFlow2/variations/v/versions/1?tf-hub-format=compressed"),
    ("/api/v1/models/google/x/tensorFlow2/v/1/download", "kaggle",
     "https://www.kaggle.com/api/v1/models/google/x/tensorFlow2/v/1/download"),
    ("/tfhub-modules/google/x/1.tar.gz", "gcs", "https://storage.googleapis.com/tfhub-modules/google/x/1.tar.gz"),
    ("/kaggle-models-data/123/x.tar.gz?X-Goog-Signature=abc", "gcs",
     "https://storage.googleapis.com/kaggle-models-data/123/x.tar.gz"),
])
def test_routing_by_path(target, upstream, url):
    handle = parse_request_target(target)
    assert handle.upstream == upstream
    assert handle.upstream_url(Settings().upstreams[upstream]) == url
    assert "?" not in handle.key


def test_query_and_slashes_do_not_split_the_cache_key():
    assert (parse_request_target("/google/x/1").key
            == parse_request_target("/google/x/1/?tf-hub-format=compressed").key)


def test_tfhub_cache_name_is_sha1_of_the_handle_as_typed():
    handle = "https://tfhub.dev/google/x/1"
    assert tfhub_cache_name(handle) == hashlib.sha1(handle.encode()).hexdigest()


@pytest.mark.parametrize("target", ["http://evil/x", "/a/../b", "/a/%2e/b", "/a/.hidden/b", "/a//b/c", ""])
def test_bad_targets(target):
    with pytest.raises(BadHandle):
        parse_request_target(target)


def test_host_policy_allows_upstreams_and_allowlist_only():
    policy = HostPolicy(Settings())
    policy.check(URL("https://tfhub.dev/google/x/1"))
    policy.check(URL("https://storage.googleapis.com/kaggle-models-data/1/x.tar.gz?sig=1"))
    policy.check(URL("https://www.kaggle.com/api/v1/models/a/b/c/d/1/download"))
    for url in ("https://169.254.169.254/latest/meta-data", "https://storage.googleapis.com:8443/x",
                "https://evil.example/x", "file:///etc/passwd"):
        with pytest.raises(FetchFailed):
            policy.check(URL(url))


def test_parents_are_a_list_in_toml_and_env_and_allowed_hosts(tmp_path):
    toml = tmp_path / "hubproxy.toml"
    toml.write_text('parents = ["http://regional-a:8080", "https://regional-b"]\n')
    settings = load_settings(toml, environ={})
    assert settings.parents == ("http://regional-a:8080", "https://regional-b")
    assert settings.upstream_base("gcs") == "http://regional-a:8080"
    assert load_settings(environ={"HUBPROXY_PARENTS": "http://a:1, http://b:2"}).parents == ("http://a:1", "http://b:2")
    policy = HostPolicy(settings)
    policy.check(URL("http://regional-a:8080/google/x/1"))
    policy.check(URL("https://regional-b/google/x/1"))
    with pytest.raises(FetchFailed):
        policy.check(URL("http://regional-a:9999/x"))


def test_host_policy_refuses_https_downgrade():
    policy = HostPolicy(Settings())
    with pytest.raises(FetchFailed, match="https to plain http"):
        policy.check(URL("http://storage.googleapis.com/x"), previous=URL("https://www.kaggle.com/y"))


def test_precedence_defaults_toml_env_flags(tmp_path):
    toml = tmp_path / "hubproxy.toml"
    toml.write_text('listen = "0.0.0.0:9000"\nretries = 7\ncache_dir = "/from/toml"\n'
                    '[upstreams]\ngcs = "http://127.0.0.1:1"\n')
    env = {"HUBPROXY_RETRIES": "5", "HUBPROXY_CACHE_DIR": "/from/env", "UNRELATED": "x"}

    settings = load_settings(toml, environ=env, overrides={"cache_dir": "/from/flag", "listen": None})

    assert settings.listen == "0.0.0.0:9000"  # TOML over default
    assert settings.retries == 5  # env over TOML
    assert settings.cache_dir == "/from/flag"  # flag over env
    assert settings.upstreams["gcs"] == "http://127.0.0.1:1"
    assert settings.upstreams["tfhub"] == "https://tfhub.dev"  # untouched default
    assert settings.backoff_seconds == Settings().backoff_seconds



def test_the_deadlines_and_floors_default_to_their_documented_values():
    """Pinned: a default that drifts (aiohttp's hour-long keep-alive, no pace floor, minutes to a
    504) is an outage waiting for a slow client or a sick upstream."""
    defaults = Settings()

    assert (defaults.header_timeout_seconds, defaults.keepalive_timeout_seconds) == (30, 75)
    assert (defaults.upstream_min_rate_bytes, defaults.upstream_rate_window_seconds) == (64 << 10, 30)
    assert defaults.upstream_headers_deadline_seconds == 60
    assert defaults.upstream_resumes == 3
    assert load_settings(environ={}) == defaults


def test_upstream_flags_and_env_lists():
    settings = load_settings(environ={"HUBPROXY_ALLOW_REDIRECT_HOSTS": "a.example, b.example:8443"},
                             overrides={"upstreams": ("tfhub=http://127.0.0.1:5",)})
    assert settings.allow_redirect_hosts == ("a.example", "b.example:8443")
    assert settings.upstreams["tfhub"] == "http://127.0.0.1:5"


@pytest.mark.parametrize("toml, message", [
    ("nonsense = 1\n", "unknown setting 'nonsense'"),
    ("retries = 'many'\n", "bad value for retries"),
    ("[upstreams]\nmirror = 'http://x'\n", "unknown upstream 'mirror'"),
    ("[upstreams]\ntfhub = 'ftp://x'\n", "must be an http(s) URL"),
    ("listen = 'nowhere'\n", "listen must be HOST:PORT"),
    ("listen = \n", "not valid TOML"),
    ("parents = ['ftp://regional:8080']\n", "parent must be an http(s) base URL"),
])
def test_bad_settings_are_one_line_errors(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(path, environ={})


def test_cli_reports_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("nonsense = 1\n")
    result = subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown setting 'nonsense'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text, size", [("250K", 256_000), ("1.5G", int(1.5 * 2**30)), ("2GiB", 2 << 30), ("4096B", 4096)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "x", "1Q", "-1", "10 parsecs"])
def test_malformed_sizes_and_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size(bad)
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_mode_fallback_is_a_mode_again(tmp_path):
    """`fallback` answers kagglehub's metadata from the stored copy when upstream fails (see
    tests/test_kagglehub_through_mirror.py); a TOML key, a variable and the flag all take it."""
    toml = tmp_path / "hubproxy.toml"
    toml.write_text('mode = "fallback"\n')
    for kwargs in ({"config_file": toml, "environ": {}}, {"environ": {"HUBPROXY_MODE": "fallback"}}):
        assert load_settings(**kwargs).mode == "fallback"
    flag = subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert "online|offline|fallback" in flag.stdout.replace("\n", "")
    with pytest.raises(ConfigError, match="mode must be one of online, offline, fallback"):
        load_settings(environ={"HUBPROXY_MODE": "sometimes"})
