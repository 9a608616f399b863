"""What the commands share: settings from flags/env/TOML, opening a cache dir, shared options.

Invariants: every failure the operator can cause ends in a one-line message, never a traceback
(see failures); flags override HUBPROXY_* variables, which override the TOML file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import click

from ..cache.store import Store
from ..config import ENV_PREFIX, ConfigError, Settings, load_settings
from .failures import directory_errors, fail, path_problem

CACHE_DIR = "cache dir"


@contextlib.contextmanager
def opened_cache(cache_dir: Path, *, must_exist: bool = True, read_only: bool = False) -> Iterator[Store]:
    """The hubproxy cache at cache_dir, closed afterwards; any trouble opening or using it is one
    line naming the directory. must_exist: refuse a directory that holds no cache yet. read_only:
    open it without writing a byte (commands that only read; serve --read-only)."""
    with directory_errors(cache_dir, CACHE_DIR):
        if must_exist and not (cache_dir / "index").is_dir():
            fail(path_problem(cache_dir, CACHE_DIR) or f"{cache_dir} is not a hubproxy cache dir (no index)")
        if not read_only and on_read_only_mount(cache_dir):
            fail(f"cache dir {cache_dir} is on a read-only filesystem: this needs to write to it"
                 " (hubproxy serve --read-only serves such a cache without writing)")
        store = Store(cache_dir, read_only=read_only)
        try:
            yield store
        finally:
            store.close()


def on_read_only_mount(cache_dir: Path) -> bool:
    """Whether the nearest existing directory at or above cache_dir is on a read-only mount."""
    for directory in (cache_dir, *cache_dir.parents):
        try:
            return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        except FileNotFoundError:
            continue
    return False


def settings_or_exit(config_file, flags) -> Settings:
    try:
        return load_settings(config_file=config_file, overrides=flags)
    except ConfigError as e:
        fail(str(e))


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def parsed(parser, text: str, option: str):
    """A flag's value through a units parser; a malformed one is a one-line failure naming the flag."""
    try:
        return parser(text)
    except ValueError as e:
        fail(f"{option}: {e}")


def tfhub_dir_option(help_text: str, *, required: bool = True, exists: bool = False):
    """--tfhub-dir: a TFHUB_CACHE_DIR, the directory tensorflow_hub loads from; $TFHUB_CACHE_DIR by default."""
    return click.option("--tfhub-dir", "tfdir", envvar="TFHUB_CACHE_DIR", show_envvar=True, required=required,
                        type=click.Path(file_okay=False, exists=exists, path_type=Path), metavar="DIR", help=help_text)


def source_cache_option(help_text: str):
    """--cache-dir where a command reads archives from a hubproxy cache dir (never its default one)."""
    return click.option("--cache-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
                        metavar="DIR", help=help_text)


def setting_option(flag: str, setting: str, help_text: str, default: str | None = None, **kwargs):
    """An option that overrides a setting; its help names the HUBPROXY_* variable. load_settings reads
    the variable, not click, so the order flags > environment > TOML lives in one place."""
    notes = [f"env var: {ENV_PREFIX}{setting.upper()}"] + ([f"default: {default}"] if default else [])
    return click.option(flag, setting, help=f"{help_text}  [{'; '.join(notes)}]", **kwargs)


def config_option(help_text: str = "TOML settings file (settings it names yield to HUBPROXY_* and flags)."):
    return click.option("--config", "config_file", type=click.Path(dir_okay=False), help=help_text)


def json_option(command):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(command)


def upstream_options(command):
    """--config, --upstream, --allow-redirect-host and --egress-proxy, for commands that may fetch from upstream."""
    for option in reversed([
        config_option(),
        setting_option("--upstream", "upstreams",
                       "Upstream base URL, NAME one of tfhub, kaggle, gcs, kaggle-api. Repeatable.",
                       multiple=True, metavar="NAME=URL"),
        setting_option("--allow-redirect-host", "allow_redirect_hosts",
                       "A host upstream redirects may lead to. Repeatable; replaces the default list.",
                       multiple=True, metavar="HOST[:PORT]"),
        setting_option("--egress-proxy", "egress_proxy",
                       "The forward proxy every upstream hop goes through (not the parents), where the network "
                       "must leave through one; the allowlist still applies. Credentials in the URL are never "
                       "logged.", metavar="http://[USER:PASSWORD@]HOST:PORT"),
    ]):
        command = option(command)
    return command
