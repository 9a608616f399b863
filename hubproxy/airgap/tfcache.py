"""TFHUB_CACHE_DIR entries, written exactly as tensorflow_hub 0.16.1 writes them, from an archive.

Invariants: an archive is extracted in one streaming pass into TFDIR/<sha1>.<random>.tmp and only
renamed to TFDIR/<sha1> once every member passed the safety rules (regular files and directories
only, relative paths that stay inside, no file written twice or clashing with a directory, bounded
size and ratio, saved_model.pb present); a refused archive leaves nothing behind; nothing is
written outside TFDIR.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import tarfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..handles import tfhub_cache_name

DESCRIPTOR_SUFFIX = ".descriptor.txt"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
COPY_BUFFER = 1 << 20


class UnsafeArchive(ValueError):
    """The archive breaks a safety rule; the message is one line naming the member and the rule."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 << 30  # total extracted size
    max_ratio: float = 200.0  # extracted bytes per compressed byte (decompression bombs)
    max_members: int = 100_000


@dataclass(frozen=True)
class Prepared:
    """An archive extracted and checked, waiting in a temp dir to be published."""

    directory: Path
    files: int
    bytes: int


class _CountingReader:
    """Counts the compressed bytes tarfile pulls, so the ratio can be checked as it streams."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.consumed += len(data)
        return data


def model_dir(tfdir: Path, handle: str) -> Path:
    return tfdir / tfhub_cache_name(handle)


def is_present(tfdir: Path, handle: str) -> bool:
    """What tensorflow_hub checks: the directory exists and is not empty."""
    target = model_dir(tfdir, handle)
    return target.is_dir() and any(target.iterdir())


def prepare(archive: BinaryIO, tfdir: Path, handle: str, limits: Limits = Limits()) -> Prepared:
    """Extract a .tar.gz stream into TFDIR/<sha1>.<random>.tmp; raises UnsafeArchive."""
    tfdir.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(tfdir, handle)
    staging.mkdir()
    try:
        files, size = _extract(_CountingReader(archive), staging, limits)
        if not any((staging / name).is_file() for name in SAVED_MODEL_FILES):
            raise UnsafeArchive("no saved_model.pb at the archive's top level: not a SavedModel")
        return Prepared(staging, files, size)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _extract(reader: _CountingReader, staging: Path, limits: Limits) -> tuple[int, int]:
    files = extracted = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for count, member in enumerate(tar, start=1):
                if count > limits.max_members:
                    raise UnsafeArchive(f"more than {limits.max_members} members")
                target = staging.joinpath(*_safe_parts(member))
                try:
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    extracted += _copy_member(tar, member, target, reader, extracted, limits)
                except (FileExistsError, IsADirectoryError, NotADirectoryError):
                    # The staging dir is ours and fresh: only an earlier member can be in the way.
                    raise UnsafeArchive(f"{member.name!r} clashes with an earlier member (it appears twice, "
                                        "or as both a file and a directory)") from None
                files += 1
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UnsafeArchive(f"not a readable tar.gz archive: {e}") from None
    return files, extracted


def _safe_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    if not (member.isfile() or member.isdir()):
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "device or special file"
        raise UnsafeArchive(f"{member.name!r} is a {kind}; only files and directories are allowed")
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")):
        raise UnsafeArchive(f"{member.name!r} is an absolute path")
    parts = tuple(part for part in path.parts if part not in ("", "."))
    if any(part == ".." or "\\" in part or "\0" in part for part in parts):
        raise UnsafeArchive(f"{member.name!r} leaves the model directory")
    if not parts and not member.isdir():
        raise UnsafeArchive(f"{member.name!r} has no file name")
    return parts


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, reader: _CountingReader,
                 extracted_before: int, limits: Limits) -> int:
    source = tar.extractfile(member)
    written = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while block := source.read(COPY_BUFFER):
            written += len(block)
            total = extracted_before + written
            if total > limits.max_bytes:
                raise UnsafeArchive(f"extracts to more than {limits.max_bytes} bytes")
            if total > 1 << 20 and total > limits.max_ratio * max(reader.consumed, 1):
                raise UnsafeArchive(f"expands more than {limits.max_ratio:g}× (a decompression bomb?)")
            out.write(block)
    return written


def publish(prepared: Prepared, tfdir: Path, handles: list[str], *, force: bool = False) -> list[str]:
    """Install a prepared tree under every handle's sha1 name; returns the handles written.

    The first handle written takes the extracted tree by rename; the others get hard-linked
    copies of it (plain copies across filesystems). Present entries are kept unless force."""
    written: list[str] = []
    try:
        for handle in handles:
            if is_present(tfdir, handle) and not force:
                continue
            staged = prepared.directory
            if written:
                staged = _staging_dir(tfdir, handle)
                shutil.copytree(model_dir(tfdir, written[0]), staged, copy_function=_link_or_copy)
            _replace_dir(staged, model_dir(tfdir, handle))
            _write_descriptor(model_dir(tfdir, handle), handle)
            written.append(handle)
    finally:
        shutil.rmtree(prepared.directory, ignore_errors=True)
    return written


def _staging_dir(tfdir: Path, handle: str) -> Path:
    return tfdir / f"{tfhub_cache_name(handle)}.{uuid.uuid4().hex}.tmp"


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _replace_dir(source: Path, target: Path) -> None:
    """Rename source onto target; an old target is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.{uuid.uuid4().hex}.old")
        os.rename(target, old)
    os.rename(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_descriptor(target: Path, handle: str) -> None:
    """The same text tensorflow_hub writes next to a module it downloaded."""
    text = (f"Module: {handle}\nDownload Time: {datetime.datetime.today()}\n"
            f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})")
    descriptor = target.with_name(target.name + DESCRIPTOR_SUFFIX)
    temp = descriptor.with_name(f".{descriptor.name}.{uuid.uuid4().hex}.tmp")
    temp.write_text(text)
    os.replace(temp, descriptor)


