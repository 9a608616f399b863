"""Air-gap bundles: one tar of archives plus a manifest signed with Ed25519.

Layout, in this order: manifest.json, manifest.sig (absent when unsigned), blobs/<sha256>.
Invariants: import reads the manifest and checks its signature before touching any archive,
then checks every archive's size and sha256 against it while streaming them to scratch space,
and publishes nothing unless every check passed; export and import stream in constant memory.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import __version__
from ..cache.store import Store
from . import signing
from .copying import copy_hashing
from .sources import Archive, SourceError, parse_handle

FORMAT = "hubproxy-bundle/1"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"


class BundleError(ValueError):
    """The bundle is refused; the message is one line."""


@dataclass(frozen=True)
class Item:
    """One archive in a bundle and every spelling it is known by."""

    handles: list[str]
    archive: Archive


def export(out: Path, items: list[Item], sign_key: Ed25519PrivateKey | None) -> dict:
    """Write the bundle to out (via a temp file renamed into place); returns the manifest."""
    manifest = {
        "format": FORMAT,
        "hubproxy": __version__,
        "created": time.time(),
        "key_id": signing.key_id(sign_key.public_key()) if sign_key else None,
        "archives": [{"sha256": item.archive.sha256, "size": item.archive.size, "handles": item.handles,
                      "source": item.archive.source} for item in items],
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")
    try:
        with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST, manifest_bytes)
            if sign_key is not None:
                _add_bytes(tar, SIGNATURE, sign_key.sign(manifest_bytes))
            written = set()
            for item in items:
                if item.archive.sha256 in written:
                    continue
                written.add(item.archive.sha256)
                with item.archive.path.open("rb") as blob:
                    info = tarfile.TarInfo(f"blobs/{item.archive.sha256}")
                    info.size, info.mtime, info.mode = item.archive.size, int(time.time()), 0o644
                    tar.addfile(info, blob)
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return manifest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Verified:
    """A bundle whose every archive passed the checks, waiting in scratch space."""

    manifest: dict
    items: list[Item]  # archives point into scratch
    scratch: Path

    def discard(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def verify(bundle: Path, scratch: Path, verify_key: Ed25519PublicKey | None, allow_unsigned: bool) -> Verified:
    """Check signature, sizes and hashes, streaming the archives into scratch; raises BundleError."""
    scratch.mkdir(parents=True, exist_ok=False)
    try:
        return _verify(bundle, scratch, verify_key, allow_unsigned)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _verify(bundle: Path, scratch: Path, verify_key, allow_unsigned: bool) -> Verified:
    try:
        with tarfile.open(bundle, "r|") as tar:
            members = iter(tar)
            manifest_bytes = _read_small(tar, next(members, None), MANIFEST)
            following = next(members, None)
            if following is not None and following.name == SIGNATURE:
                _check_signature(manifest_bytes, _read_small(tar, following, SIGNATURE), verify_key)
                following = next(members, None)
            elif not allow_unsigned:
                raise BundleError("the bundle is unsigned (use --allow-unsigned to accept it anyway)")
            manifest = _parse_manifest(manifest_bytes)
            expected = {entry["sha256"]: entry for entry in manifest["archives"]}
            received: dict[str, Path] = {}
            while following is not None:
                received.update([_receive_blob(tar, following, expected, received, scratch)])
                following = next(members, None)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{bundle} is not a readable bundle: {e}") from None
    missing = set(expected) - set(received)
    if missing:
        raise BundleError(f"archive {sorted(missing)[0][:16]}… listed in the manifest is missing from the bundle")
    items = [Item(list(entry["handles"]), Archive(received[sha], sha, entry["size"], entry.get("source", "")))
             for sha, entry in expected.items()]
    return Verified(manifest, items, scratch)


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo | None, name: str, limit: int = 16 << 20) -> bytes:
    if member is None or member.name != name or not member.isfile():
        raise BundleError(f"the bundle does not start with {MANIFEST} (and {SIGNATURE})")
    if member.size > limit:
        raise BundleError(f"{name} is implausibly large ({member.size} bytes)")
    return tar.extractfile(member).read()


def _check_signature(manifest_bytes: bytes, signature: bytes, verify_key) -> None:
    if verify_key is None:
        raise BundleError("the bundle is signed: give --verify-key to check it")
    if not signing.verifies(verify_key, signature, manifest_bytes):
        raise BundleError("the manifest's signature does not verify with the given key (tampered, or another key)")


def _parse_manifest(data: bytes) -> dict:
    try:
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            raise BundleError(f"unknown bundle format {manifest.get('format')!r}")
        for entry in manifest["archives"]:
            if not (isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64
                    and isinstance(entry["size"], int) and entry["handles"]):
                raise BundleError("the manifest has a malformed archive entry")
            for handle in entry["handles"]:
                parse_handle(handle)
        return manifest
    except SourceError as e:
        raise BundleError(f"the manifest names a bad handle: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"the manifest is not valid: {e}") from None


def _receive_blob(tar, member, expected: dict, received: dict, scratch: Path) -> tuple[str, Path]:
    sha = member.name.removeprefix("blobs/")
    if not member.name.startswith("blobs/") or sha not in expected or sha in received or not member.isfile():
        raise BundleError(f"unexpected member {member.name!r} in the bundle")
    if member.size != expected[sha]["size"]:
        raise BundleError(f"archive {sha[:16]}… is {member.size} bytes, the manifest says {expected[sha]['size']}")
    target = scratch / sha
    with target.open("wb") as out:
        digest, _ = copy_hashing(tar.extractfile(member), out)
    if digest != sha:
        raise BundleError(f"archive {sha[:16]}… does not match its sha256 (corrupted or tampered)")
    return sha, target


def seed_proxy_cache(verified: Verified, cache_dir: Path) -> list[str]:
    """Put verified archives into a hubproxy cache under every handle's key; returns the keys."""
    store = Store(cache_dir)
    written = []
    try:
        for item in verified.items:
            keys_ = [parse_handle(handle).key for handle in item.handles]
            fd, temp = store.new_temp_file()
            os.close(fd)
            os.replace(item.archive.path, temp)
            store.commit(keys_[0], temp, item.archive.sha256, item.archive.size, etag=None,
                         content_type="application/octet-stream", source=item.archive.source)
            for key in keys_[1:]:
                store.add_key(key, item.archive.sha256, item.archive.size, etag=None,
                              content_type="application/octet-stream", source=item.archive.source)
            written += keys_
    finally:
        store.close()
    return written
