"""`hubproxy keys`: the Ed25519 keys that sign bundles."""

from __future__ import annotations

from pathlib import Path

import click

from ..airgap import signing
from .failures import check_file_target, fail


@click.group("keys")
def group() -> None:
    """Ed25519 keys for signing bundles.

    \b
    Example:
      hubproxy keys generate --out signing.pem
    """


@group.command("generate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="KEY.pem",
              help="Where the private key goes (mode 0600); KEY.pub.pem is written beside it.")
def keys_generate(out: Path) -> None:
    """Write a private key (mode 0600) and KEY.pub.pem beside it; never overwrites a key.

    \b
    Example:
      hubproxy keys generate --out signing.pem   # keep signing.pem; carry signing.pub.pem across
    """
    check_file_target(out, "--out")
    try:
        public = signing.generate(out)
    except signing.SigningKeyError as e:
        fail(str(e))
    click.echo(f"private key {out} (0600), public key {public}")
