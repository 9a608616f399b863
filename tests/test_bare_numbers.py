"""Where a unit decides, a bare number is refused with a one-line hint: `--older-than 3` would be
three seconds and `--max-size 200` two hundred bytes, and either empties the whole cache."""

from __future__ import annotations

import json

import pytest

from hubproxy.config import ConfigError, load_settings
from hubproxy.units import parse_duration, parse_size
from tests.conftest import run_cli


@pytest.mark.parametrize("bare", ["200", "0", "1.5", " 7 "])
def test_a_bare_size_is_refused_with_a_hint(bare):
    with pytest.raises(ValueError, match=rf"no unit.*{bare.strip()}G.*{bare.strip()}B"):
        parse_size(bare)


@pytest.mark.parametrize("bare", ["3", "0", "2.5"])
def test_a_bare_duration_is_refused_with_a_hint(bare):
    with pytest.raises(ValueError, match=rf"no unit.*{bare}d.*{bare}s"):
        parse_duration(bare)


@pytest.mark.parametrize("text, size", [("0B", 0), ("200B", 200), ("200G", 200 << 30), ("512MiB", 512 << 20),
                                        ("4K", 4096), ("1kb", 1024)])
def test_sizes_with_a_unit_are_taken(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, seconds", [("0s", 0), ("3d", 3 * 86400), ("1w", 604800)])
def test_durations_with_a_unit_are_taken(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("name", ["max_size", "min_free", "drain_timeout", "header_timeout"])
def test_a_bare_size_or_duration_in_the_config_environment_or_serve_flags_is_refused(tmp_path, name):
    toml = tmp_path / "hubproxy.toml"
    toml.write_text(f'{name} = "200"\n')
    with pytest.raises(ConfigError, match=f"{name}: .*no unit"):
        load_settings(toml, environ={})
    with pytest.raises(ConfigError, match=f"{name}: .*no unit"):
        load_settings(environ={f"HUBPROXY_{name.upper()}": "200"})
    with pytest.raises(ConfigError, match=f"{name}: .*no unit"):
        load_settings(environ={}, overrides={name: "200"})  # serve --max-size, --drain-timeout...


def test_cache_evict_with_a_bare_number_refuses_and_removes_nothing(proxy, origin, archives):
    model = origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[1]["X-Cache"] == "MISS"
    proxy.stop()

    by_age = run_cli("cache", "evict", "--older-than", "3", "--cache-dir", proxy.cache_dir)
    by_size = run_cli("cache", "evict", "--max-size", "200", "--cache-dir", proxy.cache_dir)

    for result, hint in ((by_age, "3d"), (by_size, "200G")):
        assert result.returncode == 2, result.stderr
        assert "no unit" in result.stderr and hint in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    listed = run_cli("cache", "ls", "--json", "--cache-dir", proxy.cache_dir)
    assert [entry["key"] for entry in json.loads(listed.stdout)] == [f"tfhub:/{model.handle}"]

