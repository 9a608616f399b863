"""Registering a model with the origin emulator (tests/origin.py): its archive, and each member
file of the archive exposed as a storage object of its own, as Kaggle serves a version's files.

Invariants: only regular files whose names stay inside the archive root become member objects,
and nothing is written outside the emulator's scratch directory (a crafted archive registers,
exposing only its safe members); an archive that is not a readable tar exposes no member files;
`extra_files` adds that many small files to the archive and to the file list alike, so that both
always describe the same tree. Unpacking is done once per (archive file, extra_files).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from origin_state import Blob, Model, State

MODEL_FIELDS = ("handle", "owner", "model", "framework", "variation", "version", "object", "file")
EXTRA_FILES_DIR = "extra"

# (archive path, size, mtime_ns, extra_files) -> (archive Blob, member Blobs), names left blank
_unpacked: dict[tuple, tuple[Blob, dict[str, Blob]]] = {}


def model_from_request(state: State, body: dict) -> Model:
    """The Model a /_control/models body describes; ValueError with a one-line reason if it can't be."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    missing = [f for f in MODEL_FIELDS if not body.get(f)]
    if missing:
        raise ValueError(f"missing fields: {', '.join(missing)}")
    path = Path(body["file"])
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    private, token = bool(body.get("private")), str(body.get("token") or "")
    if private and not token:
        raise ValueError("a private model needs a 'token'")
    extra_files = body.get("extra_files", 0)
    if not isinstance(extra_files, int) or extra_files < 0:
        raise ValueError("'extra_files' must be a whole number")
    fields = {f: str(body[f]) for f in MODEL_FIELDS if f not in ("object", "file")}
    fields["handle"] = fields["handle"].strip("/")
    obj = str(body["object"]).lstrip("/")
    archive, members = unpacked(state, path, extra_files)
    files = {name: dataclasses.replace(blob, name=member_object(obj, name)) for name, blob in members.items()}
    return Model(**fields, archive=dataclasses.replace(archive, name=obj), files=files,
                 private=private, token=token)


def member_object(archive_object: str, name: str) -> str:
    """Where a member file lives in the bucket: beside the archive, under the archive's stem."""
    stem = archive_object.removesuffix(".tar.gz")
    return f"{stem if stem != archive_object else archive_object + '.files'}/{name}"


def unpacked(state: State, path: Path, extra_files: int) -> tuple[Blob, dict[str, Blob]]:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, extra_files)
    if key not in _unpacked:
        _unpacked[key] = unpack(Path(tempfile.mkdtemp(dir=state.scratch_dir)), path, extra_files)
    return _unpacked[key]


def unpack(workdir: Path, path: Path, extra_files: int) -> tuple[Blob, dict[str, Blob]]:
    files_dir = workdir / "files"
    members = unpack_members(path, files_dir)
    archive_file = path
    if extra_files:
        if not members:
            raise ValueError(f"'extra_files' needs a readable tar archive: {path}")
        extras = write_extra_files(files_dir, extra_files)
        archive_file = workdir / "archive.tar.gz"
        rebuild_with(path, extras, archive_file)
        members.update(extras)
    archive = Blob.of_file("", str(archive_file), archive_file.stat().st_mtime)
    return archive, {name: Blob.of_file("", str(p), p.stat().st_mtime) for name, p in members.items()}


def safe_member_name(member: tarfile.TarInfo) -> str | None:
    """The member's path relative to the archive root, or None if it is no plain file inside it."""
    if not member.isfile():
        return None
    name = posixpath.normpath(member.name)
    if name.startswith("/") or name in (".", "..") or name.startswith("../") or "\\" in name:
        return None
    return name


def unpack_members(archive: Path, dest: Path) -> dict[str, Path]:
    """Write the archive's plain files under dest; {} (and nothing left behind) if it can't be read."""
    members: dict[str, Path] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = safe_member_name(member)
                if name is None:
                    continue
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.utime(target, (member.mtime, member.mtime))
                members[name] = target
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        shutil.rmtree(dest, ignore_errors=True)
        return {}
    return members


def write_extra_files(files_dir: Path, count: int) -> dict[str, Path]:
    extras = {}
    for i in range(count):
        name = f"{EXTRA_FILES_DIR}/file-{i:04d}.txt"
        target = files_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"extra file {i}\n")
        extras[name] = target
    return extras


def rebuild_with(source: Path, extras: dict[str, Path], out: Path) -> None:
    """A copy of the source archive with the extra files appended."""
    with tarfile.open(source, "r:*") as tar, tarfile.open(out, "w:gz") as rebuilt:
        for member in tar:
            rebuilt.addfile(member, tar.extractfile(member) if member.isfile() else None)
        for name, path in extras.items():
            rebuilt.add(path, arcname=name)
