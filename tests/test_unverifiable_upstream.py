"""An origin that sends an archive with only a Content-Length and no checksum (no x-goog-hash, no
ETag) vouches for nothing: hubproxy checks the archive's own evidence while it streams (one gzip
stream, inflating cleanly to a trailer whose CRC-32 and length match; a tar inside that reaches its
end-of-archive blocks) and treats an archive failing it as a corrupt upstream: the client fails,
nothing is cached. A sound archive without a checksum is still served and cached. A kagglehub
file, which has no structure of its own to check, is refused without its x-goog-hash."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from pathlib import Path

import pytest
import requests

from hubproxy.fetch.archive_integrity import ArchiveIntegrity
from hubproxy.fetch.errors import FetchFailed
from tests import test_kagglehub_through_mirror as through_mirror
from tests.conftest import download_fails, hub_load, loaded_output, model_dirs
from tests.test_kagglehub_through_mirror import file_url
from tests.test_origin_kaggle_api import BIG

# Fixtures of kagglehub's mirror, for its files.
mirror, ca, kaggle_archive, members = through_mirror.mirror, through_mirror.ca, through_mirror.archive, \
    through_mirror.members


def _tar_of(archive: Path) -> bytes:
    return zlib.decompress(archive.read_bytes(), wbits=16 + zlib.MAX_WBITS)


def _flipped(data: bytes, at: int) -> bytes:
    data = bytearray(data)
    data[at] ^= 0xFF
    return bytes(data)


def _without_last_member(archive: Path) -> bytes:
    """The archive's tar cut where its last member starts (no end-of-archive blocks), gzipped
    soundly: what tarfile and tensorflow_hub read to its end without a word."""
    with tarfile.open(archive, "r:gz") as tar:
        last = tar.getmembers()[-1].offset
    return gzip.compress(_tar_of(archive)[:last])


def _two_gzip_members(archive: Path) -> bytes:
    """The tar split over two concatenated gzip streams: tensorflow_hub's streaming tarfile reads
    the first only, and ends there quietly."""
    tar = _tar_of(archive)
    return gzip.compress(tar[:len(tar) // 2]) + gzip.compress(tar[len(tar) // 2:])


UNSOUND = {
    "truncated": lambda a: a.read_bytes()[:len(a.read_bytes()) * 2 // 3],
    "gzip-magic-then-html": lambda a: b"\x1f\x8b" + b"<!doctype html><html><body>Sign in</body></html>" * 40,
    "tar-without-end-blocks": _without_last_member,
    "bad-crc32-trailer": lambda a: _flipped(a.read_bytes(), -6),
    "bad-isize-trailer": lambda a: _flipped(a.read_bytes(), -1),
    "bytes-after-the-gzip-stream": lambda a: a.read_bytes() + b"<html>oops</html>",
    "two-gzip-members": _two_gzip_members,
}


def _unverifiable(origin, data: bytes, path: Path):
    path.write_bytes(data)
    model = origin.register(path)
    origin.faults(model, no_checksum=True)
    return model


def _nothing_stored(proxy) -> bool:
    return (not any(p.is_file() for p in (proxy.cache_dir / "blobs").rglob("*"))
            and not any((proxy.cache_dir / "tmp").iterdir()))


def test_premise_direct_download_of_a_tar_without_its_end_is_silently_accepted(clean_origin, archives, tmp_path):
    model = _unverifiable(clean_origin, _without_last_member(archives.padded), tmp_path / "cut.tar.gz")

    result = hub_load(f"{clean_origin.urls['tfhub']}/{model.handle}", tmp_path / "tfhub")

    assert loaded_output(result) == archives.expected(archives.padded)  # "success"...
    [cached] = model_dirs(tmp_path / "tfhub")
    assert not (cached / "assets" / "pad-b.bin").exists()  # ...with its last member missing, for ever


def test_a_tar_without_its_end_and_no_checksum_fails_tensorflow_hub_through_the_proxy(
        proxy, origin, archives, tmp_path):
    model = _unverifiable(origin, _without_last_member(archives.padded), tmp_path / "cut.tar.gz")

    failed = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert failed.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert _nothing_stored(proxy)


@pytest.mark.parametrize("unsound", sorted(UNSOUND))
def test_an_unsound_archive_without_a_checksum_is_cut_and_caches_nothing(proxy, origin, archives, tmp_path, unsound):
    model = _unverifiable(origin, UNSOUND[unsound](archives.padded), tmp_path / f"{unsound}.tar.gz")

    download_fails(proxy, model)

    assert _nothing_stored(proxy)
    assert "no checksum to vouch for it" in proxy.log.read_text()


@pytest.mark.parametrize("unsound", ["truncated", "tar-without-end-blocks", "bad-crc32-trailer"])
def test_an_unsound_archive_without_a_checksum_is_a_502_naming_it_for_a_waiting_client(
        proxy, origin, archives, tmp_path, unsound):
    model = _unverifiable(origin, UNSOUND[unsound](archives.small), tmp_path / f"{unsound}.tar.gz")

    status, headers, reason = proxy.get(f"/{model.handle}", headers={"Range": "bytes=0-"})

    assert (status, headers["X-Cache"]) == (502, "MISS")
    assert b"no checksum" in reason and reason.count(b"\n") == 1
    assert _nothing_stored(proxy)


@pytest.mark.parametrize("archive", ["small", "padded"])
def test_a_sound_archive_without_a_checksum_is_served_and_cached(proxy, origin, archives, tmp_path, archive):
    path = getattr(archives, archive)
    model = _unverifiable(origin, path.read_bytes(), tmp_path / path.name)

    assert loaded_output(hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")) == archives.expected(path)

    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "HIT", path.read_bytes())


def test_after_an_unsound_archive_the_next_request_fetches_afresh(proxy, origin, archives, tmp_path):
    bad = tmp_path / "model.tar.gz"
    model = _unverifiable(origin, UNSOUND["truncated"](archives.small), bad)
    download_fails(proxy, model)

    bad.write_bytes(archives.small.read_bytes())  # the origin now holds the whole archive
    origin.register(bad, like=model)
    origin.faults(model, no_checksum=True)

    status, headers, body = proxy.get(f"/{model.handle}")
    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.small.read_bytes())


def _tar(*entries: tuple[tarfile.TarInfo, bytes], format: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format) as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **pax: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.pax_headers, info.linkname = kind, pax, "target" if kind == tarfile.SYMTYPE else ""
    return info, data


def _integrity_of(body: bytes, piece: int) -> str | None:
    """What ArchiveIntegrity says of body fed `piece` bytes at a time: None when sound."""
    integrity = ArchiveIntegrity()
    try:
        for start in range(0, len(body), piece):
            integrity.update(body[start:start + piece])
        integrity.verify()
    except FetchFailed as e:
        assert e.status == 502
        return e.message
    return None


MANY_KINDS = [_member("d", kind=tarfile.DIRTYPE), _member("d/" + "long-name-" * 30, os.urandom(3000)),
              _member("link", kind=tarfile.SYMTYPE), _member("notes/ünïcode.txt", b"text " * 5000, comment="x" * 900)]


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("piece", [1, 511, 65536])
def test_sound_tars_of_every_member_kind_pass_however_the_bytes_arrive(format, piece):
    body = gzip.compress(_tar(*MANY_KINDS, format=format))
    assert _integrity_of(body, piece) is None


def test_a_pax_size_is_the_size_of_the_member_after_it():
    tar = _tar(_member("big", os.urandom(2000), size="2000"))
    assert _integrity_of(gzip.compress(tar), 4096) is None


def _corrupt_header(tar: bytes, member_index: int) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar)) as opened:
        at = opened.getmembers()[member_index].offset
    return _flipped(tar, at + 5)  # a byte of the name: only the header's checksum shows it


@pytest.mark.parametrize("unsound, tar, what", [
    ("bad-header-checksum", lambda t: _corrupt_header(t, 2), "bad checksum"),
    ("member-after-a-zero-block", lambda t: bytes(512) + t, "after a zero block"),
    ("no-end-blocks", lambda t: t.rstrip(b"\0")[:-(len(t.rstrip(b"\0")) % 512) or None], "end-of-archive"),
])
def test_an_unsound_tar_in_a_sound_gzip_is_named(unsound, tar, what):
    body = gzip.compress(tar(_tar(*MANY_KINDS)))
    assert what in (_integrity_of(body, 65536) or "")


def test_a_kagglehub_file_without_an_x_goog_hash_is_refused_and_never_stored(mirror, clean_origin, kaggle_archive,
                                                                             members):
    """A file has no structure of its own to check: without its checksum it is refused."""
    model = clean_origin.register(kaggle_archive)
    clean_origin.faults(model, BIG, no_checksum=True)

    refused = requests.get(file_url(mirror, model), timeout=60)
    clean_origin.faults(model, BIG, no_checksum=None)
    again = requests.get(file_url(mirror, model), timeout=60)

    assert refused.status_code == 502 and "x-goog-hash" in refused.text
    assert (again.headers["X-Cache"], again.content) == ("MISS", members[BIG])
