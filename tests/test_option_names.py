"""One name, one meaning: `--cache-dir` is always a hubproxy cache and `--tfhub-dir` (default
$TFHUB_CACHE_DIR) always a TFHUB_CACHE_DIR, in every command; the old spellings are gone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _quiet_env, hub_load_offline, loaded_output, run_cli


def _cli_with_tfhub_cache_dir(tfdir, *args) -> subprocess.CompletedProcess:
    """The command line with TFHUB_CACHE_DIR set, as in a shell that tensorflow_hub also reads."""
    return subprocess.run([sys.executable, "-m", "hubproxy", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=_quiet_env(TFHUB_CACHE_DIR=str(tfdir)))


@pytest.mark.parametrize("args, complaint", [
    (["warmup", "--tfhub-dir", "{tmp}/t", "--from-cache", "{tmp}", "https://tfhub.dev/a/b/1"],
     ("No such option", "--from-cache")),
    (["bundle", "export", "--out", "{tmp}/b.tar", "--from-cache", "{tmp}", "https://tfhub.dev/a/b/1"],
     ("No such option", "--from-cache")),
    (["bundle", "import", "{tmp}/b.tar", "--allow-unsigned", "--proxy-cache", "{tmp}/c"],
     ("No such option", "--proxy-cache")),
    (["tfcache", "ls", "--tfhub-dir", "{tmp}", "{tmp}"], ("unexpected extra argument",)),
])
def test_old_spellings_are_refused(tmp_path, args, complaint):
    (tmp_path / "b.tar").write_bytes(b"")
    result = run_cli(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 2, result.stderr
    assert all(word in result.stderr for word in complaint), result.stderr


def test_warmup_reads_cache_dir_and_writes_tfhub_cache_dir_by_default(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[0] == 200
    handle = f"https://tfhub.dev/{model.handle}"
    tfdir = tmp_path / "tfhub-from-env"

    warmed = _cli_with_tfhub_cache_dir(tfdir, "warmup", "--cache-dir", proxy.cache_dir, handle)
    listed = _cli_with_tfhub_cache_dir(tfdir, "tfcache", "ls", "--json")
    verified = _cli_with_tfhub_cache_dir(tfdir, "tfcache", "verify")

    assert warmed.returncode == 0, warmed.stderr
    assert [entry["handle"] for entry in json.loads(listed.stdout)] == [handle]
    assert verified.returncode == 0, verified.stdout
    assert loaded_output(hub_load_offline(handle, tfdir)) == archives.expected(archives.small)


def test_bundle_import_takes_one_destination(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[0] == 200
    bundle = tmp_path / "models.tar"
    exported = run_cli("bundle", "export", "--out", bundle, "--cache-dir", proxy.cache_dir,
                       f"https://tfhub.dev/{model.handle}")
    assert exported.returncode == 0, exported.stderr
    tfdir, seeded = tmp_path / "tfhub", tmp_path / "seeded-cache"

    both = run_cli("bundle", "import", bundle, "--allow-unsigned", "--tfhub-dir", tfdir, "--cache-dir", seeded)
    assert both.returncode == 2 and "--tfhub-dir or --cache-dir, not both" in both.stderr
    assert not tfdir.exists() and not seeded.exists()

    # TFHUB_CACHE_DIR is only a default: an explicit --cache-dir seeds the proxy cache instead.
    into_cache = _cli_with_tfhub_cache_dir(tfdir, "bundle", "import", bundle, "--allow-unsigned",
                                           "--cache-dir", seeded)
    assert into_cache.returncode == 0, into_cache.stderr
    assert not tfdir.exists()
    listed = run_cli("cache", "ls", "--json", "--cache-dir", seeded)
    assert [entry["key"] for entry in json.loads(listed.stdout)] == [f"tfhub:/{model.handle}"]

    into_tfdir = _cli_with_tfhub_cache_dir(tfdir, "bundle", "import", bundle, "--allow-unsigned")
    assert into_tfdir.returncode == 0, into_tfdir.stderr
    assert loaded_output(hub_load_offline(f"https://tfhub.dev/{model.handle}", tfdir)) == archives.expected(
        archives.small)
