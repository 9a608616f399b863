"""The origin's evidence is read exactly, and a mismatch in any checksum it gives is caught."""

from __future__ import annotations

import base64
import hashlib

import google_crc32c
from multidict import CIMultiDict

from hubproxy.fetch.evidence import Digests, Evidence

DATA = b"\x1f\x8b" + bytes(range(256)) * 100


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _crc(data: bytes) -> bytes:
    return google_crc32c.value(data).to_bytes(4, "big")


def test_x_goog_hash_in_one_or_several_headers():
    joined = CIMultiDict({"x-goog-hash": f"crc32c={_b64(_crc(DATA))},md5={_b64(hashlib.md5(DATA).digest())}",
                          "Content-Length": str(len(DATA))})
    split = CIMultiDict([("x-goog-hash", f"crc32c={_b64(_crc(DATA))}"),
                         ("x-goog-hash", f"md5={_b64(hashlib.md5(DATA).digest())}")])
    for headers in (joined, split):
        evidence = Evidence.from_headers(headers)
        assert evidence.md5 == hashlib.md5(DATA).digest()
        assert evidence.crc32c == google_crc32c.value(DATA)
    assert Evidence.from_headers(joined).content_length == len(DATA)


def test_garbage_hashes_are_ignored_not_trusted():
    evidence = Evidence.from_headers(CIMultiDict({"x-goog-hash": "md5=!!!,crc32c=AAAA AAAA"}))
    assert evidence.md5 is None and evidence.crc32c is None


def test_crc32c_only_evidence_catches_corruption():
    """Composite GCS objects carry only crc32c: it alone must still catch a flipped byte."""
    evidence = Evidence.from_headers(CIMultiDict({"x-goog-hash": f"crc32c={_b64(_crc(DATA))}"}))
    good, bad = Digests(evidence), Digests(evidence)
    good.update(DATA)
    bad.update(DATA[:-1] + bytes([DATA[-1] ^ 0xFF]))
    assert good.mismatch(evidence) is None
    assert bad.mismatch(evidence) == "crc32c"


def test_md5_mismatch_is_named():
    evidence = Evidence.from_headers(CIMultiDict({"x-goog-hash": f"md5={_b64(hashlib.md5(DATA).digest())}"}))
    bad = Digests(evidence)
    bad.update(DATA + b"x")
    assert bad.mismatch(evidence) == "md5"
