"""`hubproxy tfcache`: inspect a TFHUB_CACHE_DIR."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from ..airgap import tfcache
from ..airgap.savedmodel import saved_model_loader
from ..units import format_size
from . import console
from .common import json_option, tfhub_dir_option
from .failures import exit_if_found


@click.group("tfcache")
def group() -> None:
    """Inspect a TFHUB_CACHE_DIR.

    The directory is --tfhub-dir, by default $TFHUB_CACHE_DIR.

    \b
    Example:
      hubproxy tfcache ls --tfhub-dir /shared/tfhub-cache
    """


@group.command("ls")
@tfhub_dir_option("The TFHUB_CACHE_DIR to list.", exists=True)
@json_option
def tfcache_ls(tfdir: Path, as_json: bool) -> None:
    """List entries with the handle each came from.

    \b
    Example:
      TFHUB_CACHE_DIR=/shared/tfhub-cache hubproxy tfcache ls
    """
    models = tfcache.list_models(tfdir)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return
    if not models:
        click.echo(f"no models in TFHUB_CACHE_DIR {tfdir}")
        return
    console.summary(["directory", "handle", "files", "size", "loadable"],
               [[m.name, m.handle or "?", str(m.files), format_size(m.bytes), "yes" if m.loadable else "NO"]
                for m in models])


@group.command("verify")
@tfhub_dir_option("The TFHUB_CACHE_DIR to check.", exists=True)
def tfcache_verify(tfdir: Path) -> None:
    """Check each entry has a loadable layout; with tensorflow installed, load it. Exit 1 if any is BAD.

    \b
    Example:
      hubproxy tfcache verify --tfhub-dir /shared/tfhub-cache
    """
    loader = saved_model_loader()
    bad = []
    for model in tfcache.list_models(tfdir):
        problem = None if model.loadable else "no saved_model.pb"
        if problem is None and loader is not None:
            problem = loader(tfdir / model.name)
        click.echo(f"{'ok ' if problem is None else 'BAD'} {model.name} {model.handle or '?'}"
                   + (f": {problem}" if problem else ""))
        if problem:
            bad.append(model.name)
    exit_if_found(bad)

