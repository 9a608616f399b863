"""What the origin promises about the bytes it sends (length, ETag, x-goog-hash crc32c/md5), the
digests computed while they arrive, and the checks of one against the other.

Invariants: sha256 is always computed (it names the blob); a fetch with neither a length nor a
checksum, a body with a Content-Encoding other than identity, an archive whose body is not gzip,
or a file without a checksum, is refused; an archive without a checksum must prove itself sound
(one complete gzip stream of a tar that reaches its end); a check
either passes or raises FetchFailed(502) naming what did not match.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import BinaryIO

import google_crc32c

from .archive_integrity import ArchiveIntegrity
from .errors import FetchFailed
from .media_type import safe_media_type

GZIP_MAGIC = b"\x1f\x8b"
HASH_BLOCK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Evidence:
    content_length: int | None
    md5: bytes | None
    crc32c: int | None
    etag: str | None
    content_type: str
    content_encoding: str = "identity"
    sha256: bytes | None = None  # a parent hubproxy's Repr-Digest (RFC 9530): checked at the end

    @classmethod
    def from_headers(cls, headers) -> "Evidence":
        md5 = crc32c = None
        for value in headers.getall("x-goog-hash", []):
            for part in value.split(","):
                name, _, encoded = part.strip().partition("=")
                digest = _b64(encoded)
                if name == "md5" and digest is not None and len(digest) == 16:
                    md5 = digest
                elif name == "crc32c" and digest is not None and len(digest) == 4:
                    crc32c = int.from_bytes(digest, "big")
        sha256 = None
        for part in ",".join(headers.getall("Repr-Digest", [])).split(","):
            name, _, encoded = part.strip().partition("=")
            digest = _b64(encoded.strip().strip(":"))
            if name.strip().lower() == "sha-256" and digest is not None and len(digest) == 32:
                sha256 = digest
        length = headers.get("Content-Length")
        return cls(
            content_length=int(length) if length and length.isdigit() else None,
            md5=md5,
            crc32c=crc32c,
            etag=headers.get("ETag"),
            content_type=safe_media_type(headers.get("Content-Type")),
            content_encoding=", ".join(headers.getall("Content-Encoding", [])) or "identity",
            sha256=sha256,
        )


    @property
    def x_goog_hash(self) -> str | None:
        """The checksums as an x-goog-hash header value, for a client that checks them itself."""
        parts = []
        if self.crc32c is not None:
            parts.append("crc32c=" + base64.b64encode(self.crc32c.to_bytes(4, "big")).decode())
        if self.md5 is not None:
            parts.append("md5=" + base64.b64encode(self.md5).decode())
        return ",".join(parts) or None


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


class Digests:
    """sha256 always; the origin's crc32c when given, else its md5; for an archive the origin gave
    no checksum for, the archive's own integrity instead (archive_integrity).

    Either checksum catches transfer corruption; crc32c runs at ~15 GB/s where md5 manages ~0.8
    GB/s, which would make md5 the slowest step of every miss. Inflating an archive costs more
    still (zlib: ~1 GB/s of incompressible weights, far less of text), so it is only done when the
    origin's checksum is missing.
    """

    def __init__(self, evidence: Evidence, archive: bool = True):
        self.sha256 = hashlib.sha256()
        self.crc32c = google_crc32c.Checksum() if evidence.crc32c is not None else None
        wants_md5 = evidence.md5 is not None and self.crc32c is None
        self.md5 = hashlib.md5(usedforsecurity=False) if wants_md5 else None
        unchecked = self.crc32c is None and self.md5 is None
        self.integrity = ArchiveIntegrity() if archive and unchecked else None

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        if self.crc32c is not None:
            self.crc32c.update(data)
        if self.integrity is not None:
            self.integrity.update(data)  # raises FetchFailed as soon as the archive shows itself unsound

    def update_all(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.update(piece)

    def update_from(self, file: BinaryIO) -> int:
        """Take in the file's bytes from its start (blocking: run it in a thread); returns how many."""
        file.seek(0)
        count = 0
        while block := file.read(HASH_BLOCK):
            self.update(block)
            count += len(block)
        return count

    def mismatch(self, evidence: Evidence) -> str | None:
        if self.md5 is not None and self.md5.digest() != evidence.md5:
            return "md5"
        if self.crc32c is not None and int.from_bytes(self.crc32c.digest(), "big") != evidence.crc32c:
            return "crc32c"
        return None


def refuse_unverifiable(evidence: Evidence, archive: bool = True, framed: bool = False) -> None:
    """Before the body: refuse what we could never vouch for. An archive is checked for its gzip
    start too; a file (kagglehub's) has no magic to check, so its checksum is required. A body
    encoded although we asked for identity is not the object's bytes (nor what its checksum covers
    when the origin transcoded it), and decoding it would hide that: it is refused. framed: the body
    comes from a parent hubproxy, whose terminating chunk is its verdict, so an archive needs no
    length (it must still prove itself sound)."""
    if evidence.content_encoding.strip().lower() != "identity":
        raise FetchFailed(502, f"upstream sent Content-Encoding {evidence.content_encoding[:40]!r} although "
                               "hubproxy asked for identity; refusing the encoded bytes")
    if archive and evidence.content_type.split(";")[0].strip().lower() == "text/html":
        raise FetchFailed(502, "upstream answered with an HTML page, not a model archive")
    if not archive and evidence.md5 is None and evidence.crc32c is None:
        raise FetchFailed(502, "upstream sent a file without an x-goog-hash checksum; refusing to vouch for it")
    if evidence.content_length is None and evidence.md5 is None and evidence.crc32c is None \
            and evidence.sha256 is None and not (framed and archive):
        raise FetchFailed(502, "upstream gave neither Content-Length nor a checksum; refusing to vouch for it")


def check_archive_start(first_bytes: bytes) -> None:
    if not first_bytes.startswith(GZIP_MAGIC):
        raise FetchFailed(502, "upstream did not send a gzip archive")


def check_complete(evidence: Evidence, received: int, digests: Digests) -> None:
    """After the body: every byte the origin promised arrived, and they match its checksum (or,
    lacking one, make a sound archive)."""
    expected = evidence.content_length
    if expected is not None and received != expected:
        raise FetchFailed(502, f"upstream sent {received} of {expected} bytes")
    if evidence.sha256 is not None and digests.sha256.digest() != evidence.sha256:
        raise FetchFailed(502, "upstream bytes do not match the sha256 its Repr-Digest states")
    bad = digests.mismatch(evidence)
    if bad:
        raise FetchFailed(502, f"upstream bytes do not match its own {bad} checksum")
    if digests.integrity is not None:
        digests.integrity.verify()
