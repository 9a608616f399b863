"""`hubproxy cache`: inspect and steer a hubproxy cache, safe while a proxy serves from it.

Invariants: the cache is opened through common.opened_cache, so a missing, broken or (to a command
that writes) read-only cache dir is one line naming it; a command that only reads (ls, stats, a
--dry-run, verify on a read-only mount) opens it read-only and writes nothing; sizes, durations
(units required) and handles or globs (checked as the admin API checks them: plans.pattern) are
parsed before the cache is touched; eviction never takes a pinned entry, and a purge that matches
one removes nothing unless --include-pinned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from typing import Iterator

import click

from ..cache import plans, scrub
from ..cache.operations import carry_out, set_pinned
from ..cache.store import Store
from ..config import Settings
from ..fetch.oneshot import refetch
from ..handles import BadHandle
from ..units import format_size, parse_duration, parse_size
from . import console
from .common import (
    config_option,
    json_option,
    on_read_only_mount,
    opened_cache,
    parsed,
    setting_option,
    settings_or_exit,
)
from .failures import exit_if_found, fail


def _cache_options(command):
    command = config_option("TOML settings file (for cache_dir and upstreams).")(command)
    return setting_option("--cache-dir", "cache_dir", "The hubproxy cache dir (as serve's).", "~/.cache/hubproxy",
                          metavar="DIR")(command)


@contextlib.contextmanager
def _cache(cache_dir, config_file, *, read_only: bool = False) -> Iterator[tuple[Store, Settings]]:
    """read_only: the command only reads, so it works on a cache on a read-only mount."""
    settings = settings_or_exit(config_file, {"cache_dir": cache_dir})
    with opened_cache(settings.cache_path, read_only=read_only) as store:
        yield store, settings


def _patterns(typed: tuple[str, ...]) -> list[str]:
    """Handles as typed (URLs), keys, paths, or globs of keys and paths → match patterns, checked as
    the admin API checks them; the first that is none is a one-line failure."""
    try:
        return plans.patterns(list(typed))
    except BadHandle as e:
        fail(str(e))


@click.group("cache")
def group() -> None:
    """Inspect and steer a hubproxy cache (safe while a proxy serves from it).

    HANDLE is a handle as typed (https://tfhub.dev/...), an index key (tfhub:/google/x/1), a mirror
    path (/google/x/1) or a glob of keys or paths.

    \b
    Example:
      hubproxy cache ls --cache-dir /var/cache/hubproxy
      HUBPROXY_CACHE_DIR=/var/cache/hubproxy hubproxy cache evict --older-than 30d --dry-run
    """


@group.command("ls")
@_cache_options
@json_option
def cache_ls(cache_dir, config_file, as_json) -> None:
    """Each entry: handle, size, sha256, fetched, last access, hits, pinned.

    \b
    Example:
      hubproxy cache ls --cache-dir /var/cache/hubproxy --json
    """
    with _cache(cache_dir, config_file, read_only=True) as (store, settings):
        entries = sorted(store.entries(), key=lambda e: e.key)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
    elif not entries:
        click.echo(f"no entries in cache dir {settings.cache_path}")
    else:
        console.summary(["handle", "size", "sha256", "fetched", "last access", "hits", "pinned"],
                        [[e.key, format_size(e.size), e.sha256[:16], console.when(e.fetched),
                          console.when(e.last_access), str(e.hits), "yes" if e.pinned else ""] for e in entries])


@group.command("stats")
@_cache_options
@json_option
def cache_stats(cache_dir, config_file, as_json) -> None:
    """Entries, bytes, hit ratio, free disk.

    \b
    Example:
      hubproxy cache stats --cache-dir /var/cache/hubproxy
    """
    with _cache(cache_dir, config_file, read_only=True) as (store, settings):
        entries = store.entries()
        free = shutil.disk_usage(settings.cache_path).free
    hits = sum(e.hits for e in entries)
    stats = {"entries": len(entries), "blobs": len({e.sha256 for e in entries}), "bytes": plans.usage(entries),
             "hits": hits, "fetches": len(entries),
             "hit_ratio": round(hits / (hits + len(entries)), 4) if entries else 0.0,
             "pinned": sum(e.pinned for e in entries),
             "free_bytes": free}
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    console.summary(["stat", "value"],
                    [[k, format_size(v) if k.endswith("bytes") else str(v)] for k, v in stats.items()])


@group.command("pin")
@_cache_options
@click.argument("handles", nargs=-1, required=True)
def cache_pin(cache_dir, config_file, handles) -> None:
    """Never evict these entries (warmed, audited models).

    \b
    Example:
      hubproxy cache pin https://tfhub.dev/google/x/1 'tfhub:/google/audited-*'
    """
    _set_pinned(cache_dir, config_file, handles, True)


@group.command("unpin")
@_cache_options
@click.argument("handles", nargs=-1, required=True)
def cache_unpin(cache_dir, config_file, handles) -> None:
    """Let these entries be evicted again.

    \b
    Example:
      hubproxy cache unpin https://tfhub.dev/google/x/1
    """
    _set_pinned(cache_dir, config_file, handles, False)


def _set_pinned(cache_dir, config_file, handles, pinned: bool) -> None:
    wanted = _patterns(handles)
    with _cache(cache_dir, config_file) as (store, _):
        changed = set_pinned(store, wanted, pinned)
    if not changed:
        fail(f"no cached entry matches {' '.join(handles)}")
    for key in changed:
        click.echo(f"{'pinned' if pinned else 'unpinned'} {key}")


@group.command("purge")
@_cache_options
@click.option("--dry-run", is_flag=True, help="Show what would go, changing nothing (works on a read-only cache too).")
@click.option("--include-pinned", is_flag=True, help="Purge matching pinned entries too (without it, any "
              "pinned match refuses the whole purge).")
@click.argument("patterns", nargs=-1, required=True, metavar="HANDLE_OR_GLOB...")
def cache_purge(cache_dir, config_file, dry_run, include_pinned, patterns) -> None:
    """Drop entries now (a bad upstream release, a legal request); pinned ones only when asked.

    \b
    Example:
      hubproxy cache purge 'tfhub:/google/bad-*' --dry-run
    """
    wanted = _patterns(patterns)
    with _cache(cache_dir, config_file, read_only=dry_run) as (store, _):
        plan = plans.matching(store.entries(), wanted, include_pinned=True)
        if plan.pinned and not include_pinned:
            fail(f"{plan.pinned} of the {len(plan.keys)} matching entries are pinned; nothing was removed "
                 "(give --include-pinned to purge them too)")
        _apply(store, plan, dry_run)


@group.command("evict")
@_cache_options
@click.option("--max-size", metavar="SIZE", help="Evict least recently used until the cache is at most SIZE "
              "(with its unit: 200G, 0B).")
@click.option("--older-than", metavar="DURATION", help="Evict entries unused for DURATION (with its unit: 30d, 12h).")
@click.option("--dry-run", is_flag=True, help="Show what would go, changing nothing (works on a read-only cache too).")
@click.argument("patterns", nargs=-1, metavar="[HANDLE_OR_GLOB...]")
def cache_evict(cache_dir, config_file, max_size, older_than, dry_run, patterns) -> None:
    """Evict by size, by age, or by name; pinned entries always stay.

    \b
    Example:
      hubproxy cache evict --max-size 200G
      hubproxy cache evict --older-than 30d --dry-run
    """
    if sum(bool(x) for x in (max_size, older_than, patterns)) != 1:
        raise click.UsageError("give exactly one of --max-size, --older-than or HANDLE_OR_GLOB...")
    limit = parsed(parse_size, max_size, "--max-size") if max_size else None
    age = parsed(parse_duration, older_than, "--older-than") if older_than else None
    wanted = _patterns(patterns) if patterns else None
    with _cache(cache_dir, config_file, read_only=dry_run) as (store, _):
        entries = store.entries()
        if limit is not None:
            plan = plans.to_fit(entries, limit)
        elif age is not None:
            plan = plans.older_than(entries, age)
        else:
            plan = plans.matching(entries, wanted, include_pinned=False)
        _apply(store, plan, dry_run)


def _apply(store: Store, plan: plans.Plan, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for key in plan.keys:
        click.echo(f"{verb} {key}")
    if not dry_run:
        carry_out(store, plan)
    click.echo(f"{verb} {len(plan.keys)} entries, {format_size(plan.freed)}", err=True)


@group.command("verify")
@_cache_options
@click.option("--repair", is_flag=True, help="Re-fetch what was bad from upstream.")
def cache_verify(cache_dir, config_file, repair) -> None:
    """Re-hash every blob; quarantine bad ones (never served again); exit 1 naming each.

    \b
    Example:
      hubproxy cache verify --repair --config /etc/hubproxy.toml
    """
    settings = settings_or_exit(config_file, {"cache_dir": cache_dir})
    read_only = not repair and on_read_only_mount(settings.cache_path)  # then report, never quarantine
    with _cache(cache_dir, config_file, read_only=read_only) as (store, settings):
        findings = scrub.scrub(store)
        if not read_only:
            scrub.quarantine_all(store, findings)
        for finding in findings:
            done = "not quarantined: read-only cache" if read_only else "quarantined"
            click.echo(f"BAD {', '.join(finding.keys)}: {finding.problem} ({done})", err=True)
        if repair and findings:
            for key, problem in refetch(store, settings, [k for f in findings for k in f.keys]):
                click.echo(f"{'repaired' if problem is None else 'NOT repaired'} {key}"
                           + (f": {problem}" if problem else ""), err=True)
    click.echo(f"checked; {len(findings)} bad blobs")
    exit_if_found(findings)
