"""`hubproxy warmup`: fill a TFHUB_CACHE_DIR that tensorflow_hub then loads offline."""

from __future__ import annotations

import uuid
from pathlib import Path

import click

from ..airgap import sources, tfcache
from ..units import format_size
from . import console
from .archives import archive_source, spelling_groups
from .common import source_cache_option, tfhub_dir_option, upstream_options
from .failures import ensure_dir, exit_if_found, reason


@click.command()
@tfhub_dir_option("The TFHUB_CACHE_DIR to fill.")
@click.option("--via", metavar="MIRROR_URL", help="Fetch through a running hubproxy (http://mirror:8080).")
@source_cache_option("Read the archives from this hubproxy cache dir; no network.")
@click.option("--file", "handle_file", type=click.File(), metavar="LIST",
              help="Handles, one model per line (spellings space-separated, # comments).")
@click.option("--alias", "aliases", multiple=True, metavar="SPELLING", help="Another spelling of the one HANDLE.")
@click.option("--force", is_flag=True, help="Refresh entries that are already present.")
@upstream_options
@click.argument("handles", nargs=-1)
def warmup(tfdir: Path, via, cache_dir, handle_file, aliases, force, handles, **settings_flags) -> None:
    """Write TFHUB_CACHE_DIR entries that tensorflow_hub then loads offline.

    HANDLE is spelled exactly as the offline code spells it (https://tfhub.dev/..., a Kaggle URL or
    a mirror URL). Archives come --via a mirror, from a hubproxy --cache-dir, or else straight from
    upstream with the proxy's verified fetch. Exit status 1 if any handle failed; each is named.

    \b
    Example:
      hubproxy warmup --tfhub-dir /shared/tfhub-cache --via http://mirror:8080 \\
          https://tfhub.dev/google/x/1 --alias https://www.kaggle.com/models/google/x/...
      TFHUB_CACHE_DIR=/shared/tfhub-cache hubproxy warmup --cache-dir /var/cache/hubproxy --file models.txt
    """
    groups = spelling_groups(handles, aliases, handle_file)
    ensure_dir(tfdir, "TFHUB_CACHE_DIR")
    source = archive_source(via, cache_dir, tfdir / f".hubproxy-warmup-{uuid.uuid4().hex}", settings_flags)
    results = []
    try:
        with console.Transfers() as transfers:
            for group in groups:
                results.append(_warm_one(source, tfdir, group, force, transfers))
    finally:
        source.close()
    console.summary(["handle", "result", "size", "detail"], results)
    failed = [row[0] for row in results if row[1] == "failed"]
    for handle in failed:
        click.echo(f"failed: {handle}", err=True)
    exit_if_found(failed)


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
    except OSError as e:  # the TFHUB_CACHE_DIR refused a write: this handle fails, the next may not
        return [handle, "failed", "", reason(e)]
    aliases = [spelling for spelling in written if spelling != handle]
    return [handle, "written", format_size(archive.size), f"also as {', '.join(aliases)}" if aliases else ""]

