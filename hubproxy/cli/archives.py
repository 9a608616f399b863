"""Which models an offline command works on (HANDLEs, --alias, --file) and where their archives
come from (--via a mirror, --cache-dir a hubproxy cache dir, or upstream).

Invariants: every spelling is parsed before anything is fetched, so a typo costs no download.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..airgap import sources
from .common import CACHE_DIR, settings_or_exit
from .failures import directory_errors, fail


def spelling_groups(handles: tuple[str, ...], aliases: tuple[str, ...], handle_file) -> list[list[str]]:
    """Each group: one model's spellings, the first fetched. --alias belongs to a single HANDLE;
    a --file line may list several spellings of one model separated by spaces."""
    if aliases and len(handles) != 1:
        raise click.UsageError("--alias needs exactly one HANDLE (or list spellings on one --file line)")
    groups = [[handle, *aliases] for handle in handles] + _listed(handle_file)
    if not groups:
        raise click.UsageError("name at least one HANDLE (or --file LIST)")
    for group in groups:
        for spelling in group:
            try:
                sources.parse_handle(spelling)
            except sources.SourceError as e:
                raise click.UsageError(str(e)) from None
    return groups


def _listed(handle_file) -> list[list[str]]:
    """The spelling groups a --file lists, one per line that is not blank or a comment."""
    try:
        lines = list(handle_file or ())
    except UnicodeDecodeError as e:
        fail(f"--file {handle_file.name} is not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x})")
    return [spellings for line in lines if (spellings := line.split("#", 1)[0].split())]


def archive_source(via: str | None, cache_dir: Path | None, scratch: Path, settings_flags: dict):
    if via and cache_dir:
        raise click.UsageError("give --via or --cache-dir, not both")
    try:
        if via:
            return sources.MirrorSource(via, scratch)
        if cache_dir:
            with directory_errors(cache_dir, CACHE_DIR):
                return sources.CacheSource(cache_dir)
        return sources.UpstreamSource(settings_or_exit(settings_flags.pop("config_file"), settings_flags), scratch)
    except sources.SourceError as e:
        fail(str(e))

