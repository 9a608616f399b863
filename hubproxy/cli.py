"""Command line: serve | warmup | tfcache | keys | bundle | cache ls/stats/pin/unpin/purge/evict/verify.

Invariants: every failure the operator can cause ends in a one-line message and exit status 2,
never a traceback; flags override HUBPROXY_* variables, which override the TOML file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import shutil
import signal
import sys
import uuid
from pathlib import Path

import click
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import __version__, accesslog, bundle, client, evict, keys, sources, tfcache, ui, verify
from .config import ConfigError, Settings, load_settings
from .fastfront import FastFront
from .handles import BadHandle
from .store import Store
from .units import parse_duration, parse_size
from .server import create_app, quick_hit

log = logging.getLogger("hubproxy")


@click.group()
@click.version_option(__version__, prog_name="hubproxy")
def main() -> None:
    """hubproxy: a caching mirror for TensorFlow Hub model archives."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file.")
@click.option("--listen", help="HOST:PORT to serve on (port 0 picks a free one).  [default: 127.0.0.1:8080]")
@click.option("--cache-dir", help="Where archives and the index live.  [default: ~/.cache/hubproxy]")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=URL",
              help="Upstream base URL: tfhub=, kaggle= or gcs=. Repeatable.")
@click.option("--allow-redirect-host", "allow_redirect_hosts", multiple=True, metavar="HOST[:PORT]",
              help="A host upstream redirects may lead to. Repeatable; replaces the default list.")
@click.option("--retries", type=int, help="Extra attempts on 429/5xx/connection errors.  [default: 3]")
@click.option("--backoff-seconds", type=float, help="First retry delay, doubled each time.  [default: 0.5]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--max-size", help="Evict least recently used entries above SIZE (200G).")
@click.option("--min-free", help="Evict when the cache's disk has less than SIZE free.")
@click.option("--mode", type=click.Choice(["online", "fallback", "offline"]),
              help="offline never contacts upstream (a miss is a 504).  [default: online]")
def serve(config_file, **flags) -> None:
    """Serve the mirror until interrupted."""
    settings = _settings_or_exit(config_file, flags)
    _configure_logging(settings.log_level)
    try:
        asyncio.run(_serve(settings))
    except OSError as e:
        raise click.ClickException(f"cannot serve on {settings.listen}: {e.strerror or e}") from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_one_line_bad_requests)


