"""The command line: serve | warmup | tfcache | keys | bundle | cache | ca, one module per group.

Invariants: exit status 0 done, 1 a finding (each named), 2 the operator's error; never a
traceback (failures.GuardedGroup is the last resort).
"""

from __future__ import annotations

import click

from .. import __version__
from . import bundle, ca, cache, serve, signing, tfcache, warmup
from .failures import GuardedGroup


@click.group(cls=GuardedGroup)
@click.version_option(__version__, prog_name="hubproxy")
def main() -> None:
    """hubproxy: a caching mirror for TensorFlow Hub model archives.

    Settings come from flags, then HUBPROXY_* environment variables, then a TOML file (--config);
    --cache-dir is always a hubproxy cache, --tfhub-dir (default $TFHUB_CACHE_DIR) always the
    directory tensorflow_hub loads from. Exit status: 0 done, 1 a finding (each named), 2 an error.

    \b
    Example:
      hubproxy serve --listen 0.0.0.0:8080
      hubproxy warmup --tfhub-dir /shared/tfhub-cache --via http://mirror:8080 https://tfhub.dev/google/x/1
    """


for command in (serve.serve, warmup.warmup, tfcache.group, signing.group, bundle.group, cache.group, ca.group):
    main.add_command(command)
