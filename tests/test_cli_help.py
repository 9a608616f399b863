"""Help that helps: every option says what it is for, every command shows an example, environment
variables are named where they apply, tables carry a header row, an empty listing says so, and a
private key handed to --verify-key is called one."""

from __future__ import annotations

import click
import pytest

from hubproxy.cli import main
from hubproxy.config import ENV_PREFIX, Settings
from tests.conftest import run_cli

SETTINGS = {field for field in Settings.__dataclass_fields__}


def _commands(command: click.Command, path: tuple[str, ...] = ("hubproxy",)):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict((" ".join(path), command) for path, command in _commands(main))


def _help_text(command: click.Command, path: str) -> str:
    with click.Context(command, info_name=path) as ctx:
        return command.get_help(ctx)


@pytest.mark.parametrize("path", COMMANDS)
def test_every_command_shows_an_example(path):
    assert "Example" in _help_text(COMMANDS[path], path)


@pytest.mark.parametrize("path", COMMANDS)
def test_every_option_has_help(path):
    bare = [param.opts[0] for param in COMMANDS[path].params
            if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert bare == [], f"{path}: options without help"


def _env_backed(path: str, param: click.Option) -> str | None:
    """The environment variable an option stands for, if any: TFHUB_CACHE_DIR for --tfhub-dir; the
    HUBPROXY_* setting for the options that override a setting (every one of serve's, the cache
    group's --cache-dir, the upstream flags). warmup's and bundle's --cache-dir name a source instead."""
    if param.name == "tfdir":
        return "TFHUB_CACHE_DIR"
    overrides_setting = (path == "hubproxy serve" or param.name in ("upstreams", "allow_redirect_hosts")
                         or (path.startswith("hubproxy cache ") and param.name == "cache_dir"))
    if overrides_setting and param.name in SETTINGS:
        return ENV_PREFIX + param.name.upper()
    return None


@pytest.mark.parametrize("path", COMMANDS)
def test_options_backed_by_the_environment_name_it(path):
    command = COMMANDS[path]
    with click.Context(command, info_name=path) as ctx:
        for param in command.params:
            variable = isinstance(param, click.Option) and _env_backed(path, param)
            if variable:
                record = param.get_help_record(ctx)
                assert record and variable in record[1], f"{path} {param.opts[0]} does not name {variable}"


def test_tables_have_a_header_row_off_a_terminal(tmp_path):
    tfdir = tmp_path / "tfhub"
    (tfdir / ("a" * 40)).mkdir(parents=True)
    (tfdir / ("a" * 40) / "saved_model.pb").write_bytes(b"\x08\x01")
    (tmp_path / "cache" / "index").mkdir(parents=True)

    listed = run_cli("tfcache", "ls", "--tfhub-dir", tfdir)
    stats = run_cli("cache", "stats", "--cache-dir", tmp_path / "cache")

    assert listed.stdout.splitlines()[0].split("\t") == ["directory", "handle", "files", "size", "loadable"]
    assert listed.stdout.splitlines()[1].startswith("a" * 40)
    assert stats.stdout.splitlines()[0].split("\t") == ["stat", "value"]


def test_cache_ls_on_an_empty_cache_says_so_and_names_it(tmp_path):
    cache = tmp_path / "cache"
    (cache / "index").mkdir(parents=True)
    listed = run_cli("cache", "ls", "--cache-dir", cache)
    assert listed.returncode == 0
    assert "no entries" in listed.stdout and str(cache) in listed.stdout


def test_verify_key_given_the_private_key_says_it_is_one(tmp_path):
    key = tmp_path / "signing.pem"
    assert run_cli("keys", "generate", "--out", key).returncode == 0
    bundle = tmp_path / "models.tar"
    bundle.write_bytes(b"")

    result = run_cli("bundle", "import", bundle, "--verify-key", key, "--tfhub-dir", tmp_path / "tfhub")

    assert result.returncode == 2
    assert "private key" in result.stderr and "signing.pub.pem" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "tfhub").exists(), "a refused key writes nothing"
