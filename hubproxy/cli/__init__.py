"""The command line: serve | warmup | tfcache | keys | bundle | cache, one module per group."""

from __future__ import annotations

import click

from .. import __version__
from . import bundle, cache, serve, signing, tfcache, warmup


@click.group()
@click.version_option(__version__, prog_name="hubproxy")
def main() -> None:
    """hubproxy: a caching mirror for TensorFlow Hub model archives."""


for command in (serve.serve, warmup.warmup, tfcache.group, signing.group, bundle.group, cache.group):
    main.add_command(command)
