"""Air-gap bundles: one tar of archives plus a manifest signed with Ed25519.

Layout, in this order: manifest.json, manifest.sig (absent when unsigned), blobs/<sha256> once per archive.
Invariants of import (verify):
- the signature is checked first, then every manifest field's shape (manifest.parse), before any of
  the manifest is used; a signature vouches for the writer, not for the shape;
- every later member is a regular file named exactly blobs/<a sha256 the manifest lists>, once, of
  the listed size; links, devices, directories and any other name are refused;
- no path is ever made from bundle text: each archive streams into scratch/<n>.blob (created
  exclusively, symlinks not followed) and counts as its sha256 only once its bytes hash to it;
- the scratch dir must be new; verify creates it and any missing parents, and a refusal removes
  all of them again, so a refused import leaves nothing behind; Verified.discard does the same once
  the archives are published, keeping the parents that now hold something;
- nothing is published unless every check passed; export and import stream in constant memory.
Export lists each archive once, with the handles of every group that named it.
"""

from __future__ import annotations

import io
import itertools
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
from . import manifest as manifests
from . import signing
from .copying import copy_hashing
from .manifest import BundleError, Entry, Manifest, quote
from .sources import Archive, parse_handle

MANIFEST, SIGNATURE, BLOBS = "manifest.json", "manifest.sig", "blobs/"


@dataclass(frozen=True)
class Item:
    """One archive in a bundle and every spelling it is known by."""

    handles: list[str]
    archive: Archive


def export(out: Path, items: list[Item], sign_key: Ed25519PrivateKey | None) -> dict:
    """Write the bundle to out (via a temp file renamed into place); returns the manifest."""
    items = _one_item_per_archive(items)
    key_id = signing.key_id(sign_key.public_key()) if sign_key else None
    entries = [Entry(item.archive.sha256, item.archive.size, tuple(item.handles), item.archive.source)
               for item in items]
    manifest = manifests.build(entries, key_id, __version__, time.time())
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")
    try:
        with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST, manifest_bytes)
            if sign_key is not None:
                _add_bytes(tar, SIGNATURE, sign_key.sign(manifest_bytes))
            for item in items:
                with item.archive.path.open("rb") as blob:
                    info = tarfile.TarInfo(f"{BLOBS}{item.archive.sha256}")
                    info.size, info.mtime, info.mode = item.archive.size, int(time.time()), 0o644
                    tar.addfile(info, blob)
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return manifest


def _one_item_per_archive(items: list[Item]) -> list[Item]:
    """Groups that resolve to the same archive become one item carrying all their handles, in order."""
    merged: dict[str, Item] = {}
    for item in items:
        known = merged.get(item.archive.sha256)
        handles = list(dict.fromkeys([*(known.handles if known else []), *item.handles]))
        merged[item.archive.sha256] = Item(handles, (known or item).archive)
    return list(merged.values())


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Verified:
    """A bundle whose every archive passed the checks, waiting in scratch space."""

    manifest: Manifest
    items: list[Item]  # archives point into scratch
    scratch: Path
    created: tuple[Path, ...] = ()  # the scratch dir's parents that verify made, outermost first

    def discard(self) -> None:
        """Remove the scratch dir, and each parent verify made that is still empty."""
        _remove_scratch(self.scratch, self.created)


def verify(bundle: Path, scratch: Path, verify_key: Ed25519PublicKey | None, allow_unsigned: bool) -> Verified:
    """Check signature, manifest, members, sizes and hashes, streaming the archives into scratch
    (which must not exist yet); raises BundleError, having removed every directory it made."""
    created = _create_scratch(scratch)
    try:
        return _verify(bundle, scratch, verify_key, allow_unsigned, created)
    except BaseException:
        _remove_scratch(scratch, created)
        raise


def _create_scratch(scratch: Path) -> tuple[Path, ...]:
    """mkdir -p for a scratch dir that must be new; returns the parents made here, outermost first."""
    missing = list(itertools.takewhile(lambda parent: not parent.exists(), scratch.parents))
    created: list[Path] = []
    try:
        for parent in reversed(missing):
            try:
                parent.mkdir()
                created.append(parent)
            except FileExistsError:  # made meanwhile by someone else, so not ours to remove
                pass
        scratch.mkdir()
    except OSError as e:
        _remove_scratch(None, tuple(created))
        raise BundleError(f"cannot create the scratch dir {scratch}: {e.strerror}") from None
    return tuple(created)


def _remove_scratch(scratch: Path | None, created: tuple[Path, ...]) -> None:
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    for parent in reversed(created):
        try:
            parent.rmdir()
        except OSError:  # it holds something now, so every parent above it does too
            break


def _verify(bundle: Path, scratch: Path, verify_key, allow_unsigned: bool, created: tuple[Path, ...]) -> Verified:
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
            manifest = manifests.parse(manifest_bytes)
            blobs = itertools.chain([following] if following is not None else [], members)
            received = _receive_blobs(tar, blobs, manifest, scratch)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{bundle} is not a readable bundle: {e}") from None
    items = [Item(list(entry.handles), Archive(received[entry.sha256], entry.sha256, entry.size, entry.source))
             for entry in manifest.entries]
    return Verified(manifest, items, scratch, created)


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


def _receive_blobs(tar: tarfile.TarFile, blobs, manifest: Manifest, scratch: Path) -> dict[str, Path]:
    """Stream every remaining member into scratch; returns sha256 → its verified file."""
    expected = {entry.sha256: entry for entry in manifest.entries}
    received: dict[str, Path] = {}
    for member in blobs:
        entry = _listed_entry(member, expected, received)
        received[entry.sha256] = _receive_blob(tar, member, entry, scratch / f"{len(received)}.blob")
    missing = [sha for sha in expected if sha not in received]
    if missing:
        raise BundleError(f"archive {missing[0][:16]}… listed in the manifest is missing from the bundle")
    return received


def _listed_entry(member: tarfile.TarInfo, expected: dict[str, Entry], received: dict[str, Path]) -> Entry:
    """The manifest entry a member carries: it must be a regular file named blobs/<listed sha256>, once."""
    if not member.isfile():
        raise BundleError(f"bundle member {quote(member.name)} is a {_kind(member)}; only regular files are allowed")
    sha = member.name.removeprefix(BLOBS)
    if not member.name.startswith(BLOBS) or sha not in expected:  # so the name is exactly blobs/<64 hex>
        raise BundleError(f"bundle member {quote(member.name)} is not blobs/<sha256> of an archive the manifest lists")
    if sha in received:
        raise BundleError(f"bundle member {quote(member.name)} appears twice")
    if member.size != expected[sha].size:
        raise BundleError(f"archive {sha[:16]}… is {member.size} bytes, the manifest says {expected[sha].size}")
    return expected[sha]


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    return "directory" if member.isdir() else "device or special file"


def _receive_blob(tar: tarfile.TarFile, member: tarfile.TarInfo, entry: Entry, target: Path) -> Path:
    """Stream one member into target, a new file whose name owes nothing to the bundle."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        digest, _ = copy_hashing(tar.extractfile(member), out)
    if digest != entry.sha256:
        raise BundleError(f"archive {entry.sha256[:16]}… does not match its sha256 (corrupted or tampered)")
    return target


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
