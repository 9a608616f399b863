"""`hubproxy keys`: the Ed25519 keys that sign bundles."""

from __future__ import annotations

from pathlib import Path

import click

from ..airgap import signing
from .failures import fail


@click.group("keys")
def group() -> None:
    """Ed25519 keys for signing bundles."""


@group.command("generate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="KEY.pem (0600).")
def keys_generate(out: Path) -> None:
    """Write a private key (mode 0600) and KEY.pub.pem beside it."""
    try:
        public = signing.generate(out)
    except signing.SigningKeyError as e:
        fail(str(e))
    click.echo(f"private key {out} (0600), public key {public}")
