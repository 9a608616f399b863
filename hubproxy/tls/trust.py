"""The trust bundle: the system's trust store plus the interception CA, for SSL_CERT_FILE and
REQUESTS_CA_BUNDLE, so a client pointed at it trusts the hub hosts' leaves and every other host
exactly as before.

Invariants: the bundle is the system store's certificates followed by the CA's, the CA exactly
once, even when the store read is a bundle made here (SSL_CERT_FILE already names it); with no
system store to be found it is a one-line TrustStoreError, never a bundle that would silently
distrust every other site; the file is replaced whole, never seen half written.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .files import PUBLIC, write_new

BUNDLE_NAME = "trust-bundle.pem"
_DEBIAN_STORE = Path("/etc/ssl/certs/ca-certificates.crt")


class TrustStoreError(ValueError):
    """No bundle could be made or written; the message is one line naming the path."""


def default_path(ca_dir: Path) -> Path:
    return Path(ca_dir) / BUNDLE_NAME


def system_store() -> Path:
    """The system's trust store file: OpenSSL's default (or $SSL_CERT_FILE), else Debian's."""
    default = ssl.get_default_verify_paths().cafile
    for candidate in ([Path(default)] if default else []) + [_DEBIAN_STORE]:
        if candidate.is_file():
            return candidate
    raise TrustStoreError(f"no system trust store found (OpenSSL's default cafile, {_DEBIAN_STORE}); "
                          f"install ca-certificates or set SSL_CERT_FILE to one")


def trust_bundle(ca_pem: bytes) -> bytes:
    """The system store's certificates, then the CA's (its PEM, Authority.pem: no key needed)."""
    store = system_store()
    try:
        system = store.read_bytes()
    except OSError as e:
        raise TrustStoreError(f"cannot read system trust store {store}: {e.strerror}") from None
    system = system.replace(ca_pem, b"").rstrip()
    return (system + b"\n" if system else b"") + ca_pem


def write_bundle(ca_pem: bytes, out: Path) -> Path:
    """Write trust_bundle(ca_pem) to `out`, replacing it whole; returns `out`."""
    data = trust_bundle(ca_pem)
    try:
        write_new(Path(out), data, mode=PUBLIC, replace=True)
    except OSError as e:
        raise TrustStoreError(f"cannot write trust bundle {out}: {e.strerror}") from None
    return Path(out)