def discard(prepared: Prepared) -> None:
    shutil.rmtree(prepared.directory, ignore_errors=True)


@dataclass(frozen=True)
class CachedModel:
    name: str  # the sha1 directory name
    handle: str | None  # from the descriptor, when there is one
    files: int
    bytes: int
    loadable: bool  # has a saved_model.pb


def list_models(tfdir: Path) -> list[CachedModel]:
    models = []
    for entry in sorted(tfdir.iterdir()) if tfdir.is_dir() else []:
        if not entry.is_dir() or entry.name.startswith(".") or "." in entry.name:
            continue
        files = [p for p in entry.rglob("*") if p.is_file()]
        models.append(CachedModel(
            name=entry.name,
            handle=_descriptor_handle(entry),
            files=len(files),
            bytes=sum(p.stat().st_size for p in files),
            loadable=any((entry / name).is_file() for name in SAVED_MODEL_FILES),
        ))
    return models


def _descriptor_handle(model: Path) -> str | None:
    descriptor = model.with_name(model.name + DESCRIPTOR_SUFFIX)
    try:
        first = descriptor.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError):  # missing, empty or garbled: the handle is unknown
        return None
    return first.removeprefix("Module: ").strip() if first.startswith("Module: ") else None


def install(archive: Path, tfdir: Path, handles: list[str], *, force: bool = False,
            limits: Limits = Limits()) -> list[str]:
    """Extract one archive and publish it under every spelling in handles; returns those written."""
    if not force and all(is_present(tfdir, handle) for handle in handles):
        return []
    with archive.open("rb") as stream:
        prepared = prepare(stream, tfdir, handles[0], limits)
    return publish(prepared, tfdir, handles, force=force)


def install_all(models: list[tuple[Path, list[str]]], tfdir: Path, *, force: bool = False,
                limits: Limits = Limits()) -> list[str]:
    """All or nothing: every archive is extracted and checked before any is published."""
    prepared: list[tuple[Prepared, list[str]]] = []
    try:
        for archive, handles in models:
            with archive.open("rb") as stream:
                prepared.append((prepare(stream, tfdir, handles[0], limits), handles))
    except BaseException:
        for tree, _ in prepared:
            discard(tree)
        raise
    written = []
    for tree, handles in prepared:
        written += publish(tree, tfdir, handles, force=force)
    return written
