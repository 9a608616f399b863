"""Archives that would write outside TFHUB_CACHE_DIR, plant links or devices, explode, or are not
SavedModels are refused before anything appears in TFHUB_CACHE_DIR."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from hubproxy.airgap.tfcache import UnsafeArchive, install

HANDLE = "https://tfhub.dev/evil/model/1"


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    return _special(name, tarfile.DIRTYPE)


SAVED_MODEL = _file("saved_model.pb", b"\x08\x01")

CASES = {
    "tar-slip": [SAVED_MODEL, _file("../../escaped.txt")],
    "absolute path": [SAVED_MODEL, _file("/tmp/hubproxy-absolute-escape.txt")],
    "symlink": [SAVED_MODEL, _special("variables", tarfile.SYMTYPE, "/etc")],
    "hard link": [SAVED_MODEL, _special("passwd", tarfile.LNKTYPE, "/etc/passwd")],
    "device": [SAVED_MODEL, _special("disk", tarfile.BLKTYPE)],
    "fifo": [SAVED_MODEL, _special("pipe", tarfile.FIFOTYPE)],
    "no saved_model.pb": [_file("variables/variables.index")],
    "duplicate member": [SAVED_MODEL, SAVED_MODEL],
    "file then directory of the same name": [SAVED_MODEL, _file("variables"), _dir("variables")],
    "directory then file of the same name": [SAVED_MODEL, _dir("variables"), _file("variables")],
    "file inside a file": [SAVED_MODEL, _file("assets"), _file("assets/vocab.txt")],
}


@pytest.mark.parametrize("case", CASES)
def test_malicious_archive_is_refused_and_leaves_nothing(tmp_path, case):
    archive = _archive(tmp_path / "evil.tar.gz", CASES[case])
    tfdir = tmp_path / "tfhub"

    with pytest.raises(UnsafeArchive):
        install(archive, tfdir, [HANDLE])

    assert list(tfdir.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/hubproxy-absolute-escape.txt").exists()


def test_decompression_bomb_is_refused(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("saved_model.pb")
        info.size = 300 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    archive.write_bytes(gzip.compress(raw.getvalue(), compresslevel=9))
    tfdir = tmp_path / "tfhub"

    with pytest.raises(UnsafeArchive, match="expands more than"):
        install(archive, tfdir, [HANDLE])
    assert list(tfdir.iterdir()) == []


def test_garbage_is_refused(tmp_path):
    archive = tmp_path / "garbage.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + b"not really gzip" * 100)
    with pytest.raises(UnsafeArchive, match="not a readable"):
        install(archive, tmp_path / "tfhub", [HANDLE])
    assert list((tmp_path / "tfhub").iterdir()) == []
