"""The command line never prints a traceback: a bad path, an unopenable or read-only cache dir, a
missing key directory, a file that is not UTF-8 text, a handle the admin API would refuse each end
in one line naming the path (or text) at fault, with exit status 2 (the operator's error), while 1
stays for findings (a failed handle, a bad blob)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from hubproxy.cache.store import Store
from hubproxy.cli.failures import GuardedGroup
from tests.conftest import ROOT, _quiet_env, run_cli
from tests.test_cache_disk_full import small_disk  # noqa: F401  (the tmpfs fixture, mounted per test)

CACHE_COMMANDS = [["ls"], ["stats"], ["verify"], ["pin", "tfhub:/google/x/1"], ["unpin", "tfhub:/google/x/1"],
                  ["purge", "tfhub:/google/x/1"], ["evict", "--max-size", "1G"]]


def _serve(cache_dir, *args: object) -> subprocess.CompletedProcess:
    """`hubproxy serve` expected to refuse at once (the timeout only bounds a broken build)."""
    return subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--listen", "127.0.0.1:0",
                           "--cache-dir", str(cache_dir), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=_quiet_env())


def _one_line_naming(result: subprocess.CompletedProcess, path, *words: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert result.returncode == 2, (result.returncode, result.stderr)


def _every_command(cache_dir, *args: object):
    yield _serve(cache_dir, *args)
    for command in CACHE_COMMANDS:
        yield run_cli("cache", *command, "--cache-dir", cache_dir, *args)


def test_a_cache_dir_that_is_a_file_is_named_by_serve_and_every_cache_command(tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file, not a directory")
    for result in _every_command(not_a_dir):
        _one_line_naming(result, not_a_dir, "not a directory")


def test_an_unopenable_index_is_one_line_naming_the_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    (cache / "index").mkdir(parents=True)
    (cache / "index" / "cache.db").write_text("not a database")
    for result in _every_command(cache):
        _one_line_naming(result, cache)


def test_a_read_only_cache_dir_is_one_line_naming_it_for_every_command_that_writes(small_disk):  # noqa: F811
    """Reading commands work on such a cache (tests/test_read_only_cache_mount.py)."""
    Store(small_disk.cache_dir).close()  # a real cache, then the disk turns read-only under it
    small_disk.make_cache_read_only()
    writing = [c for c in CACHE_COMMANDS if c[0] not in ("ls", "stats", "verify")]
    try:
        for result in [_serve(small_disk.cache_dir)] + [run_cli("cache", *c, "--cache-dir", small_disk.cache_dir)
                                                        for c in writing]:
            _one_line_naming(result, small_disk.cache_dir, "read-only")
    finally:
        small_disk.make_cache_writable()


def test_keys_generate_into_a_missing_directory_names_it(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = run_cli("keys", "generate", "--out", missing / "signing.pem")
    _one_line_naming(result, missing, "does not exist")
    assert not missing.exists()


@pytest.mark.parametrize("args", [
    ["cache", "ls", "--cache-dir", "{tmp}/never-made"],  # a bad path
    ["cache", "evict", "--cache-dir", "{tmp}"],  # usage: nothing to evict by
    ["frobnicate"],  # no such command
])
def test_the_operators_mistakes_exit_2(tmp_path, args):
    result = run_cli(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


NOT_UTF8 = b"\xff\xfe not text \xc3("


def test_a_config_file_that_is_not_utf8_is_named_by_serve_and_every_cache_command(tmp_path):
    config = tmp_path / "hubproxy.toml"
    config.write_bytes(b'cache_dir = "' + NOT_UTF8 + b'"\n')
    for result in _every_command(tmp_path / "cache", "--config", config):
        _one_line_naming(result, config, "not UTF-8")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", [["warmup", "--tfhub-dir", "{tmp}/tfhub"],
                                     ["bundle", "export", "--out", "{tmp}/b.tar", "--via", "http://127.0.0.1:9"]])
def test_a_handle_list_that_is_not_utf8_is_named(tmp_path, command):
    handle_list = tmp_path / "models.txt"
    handle_list.write_bytes(b"https://tfhub.dev/google/x/1\nhttps://tfhub.dev/google/" + NOT_UTF8 + b"/1\n")
    result = run_cli(*[arg.format(tmp=tmp_path) for arg in command], "--file", handle_list)
    _one_line_naming(result, handle_list, "not UTF-8")
    assert not (tmp_path / "b.tar").exists()


def test_a_tfhub_descriptor_that_is_not_utf8_shows_an_unknown_handle(tmp_path):
    """tensorflow_hub writes the descriptor; one garbled by a disk or a hand is unreadable, not fatal."""
    tfdir = tmp_path / "tfhub"
    (tfdir / "0123abcd").mkdir(parents=True)  # no saved_model.pb: a finding that needs no tensorflow to see
    (tfdir / "0123abcd.descriptor.txt").write_bytes(b"Module: " + NOT_UTF8 + b"\n")
    listed = run_cli("tfcache", "ls", "--tfhub-dir", tfdir)
    assert "Traceback" not in listed.stderr and listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines() if "0123abcd" in line] == [["0123abcd", "?"]]
    verified = run_cli("tfcache", "verify", "--tfhub-dir", tfdir)
    assert "Traceback" not in verified.stderr, verified.stderr
    assert verified.returncode == 1 and "BAD 0123abcd ?: no saved_model.pb" in verified.stdout, verified


def test_the_last_resort_turns_text_that_is_not_utf8_into_one_line(tmp_path):
    """Whatever a command forgot to check, a file that is not UTF-8 ends in one line, exit 2."""
    garbled = tmp_path / "notes.txt"
    garbled.write_bytes(NOT_UTF8)

    @click.group(cls=GuardedGroup)
    def main() -> None:
        pass

    @main.command()
    def read() -> None:
        garbled.read_text(encoding="utf-8")

    result = CliRunner().invoke(main, ["read"])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, UnicodeDecodeError)
    assert result.output.strip().count("\n") == 0 and "not UTF-8" in result.output, result.output


@pytest.mark.parametrize("parent_is", ["missing", "a file"])
def test_bundle_export_into_no_directory_names_the_out_path_and_fetches_nothing(proxy, origin, archives, tmp_path,
                                                                                parent_is):
    model = origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[0] == 200
    parent = tmp_path / "nodir"
    if parent_is == "a file":
        parent.write_text("a file, not a directory")
    out = parent / "b.tar"
    result = run_cli("bundle", "export", "--out", out, "--cache-dir", proxy.cache_dir,
                     f"https://tfhub.dev/{model.handle}")
    _one_line_naming(result, out, "does not exist" if parent_is == "missing" else "not a directory")
    assert ".part" not in result.stderr and "fetching" not in result.stderr
    assert parent.is_file() if parent_is == "a file" else not parent.exists()


def test_keys_generate_beside_a_file_says_it_is_no_directory(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("a file, not a directory")
    result = run_cli("keys", "generate", "--out", a_file / "k.pem")
    _one_line_naming(result, a_file, "not a directory")
    assert "does not exist" not in result.stderr


@pytest.mark.parametrize("ca_dir", ["afile", "afile/ca"])
def test_ca_init_into_a_file_says_the_ca_dir_is_no_directory(tmp_path, ca_dir):
    (tmp_path / "afile").write_text("a file, not a directory")
    result = run_cli("ca", "init", "--ca-dir", tmp_path / ca_dir)
    _one_line_naming(result, tmp_path / ca_dir, "not a directory")
    assert "File exists" not in result.stderr
    assert (tmp_path / "afile").read_text() == "a file, not a directory"


@pytest.mark.parametrize("typed, why", [
    ("bad handle", "spaces"),
    ("google/x/1", "neither a handle URL"),
    ("ftp:/google/x/1", "no upstream"),
    ("https://tfhub.dev/google", "tfhub.dev"),
    ("tfhub:/google/x/1\nX", "control characters"),
    ("tfhub:/google/$(x)*", "no glob"),
])
def test_cache_commands_refuse_a_handle_or_glob_the_admin_api_refuses(tmp_path, typed, why):
    """The same check as POST /admin/purge's: a typo is named, never a silent 'removed 0 entries'."""
    cache = tmp_path / "cache"
    Store(cache).close()
    for command in (["purge"], ["purge", "--dry-run"], ["pin"], ["unpin"], ["evict"]):
        result = run_cli("cache", *command, "--cache-dir", cache, typed)
        _one_line_naming(result, typed.splitlines()[0], why)
