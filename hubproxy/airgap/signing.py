"""Ed25519 signing keys for bundles (cryptography): generate, load, sign, verify.

Invariants: a private key file is created with mode 0600 from its first byte (never chmod-ed
after the fact) and never overwritten; a key that cannot be read or is not Ed25519 is refused
with a one-line SigningKeyError; signatures cover exact bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningKeyError(ValueError):
    """A key could not be used; the message is one line."""


def public_path(private_path: Path) -> Path:
    """KEY.pem → KEY.pub.pem"""
    name = private_path.name
    stem = name[:-4] if name.endswith(".pem") else name
    return private_path.with_name(stem + ".pub.pem")


def generate(private_path: Path) -> Path:
    """Write a new private key (0600) and its public key beside it; returns the public key's path."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = public_path(private_path)
    if not private_path.parent.is_dir():
        raise SigningKeyError(f"cannot write {private_path}: directory {private_path.parent} does not exist")
    if pub.exists():
        raise SigningKeyError(f"{pub} already exists; not overwriting a key")
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningKeyError(f"{private_path} already exists; not overwriting a key") from None
    except OSError as e:
        raise SigningKeyError(f"cannot write {private_path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    pub.write_bytes(public_pem)
    return pub


def load_private(path: Path) -> Ed25519PrivateKey:
    key = _load(path, serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    if _is_private_pem(path):
        raise SigningKeyError(f"{path} is a private key; verifying takes the public key, "
                              f"{public_path(Path(path)).name} beside it")
    key = _load(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return key


def _is_private_pem(path: Path) -> bool:
    try:
        return b"PRIVATE KEY-----" in Path(path).read_bytes()
    except OSError:
        return False  # _load names the unreadable file


def _load(path: Path, loader, **kwargs):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read key {path}: {e.strerror}") from None
    try:
        return loader(data, **kwargs)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not a PEM key") from None


def key_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint naming the key in manifests and messages."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def verifies(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public.verify(signature, data)
        return True
    except InvalidSignature:
        return False
