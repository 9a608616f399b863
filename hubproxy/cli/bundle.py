"""`hubproxy bundle`: carry models across an air gap in one signed tar."""

from __future__ import annotations

import uuid
from pathlib import Path

import click
from click.core import ParameterSource

from ..airgap import bundle, signing, sources, tfcache
from . import console
from .archives import archive_source, spelling_groups
from .common import CACHE_DIR, source_cache_option, tfhub_dir_option
from .failures import check_file_target, directory_errors, fail


@click.group("bundle")
def group() -> None:
    """Carry models across an air gap: export a signed bundle, import it on the other side.

    \b
    Example:
      hubproxy bundle export --out models.tar --sign-key signing.pem --via http://mirror:8080 HANDLE
      hubproxy bundle import models.tar --verify-key signing.pub.pem --tfhub-dir /shared/tfhub-cache
    """


@group.command("export")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle to write (one tar).")
@click.option("--sign-key", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Private key to sign with (from `hubproxy keys generate`); without it the bundle is unsigned.")
@click.option("--via", metavar="MIRROR_URL", help="Fetch through a running hubproxy (http://mirror:8080).")
@source_cache_option("Read the archives from this hubproxy cache dir; no network.")
@click.option("--file", "handle_file", type=click.File(), metavar="LIST",
              help="Handles, one model per line (spellings space-separated, # comments).")
@click.option("--alias", "aliases", multiple=True, metavar="SPELLING",
              help="Another spelling of the one HANDLE, published too on import.")
@click.argument("handles", nargs=-1)
def bundle_export(out: Path, sign_key, via, cache_dir, handle_file, aliases, handles) -> None:
    """Pack the archives of HANDLEs (with their aliases) into one signed tar.

    \b
    Example:
      hubproxy bundle export --out models.tar --sign-key signing.pem \\
          --cache-dir /var/cache/hubproxy https://tfhub.dev/google/x/1
    """
    if not via and not cache_dir:
        raise click.UsageError("give --via MIRROR_URL or --cache-dir DIR")
    groups = spelling_groups(handles, aliases, handle_file)
    check_file_target(out, "--out")
    key = _key(signing.load_private, sign_key)
    source = archive_source(via, cache_dir, out.parent / f".hubproxy-export-{uuid.uuid4().hex}", {})
    try:
        with console.Transfers() as transfers:
            items = [bundle.Item(group, source.get(group[0], transfers.tracker(group[0]))) for group in groups]
        manifest = bundle.export(out, items, key)
    except sources.SourceError as e:
        fail(str(e))
    finally:
        source.close()
    signed = f"signed by key {manifest['key_id']}" if key else "UNSIGNED"
    click.echo(f"wrote {out}: {len(manifest['archives'])} archives, {signed}")


@group.command("import")
@click.argument("bundle_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--verify-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), metavar="PUB.pem",
              help="The signer's public key (KEY.pub.pem, not the private KEY.pem).")
@click.option("--allow-unsigned", is_flag=True, help="Accept a bundle without a signature.")
@tfhub_dir_option("Publish into this TFHUB_CACHE_DIR.", required=False)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Seed this hubproxy cache dir instead (an offline hubproxy then serves the models).")
@click.option("--force", is_flag=True, help="Replace TFHUB_CACHE_DIR entries already present.")
@click.pass_context
def bundle_import(ctx: click.Context, bundle_file: Path, verify_key, allow_unsigned, tfdir, cache_dir,
                  force) -> None:
    """Verify a bundle completely, then publish its models; on any problem nothing is written.

    \b
    Example:
      hubproxy bundle import models.tar --verify-key signing.pub.pem --tfhub-dir /shared/tfhub-cache
      hubproxy bundle import models.tar --verify-key signing.pub.pem --cache-dir /var/cache/hubproxy
    """
    tfdir = _only_destination(ctx, tfdir, cache_dir)
    if verify_key is None and not allow_unsigned:
        raise click.UsageError("give --verify-key PUB.pem (or --allow-unsigned)")
    public = _key(signing.load_public, verify_key)
    destination = tfdir or cache_dir
    try:  # verify creates the destination, and removes what it created when it refuses the bundle
        with directory_errors(destination, "TFHUB_CACHE_DIR" if tfdir is not None else CACHE_DIR):
            verified = bundle.verify(bundle_file, destination / f".hubproxy-import-{uuid.uuid4().hex}", public,
                                     allow_unsigned)
    except bundle.BundleError as e:
        fail(str(e))
    try:
        if tfdir is not None:
            written = tfcache.install_all([(item.archive.path, item.handles) for item in verified.items], tfdir,
                                          force=force)
        else:
            with directory_errors(cache_dir, CACHE_DIR):
                written = bundle.seed_proxy_cache(verified, cache_dir)
    except (tfcache.UnsafeArchive, sources.SourceError) as e:
        fail(str(e))
    finally:
        verified.discard()
    click.echo(f"imported {len(verified.items)} archives; wrote {len(written)} entries into {destination}")


def _key(load, path: Path | None):
    """A signing key through `load`, or None without a path; an unusable key is a one-line failure."""
    if path is None:
        return None
    try:
        return load(path)
    except signing.SigningKeyError as e:
        fail(str(e))


def _only_destination(ctx: click.Context, tfdir: Path | None, cache_dir: Path | None) -> Path | None:
    """The TFHUB_CACHE_DIR to publish into, or None to seed cache_dir; $TFHUB_CACHE_DIR is only a
    default, so an explicit --cache-dir wins over it."""
    if tfdir is not None and cache_dir is not None:
        if ctx.get_parameter_source("tfdir") is not ParameterSource.ENVIRONMENT:
            raise click.UsageError("give --tfhub-dir or --cache-dir, not both")
        return None
    if tfdir is None and cache_dir is None:
        raise click.UsageError("give --tfhub-dir DIR (or set TFHUB_CACHE_DIR) or --cache-dir DIR")
    return tfdir