def _one_line_bad_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs a traceback for every malformed request; a client's mistake deserves one line,
    without the offending bytes (they may hold a client's credentials)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "refused a malformed request: %s (%s)", (type(error).__name__, error.code)
        record.exc_info = record.exc_text = None
    return True


def _settings_or_exit(config_file, flags) -> Settings:
    try:
        return load_settings(config_file=config_file, overrides=flags)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


async def _serve(settings: Settings) -> None:
    access_log = accesslog.AccessLog(enabled=logging.getLogger("hubproxy").isEnabledFor(logging.INFO))
    app = create_app(settings)
    runner = web.AppRunner(app, access_log_class=access_log.aiohttp_logger_class(),
                           access_log=logging.getLogger("hubproxy.access"))
    await runner.setup()
    loop = asyncio.get_running_loop()
    front_connections: set[asyncio.Transport] = set()
    answer = functools.partial(quick_hit, app)
    listener = await loop.create_server(
        lambda: FastFront(answer, runner.server, access_log, front_connections),
        settings.listen_host, settings.listen_port, backlog=128)
    host, port = listener.sockets[0].getsockname()[:2]
    click.echo(f"hubproxy {__version__} listening on http://{host}:{port} (cache {settings.cache_path})", )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        for transport in list(front_connections):
            transport.close()
        await runner.cleanup()
        access_log.flush()


# -- offline clusters: warmup, tfcache, keys, bundles ------------------------------------------

def _fail(message: str) -> None:
    raise click.ClickException(message)


def _spelling_groups(handles: tuple[str, ...], aliases: tuple[str, ...], handle_file) -> list[list[str]]:
    """Each group: one model's spellings, the first fetched. --alias belongs to a single HANDLE;
    a --file line may list several spellings of one model separated by spaces."""
    if aliases and len(handles) != 1:
        raise click.UsageError("--alias needs exactly one HANDLE (or list spellings on one --file line)")
    groups = [[handle, *aliases] for handle in handles]
    for line in handle_file or ():
        spellings = line.split("#", 1)[0].split()
        if spellings:
            groups.append(spellings)
    if not groups:
        raise click.UsageError("name at least one HANDLE (or --file LIST)")
    for group in groups:
        for spelling in group:
            try:
                sources.parse_handle(spelling)
            except sources.SourceError as e:
                raise click.UsageError(str(e)) from None
    return groups


def _archive_source(via: str | None, from_cache: Path | None, scratch: Path, settings_flags: dict):
    if via and from_cache:
        raise click.UsageError("give --via or --from-cache, not both")
    try:
        if via:
            return sources.MirrorSource(via, scratch)
        if from_cache:
            return sources.CacheSource(from_cache)
        return sources.UpstreamSource(_settings_or_exit(settings_flags.pop("config_file"), settings_flags), scratch)
    except sources.SourceError as e:
        raise click.ClickException(str(e)) from None


def _upstream_options(command):
    for option in reversed([
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file."),
        click.option("--upstream", "upstreams", multiple=True, metavar="NAME=URL",
                     help="Upstream base URL (no --via/--from-cache: fetch from upstream)."),
        click.option("--allow-redirect-host", "allow_redirect_hosts", multiple=True, metavar="HOST[:PORT]"),
    ]):
        command = option(command)
    return command


@main.command()
@click.option("--cache-dir", "tfdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The TFHUB_CACHE_DIR to fill.")
@click.option("--via", metavar="MIRROR_URL", help="Fetch through a running hubproxy.")
@click.option("--from-cache", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Read a hubproxy cache dir; no network.")
@click.option("--file", "handle_file", type=click.File(),
              help="Handles, one model per line (spellings space-separated).")
@click.option("--alias", "aliases", multiple=True, metavar="SPELLING", help="Another spelling of the one HANDLE.")
@click.option("--force", is_flag=True, help="Refresh entries that are already present.")
@_upstream_options
@click.argument("handles", nargs=-1)
def warmup(tfdir: Path, via, from_cache, handle_file, aliases, force, handles, **settings_flags) -> None:
    """Write TFHUB_CACHE_DIR entries that tensorflow_hub then loads offline.

    HANDLE is spelled exactly as the offline code spells it (https://tfhub.dev/..., a Kaggle URL or
    a mirror URL). Exit status is non-zero if any handle failed; each failure is named."""
    groups = _spelling_groups(handles, aliases, handle_file)
    tfdir.mkdir(parents=True, exist_ok=True)
    source = _archive_source(via, from_cache, tfdir / f".hubproxy-warmup-{uuid.uuid4().hex}", settings_flags)
    results = []
    try:
        with ui.Transfers() as transfers:
            for group in groups:
                results.append(_warm_one(source, tfdir, group, force, transfers))
    finally:
        source.close()
    ui.summary(["handle", "result", "size", "detail"], results)
    failed = [row[0] for row in results if row[1] == "failed"]
    if failed:
        for handle in failed:
            click.echo(f"failed: {handle}", err=True)
        sys.exit(1)


def _warm_one(source, tfdir: Path, group: list[str], force: bool, transfers) -> list[str]:
    handle = group[0]
    if not force and all(tfcache.is_present(tfdir, spelling) for spelling in group):
        return [handle, "present", "", ", ".join(group[1:])]
    try:
        archive = source.get(handle, transfers.tracker(handle))
        try:
            written = tfcache.install(archive.path, tfdir, group, force=force)
        finally:
            if archive.disposable:
                archive.path.unlink(missing_ok=True)
    except (sources.SourceError, tfcache.UnsafeArchive) as e:
        return [handle, "failed", "", str(e)]
    aliases = [spelling for spelling in written if spelling != handle]
    return [handle, "written", ui.size(archive.size), f"also as {', '.join(aliases)}" if aliases else ""]


@main.group("tfcache")
def tfcache_() -> None:
    """Inspect a TFHUB_CACHE_DIR."""


@tfcache_.command("ls")
@click.argument("tfdir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def tfcache_ls(tfdir: Path, as_json: bool) -> None:
    """List entries with the handle each came from."""
    models = tfcache.list_models(tfdir)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return
    ui.summary(["directory", "handle", "files", "size", "loadable"],
               [[m.name, m.handle or "?", str(m.files), ui.size(m.bytes), "yes" if m.loadable else "NO"]
                for m in models])


@tfcache_.command("verify")
@click.argument("tfdir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def tfcache_verify(tfdir: Path) -> None:
    """Check each entry has a loadable layout; with tensorflow installed, load it."""
    loader = client.saved_model_loader()
    bad = []
    for model in tfcache.list_models(tfdir):
        problem = None if model.loadable else "no saved_model.pb"
        if problem is None and loader is not None:
            problem = loader(tfdir / model.name)
        click.echo(f"{'ok ' if problem is None else 'BAD'} {model.name} {model.handle or '?'}"
                   + (f": {problem}" if problem else ""))
        if problem:
            bad.append(model.name)
    if bad:
        sys.exit(1)



@main.group("keys")
def keys_() -> None:
    """Ed25519 keys for signing bundles."""


@keys_.command("generate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="KEY.pem (0600).")
def keys_generate(out: Path) -> None:
    """Write a private key (mode 0600) and KEY.pub.pem beside it."""
    try:
        public = keys.generate(out)
    except keys.KeyError_ as e:
        _fail(str(e))
    click.echo(f"private key {out} (0600), public key {public}")


@main.group("bundle")
def bundle_() -> None:
    """Carry models across an air gap: export a signed bundle, import it on the other side."""


@bundle_.command("export")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sign-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--via", metavar="MIRROR_URL")
@click.option("--from-cache", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--file", "handle_file", type=click.File())
@click.option("--alias", "aliases", multiple=True, metavar="SPELLING")
@click.argument("handles", nargs=-1)
def bundle_export(out: Path, sign_key, via, from_cache, handle_file, aliases, handles) -> None:
    """Pack the archives of HANDLEs (with their aliases) into one signed tar."""
    if not via and not from_cache:
        raise click.UsageError("give --via MIRROR_URL or --from-cache DIR")
    groups = _spelling_groups(handles, aliases, handle_file)
    try:
        key = keys.load_private(sign_key) if sign_key else None
    except keys.KeyError_ as e:
        _fail(str(e))
    source = _archive_source(via, from_cache, out.parent / f".hubproxy-export-{uuid.uuid4().hex}", {})
    try:
        with ui.Transfers() as transfers:
            items = [bundle.Item(group, source.get(group[0], transfers.tracker(group[0]))) for group in groups]
        manifest = bundle.export(out, items, key)
    except sources.SourceError as e:
        _fail(str(e))
    finally:
        source.close()
    signed = f"signed by key {manifest['key_id']}" if key else "UNSIGNED"
    click.echo(f"wrote {out}: {len(manifest['archives'])} archives, {signed}")


@bundle_.command("import")
@click.argument("bundle_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--verify-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--allow-unsigned", is_flag=True, help="Accept a bundle without a signature.")
@click.option("--cache-dir", "tfdir", type=click.Path(file_okay=False, path_type=Path), help="A TFHUB_CACHE_DIR.")
@click.option("--proxy-cache", type=click.Path(file_okay=False, path_type=Path), help="A hubproxy cache dir.")
@click.option("--force", is_flag=True, help="Replace TFHUB_CACHE_DIR entries already present.")
def bundle_import(bundle_file: Path, verify_key, allow_unsigned, tfdir, proxy_cache, force) -> None:
    """Verify a bundle completely, then publish its models; on any problem nothing is written."""
    if (tfdir is None) == (proxy_cache is None):
        raise click.UsageError("give exactly one of --cache-dir TFDIR or --proxy-cache DIR")
    if verify_key is None and not allow_unsigned:
        raise click.UsageError("give --verify-key PUB.pem (or --allow-unsigned)")
    destination = tfdir or proxy_cache
    destination.mkdir(parents=True, exist_ok=True)
    try:
        public = keys.load_public(verify_key) if verify_key else None
        verified = bundle.verify(bundle_file, destination / f".hubproxy-import-{uuid.uuid4().hex}", public,
                                 allow_unsigned)
    except (keys.KeyError_, bundle.BundleError) as e:
        _fail(str(e))
    try:
        if tfdir is not None:
            written = tfcache.install_all([(item.archive.path, item.handles) for item in verified.items], tfdir,
                                          force=force)
        else:
            written = bundle.seed_proxy_cache(verified, proxy_cache)
    except (tfcache.UnsafeArchive, sources.SourceError) as e:
        _fail(str(e))
    finally:
        verified.discard()
    click.echo(f"imported {len(verified.items)} archives; wrote {len(written)} entries into {destination}")


# -- operating the cache ------------------------------------------------------------------------

def _cache_options(command):
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                           help="TOML settings file (for cache_dir and upstreams).")(command)
    return click.option("--cache-dir", help="The hubproxy cache dir.  [default: from config]")(command)


def _open_store(cache_dir, config_file) -> tuple[Store, Settings]:
    settings = _settings_or_exit(config_file, {"cache_dir": cache_dir})
    if not (settings.cache_path / "index").is_dir():
        _fail(f"{settings.cache_path} is not a hubproxy cache dir")
    return Store(settings.cache_path), settings


def _keys_for(store: Store, typed: tuple[str, ...]) -> list[str]:
    """Handles as typed (URLs), keys, paths, or globs of keys and paths → the matching keys."""
    try:
        wanted = evict.patterns(list(typed))
    except BadHandle as e:
        raise click.UsageError(str(e)) from None
    return evict.matching(store.entries(), wanted, include_pinned=True).keys


@main.group("cache")
def cache_() -> None:
    """Inspect and steer a hubproxy cache (safe while a proxy serves from it)."""


@cache_.command("ls")
@_cache_options
@click.option("--json", "as_json", is_flag=True)
def cache_ls(cache_dir, config_file, as_json) -> None:
    """Each entry: handle, size, sha256, fetched, last access, hits, pinned."""
    store, _ = _open_store(cache_dir, config_file)
    entries = sorted(store.entries(), key=lambda e: e.key)
    store.close()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return
    ui.summary(["handle", "size", "sha256", "fetched", "last access", "hits", "pinned"],
               [[e.key, ui.size(e.size), e.sha256[:16], ui.when(e.fetched), ui.when(e.last_access), str(e.hits),
                 "yes" if e.pinned else ""] for e in entries])


@cache_.command("stats")
@_cache_options
@click.option("--json", "as_json", is_flag=True)
def cache_stats(cache_dir, config_file, as_json) -> None:
    """Entries, bytes, hit ratio, free disk."""
    store, settings = _open_store(cache_dir, config_file)
    entries = store.entries()
    store.close()
    hits = sum(e.hits for e in entries)
    stats = {"entries": len(entries), "blobs": len({e.sha256 for e in entries}), "bytes": evict.usage(entries),
             "hits": hits, "fetches": len(entries),
             "hit_ratio": round(hits / (hits + len(entries)), 4) if entries else 0.0,
             "pinned": sum(e.pinned for e in entries),
             "free_bytes": shutil.disk_usage(settings.cache_path).free}
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    ui.summary(["stat", "value"], [[k, ui.size(v) if k.endswith("bytes") else str(v)] for k, v in stats.items()])


@cache_.command("pin")
@_cache_options
@click.argument("handles", nargs=-1, required=True)
def cache_pin(cache_dir, config_file, handles) -> None:
    """Never evict these entries (warmed, audited models)."""
    _set_pinned(cache_dir, config_file, handles, True)


@cache_.command("unpin")
@_cache_options
@click.argument("handles", nargs=-1, required=True)
def cache_unpin(cache_dir, config_file, handles) -> None:
    """Let these entries be evicted again."""
    _set_pinned(cache_dir, config_file, handles, False)


def _set_pinned(cache_dir, config_file, handles, pinned: bool) -> None:
    store, _ = _open_store(cache_dir, config_file)
    try:
        keys_ = _keys_for(store, handles)
        if not keys_:
            _fail(f"no cached entry matches {' '.join(handles)}")
        for key in keys_:
            store.set_pinned(key, pinned)
            click.echo(f"{'pinned' if pinned else 'unpinned'} {key}")
    finally:
        store.close()


@cache_.command("purge")
@_cache_options
@click.option("--dry-run", is_flag=True, help="Show what would go.")
@click.argument("patterns", nargs=-1, required=True, metavar="HANDLE_OR_GLOB...")
def cache_purge(cache_dir, config_file, dry_run, patterns) -> None:
    """Drop entries now, pinned or not (a bad upstream release, a legal request)."""
    store, _ = _open_store(cache_dir, config_file)
    try:
        keys_ = _keys_for(store, patterns)
        plan = evict.matching(store.entries(), keys_, include_pinned=True)
        _apply(store, plan, dry_run)
    finally:
        store.close()


@cache_.command("evict")
@_cache_options
@click.option("--max-size", help="Evict least recently used until the cache is at most SIZE (200G).")
@click.option("--older-than", help="Evict entries unused for DURATION (30d, 12h).")
@click.option("--dry-run", is_flag=True, help="Show what would go.")
@click.argument("patterns", nargs=-1, metavar="[HANDLE_OR_GLOB...]")
def cache_evict(cache_dir, config_file, max_size, older_than, dry_run, patterns) -> None:
    """Evict by size, by age, or by name; pinned entries always stay."""
    if sum(bool(x) for x in (max_size, older_than, patterns)) != 1:
        raise click.UsageError("give exactly one of --max-size, --older-than or HANDLE_OR_GLOB...")
    store, _ = _open_store(cache_dir, config_file)
    try:
        entries = store.entries()
        if max_size:
            plan = evict.to_fit(entries, _parsed(parse_size, max_size))
        elif older_than:
            plan = evict.older_than(entries, _parsed(parse_duration, older_than))
        else:
            plan = evict.matching(entries, _keys_for(store, patterns), include_pinned=False)
        _apply(store, plan, dry_run)
    finally:
        store.close()


def _parsed(parser, text: str):
    try:
        return parser(text)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _apply(store: Store, plan: evict.Plan, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for key in plan.keys:
        click.echo(f"{verb} {key}")
    if not dry_run:
        store.remove_keys(plan.keys)
        store.delete_unused_blobs(plan.blobs)
    click.echo(f"{verb} {len(plan.keys)} entries, {ui.size(plan.freed)}", err=True)


@cache_.command("verify")
@_cache_options
@click.option("--repair", is_flag=True, help="Re-fetch what was bad from upstream.")
def cache_verify(cache_dir, config_file, repair) -> None:
    """Re-hash every blob; quarantine bad ones (never served again); exit 1 naming each."""
    store, settings = _open_store(cache_dir, config_file)
    try:
        findings = verify.scrub(store)
        verify.quarantine_all(store, findings)
        for finding in findings:
            click.echo(f"BAD {', '.join(finding.keys)}: {finding.problem} (quarantined)", err=True)
        if repair and findings:
            for key, problem in verify.refetch(store, settings, [k for f in findings for k in f.keys]):
                click.echo(f"{'repaired' if problem is None else 'NOT repaired'} {key}"
                           + (f": {problem}" if problem else ""), err=True)
    finally:
        store.close()
    click.echo(f"checked; {len(findings)} bad blobs")
    if findings:
        sys.exit(1)
