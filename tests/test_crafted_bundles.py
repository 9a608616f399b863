"""A crafted bundle is refused with a one-line reason and writes nothing anywhere: not outside the
import's target, and no scratch or empty directory inside it. Each bundle is built here with
tarfile and imported through the library calls the CLI makes (bundle.verify into a scratch dir
inside the target, then tfcache.install_all only if that passed), unsigned with --allow-unsigned's
consent and signed with a good key: a signature vouches for who wrote a manifest, never for its shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import stat
import tarfile
import uuid
from pathlib import Path
from typing import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hubproxy.airgap import bundle, signing, tfcache
from hubproxy.airgap.sources import Archive, parse_handle
from hubproxy.cache.store import Store

HANDLE = "https://tfhub.dev/crafted/model/1"
KAGGLE_HANDLE = "https://www.kaggle.com/models/crafted/model/tensorFlow2/default/1"
FORMAT = "hubproxy-bundle/1"
DROP = object()  # a field value meaning "leave the field out"


# -- building bundles ------------------------------------------------------------------------

def _regular(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes | None) -> None:
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _blob(name: str | None = None, data: bytes | None = None) -> tuple[tarfile.TarInfo, bytes]:
    """A regular member: by default the archive the manifest lists, under its proper name."""
    data = BLOB if data is None else data
    return _regular(name or f"blobs/{SHA}", data), data


def _savedmodel_lookalike(payload: bytes) -> bytes:
    """A tiny .tar.gz that tfcache accepts as a SavedModel (it only checks saved_model.pb is there)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        _add(tar, _regular("saved_model.pb", payload), payload)
    return out.getvalue()


BLOB = _savedmodel_lookalike(b"crafted model")
SHA = hashlib.sha256(BLOB).hexdigest()
KEY = Ed25519PrivateKey.generate()


@dataclasses.dataclass
class Crafted:
    """A bundle's parts: the manifest (JSON-able, or raw bytes), then the members after it (and
    after manifest.sig when signed); `lead` members go before manifest.json; `cut` ends the
    file halfway through the first blob's bytes."""

    manifest: object
    members: list = dataclasses.field(default_factory=lambda: [_blob()])
    lead: list = dataclasses.field(default_factory=list)
    cut: bool = False


def _entry(**fields) -> dict:
    entry = {"sha256": SHA, "size": len(BLOB), "handles": [HANDLE], "source": "crafted"}
    entry.update(fields)
    return {name: value for name, value in entry.items() if value is not DROP}


def _manifest(archives: object = None, **fields) -> dict:
    manifest = {"format": FORMAT, "hubproxy": "test", "created": 0.0, "key_id": None,
                "archives": [_entry()] if archives is None else archives}
    manifest.update(fields)
    return {name: value for name, value in manifest.items() if value is not DROP}


def _entry_case(members: list | None = None, **fields) -> Crafted:
    return Crafted(_manifest([_entry(**fields)]), *([members] if members is not None else []))


def _write(path: Path, crafted: Crafted, key: Ed25519PrivateKey | None) -> Path:
    if isinstance(crafted.manifest, bytes):
        manifest_bytes = crafted.manifest
    else:
        manifest = crafted.manifest
        if key is not None and isinstance(manifest, dict) and manifest.get("key_id", DROP) is None:
            manifest = {**manifest, "key_id": signing.key_id(key.public_key())}
        manifest_bytes = json.dumps(manifest).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in crafted.lead:
            _add(tar, info, data)
        _add(tar, _regular("manifest.json", manifest_bytes), manifest_bytes)
        if key is not None:
            signature = key.sign(manifest_bytes)
            _add(tar, _regular("manifest.sig", signature), signature)
        for info, data in crafted.members:
            _add(tar, info, data)
    if crafted.cut:
        with tarfile.open(path) as tar:
            blob = next(info for info in tar.getmembers() if info.name.startswith("blobs/"))
        os.truncate(path, blob.offset_data + blob.size // 2)
    return path


# -- the corpus ------------------------------------------------------------------------------

TRAVERSAL = ("../../escaped-" + "x" * 64)[:64]  # from TARGET/.scratch to the test's own tmp_path
ABSOLUTE = ("/nonexistent-hubproxy-crafted/" + "x" * 64)[:64]
NESTED = b"[" * 200_000 + b"]" * 200_000

CASES: list[tuple[str, str, Callable[[], Crafted]]] = [
    # sha256
    ("sha256-traversal", "archives[0].sha256", lambda: _entry_case([_blob(f"blobs/{TRAVERSAL}")], sha256=TRAVERSAL)),
    ("sha256-absolute", "archives[0].sha256", lambda: _entry_case([_blob(f"blobs/{ABSOLUTE}")], sha256=ABSOLUTE)),
    ("sha256-uppercase", "archives[0].sha256", lambda: _entry_case([_blob(f"blobs/{SHA.upper()}")],
                                                                  sha256=SHA.upper())),
    ("sha256-63-chars", "archives[0].sha256", lambda: _entry_case([_blob(f"blobs/{SHA[:63]}")], sha256=SHA[:63])),
    ("sha256-65-chars", "archives[0].sha256", lambda: _entry_case([_blob(f"blobs/{SHA}0")], sha256=SHA + "0")),
    ("sha256-not-hex", "archives[0].sha256", lambda: _entry_case([_blob(f"blobs/{'g' * 64}")], sha256="g" * 64)),
    ("sha256-newline", "archives[0].sha256", lambda: _entry_case(sha256=SHA[:63] + "\n")),
    ("sha256-number", "archives[0].sha256", lambda: _entry_case(sha256=12345)),
    ("sha256-list", "archives[0].sha256", lambda: _entry_case(sha256=[SHA])),
    ("sha256-null", "archives[0].sha256", lambda: _entry_case(sha256=None)),
    ("sha256-missing", "archives[0].sha256", lambda: _entry_case(sha256=DROP)),
    # size
    ("size-negative", "archives[0].size", lambda: _entry_case(size=-1)),
    ("size-bool", "archives[0].size", lambda: _entry_case(size=True)),
    ("size-float", "archives[0].size", lambda: _entry_case(size=float(len(BLOB)))),
    ("size-string", "archives[0].size", lambda: _entry_case(size=str(len(BLOB)))),
    ("size-huge", "archives[0].size", lambda: _entry_case(size=10**20)),
    ("size-missing", "archives[0].size", lambda: _entry_case(size=DROP)),
    ("size-nan", "NaN", lambda: Crafted(json.dumps(_manifest([_entry(size=float("nan"))])).encode())),
    # handles
    ("handles-empty", "archives[0].handles", lambda: _entry_case(handles=[])),
    ("handles-not-a-list", "archives[0].handles", lambda: _entry_case(handles=HANDLE)),
    ("handles-not-strings", "archives[0].handles[0]", lambda: _entry_case(handles=[123])),
    ("handle-dot-dot", "archives[0].handles[0]", lambda: _entry_case(handles=["https://tfhub.dev/google/../x/1"])),
    ("handle-host-only", "archives[0].handles[0]", lambda: _entry_case(handles=["https://tfhub.dev"])),
    ("handle-host-slash", "archives[0].handles[0]", lambda: _entry_case(handles=["https://tfhub.dev/"])),
    ("handle-not-a-url", "archives[0].handles[0]", lambda: _entry_case(handles=["../../etc/passwd"])),
    ("handles-missing", "archives[0].handles", lambda: _entry_case(handles=DROP)),
    # other fields
    ("source-not-a-string", "archives[0].source", lambda: _entry_case(source=5)),
    ("entry-unknown-field", "archives[0]", lambda: _entry_case(path="/etc/passwd")),
    ("entry-not-an-object", "archives[0]", lambda: Crafted(_manifest(["blobs/x"]))),
    ("key-id-number", "key_id", lambda: Crafted(_manifest(key_id=5))),
    ("key-id-traversal", "key_id", lambda: Crafted(_manifest(key_id="../../../../x"))),
    ("unknown-top-field", "unknown field", lambda: Crafted(_manifest(extra=1))),
    # archives
    ("archives-object", "archives", lambda: Crafted(_manifest({SHA: _entry()}))),
    ("archives-string", "archives", lambda: Crafted(_manifest(f"blobs/{SHA}"))),
    ("archives-null", "archives", lambda: Crafted({**_manifest(), "archives": None})),
    ("archives-missing", "archives", lambda: Crafted(_manifest(archives=DROP))),
    ("archives-too-many", "archives", lambda: Crafted(_manifest([_entry()] * 10_001))),
    ("duplicate-entries", "archives[1].sha256", lambda: Crafted(_manifest([_entry(), _entry()]))),
    ("duplicate-json-key", "sha256", lambda: Crafted(
        json.dumps(_manifest([_entry()])).replace('"size"', f'"sha256": "{TRAVERSAL}", "size"').encode())),
    # the manifest as a whole
    ("manifest-not-json", "not JSON", lambda: Crafted(b"{this is not json")),
    ("manifest-not-utf8", "not JSON", lambda: Crafted(b'{"format": "\xff\xfe"}')),
    ("manifest-json-array", "JSON object", lambda: Crafted([_manifest()])),
    ("manifest-deeply-nested", "not JSON", lambda: Crafted(NESTED)),
    ("format-wrong", "format", lambda: Crafted(_manifest(format="hubproxy-bundle/2"))),
    ("format-missing", "format", lambda: Crafted(_manifest(format=DROP))),
    ("format-not-a-string", "format", lambda: Crafted(_manifest(format=["hubproxy-bundle/1"]))),
    ("manifest-not-first", "does not start with", lambda: Crafted(_manifest(), lead=[_blob()])),
    ("manifest-a-symlink", "does not start with", lambda: Crafted(
        _manifest(), lead=[(_special("manifest.json", tarfile.SYMTYPE, "/etc/passwd"), None)])),
    # members
    ("member-dot-dot", "member", lambda: Crafted(_manifest(), [_blob(), _blob("blobs/../../x")])),
    ("member-absolute", "member", lambda: Crafted(_manifest(), [_blob(), _blob("/abs")])),
    ("member-pax-path", "member", lambda: Crafted(_manifest(), [_blob(), _pax_renamed("../../pax-escaped")])),
    ("member-symlink", "member", lambda: Crafted(
        _manifest(), [(_special(f"blobs/{SHA}", tarfile.SYMTYPE, "../../escaped"), None)])),
    ("member-hardlink", "member", lambda: Crafted(
        _manifest(), [(_special(f"blobs/{SHA}", tarfile.LNKTYPE, "manifest.json"), None)])),
    ("member-device", "member", lambda: Crafted(_manifest(), [(_special(f"blobs/{SHA}", tarfile.CHRTYPE), None)])),
    ("member-fifo", "member", lambda: Crafted(_manifest(), [(_special(f"blobs/{SHA}", tarfile.FIFOTYPE), None)])),
    ("member-directory", "member", lambda: Crafted(_manifest(), [(_special("blobs", tarfile.DIRTYPE), None), _blob()])),
    ("member-not-listed", "member", lambda: Crafted(_manifest(), [_blob(), _blob(f"blobs/{'0' * 64}")])),
    ("member-listed-twice", "member", lambda: Crafted(_manifest(), [_blob(), _blob()])),
    ("member-uppercase-name", "member", lambda: Crafted(_manifest(), [_blob(f"blobs/{SHA.upper()}")])),
    ("member-late-signature", "member", lambda: Crafted(_manifest(), [_blob(), _blob("manifest.sig", b"x" * 64)])),
    ("blob-bytes-differ", "does not match its sha256", lambda: Crafted(
        _manifest(), [_blob(data=BLOB[:-1] + bytes([BLOB[-1] ^ 1]))])),
    ("blob-size-differs", "bytes, the manifest says", lambda: Crafted(_manifest(), [_blob(data=BLOB + b"!")])),
    ("blob-missing", "missing from the bundle", lambda: Crafted(_manifest(), [])),
    ("blob-truncated", "not a readable bundle", lambda: Crafted(_manifest(), cut=True)),
]


def _pax_renamed(path: str) -> tuple[tarfile.TarInfo, bytes]:
    """A member whose ustar name is harmless but whose PAX header renames it."""
    info, data = _blob()
    info.pax_headers = {"path": path}
    return info, data


# -- importing, and what it left behind --------------------------------------------------------

def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (links not followed) with its type and, for files, a hash of its bytes."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                found[str(path.relative_to(root))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[str(path.relative_to(root))] = ("dir" if stat.S_ISDIR(mode) else oct(mode),)
    return found


def _import(bundle_file: Path, target: Path, signed: bool) -> list[str]:
    """What `hubproxy bundle import --tfhub-dir TARGET` does, through the same library calls."""
    public = KEY.public_key() if signed else None
    verified = bundle.verify(bundle_file, target / f".hubproxy-import-{uuid.uuid4().hex}", public,
                             allow_unsigned=not signed)
    try:
        return tfcache.install_all([(item.archive.path, item.handles) for item in verified.items], target)
    finally:
        verified.discard()


@pytest.fixture(params=["target-absent", "target-exists"])
def target(request, tmp_path) -> Path:
    """The import's target: absent (the import creates it) or already holding someone's file."""
    target = tmp_path / "target"
    if request.param == "target-exists":
        target.mkdir()
        (target / "someone-elses.txt").write_text("keep me")
    return target


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("reason, craft", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_crafted_bundle_is_refused_in_one_line_and_writes_nothing_anywhere(tmp_path, target, signed, reason,
                                                                             craft):
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    bundle_file = _write(crafted / "crafted.tar", craft(), KEY if signed else None)
    before = _snapshot(tmp_path)

    with pytest.raises(bundle.BundleError) as refused:
        _import(bundle_file, target, signed)

    assert _snapshot(tmp_path) == before
    message = str(refused.value)
    assert reason in message and message.strip() and "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_the_corpus_builder_makes_importable_bundles_when_nothing_is_crafted(tmp_path, target, signed):
    """The control: every refusal above comes from its crafting, not from a broken builder."""
    bundle_file = _write(tmp_path / "plain.tar", Crafted(_manifest()), KEY if signed else None)

    assert _import(bundle_file, target, signed) == [HANDLE]

    assert (tfcache.model_dir(target, HANDLE) / "saved_model.pb").read_bytes() == b"crafted model"
    assert not [path for path in target.iterdir() if path.name.startswith(".hubproxy-import-")]


def test_an_archive_tfcache_refuses_after_verify_leaves_no_empty_target(tmp_path):
    """Verify passes (hash and manifest are fine) but the archive is not a SavedModel: the install
    step refuses it, and the target directory the import created is gone again."""
    not_a_model = b"not a tar.gz at all"
    sha = hashlib.sha256(not_a_model).hexdigest()
    crafted = Crafted(_manifest([_entry(sha256=sha, size=len(not_a_model))]),
                      [_blob(f"blobs/{sha}", not_a_model)])
    bundle_file = _write(tmp_path / "not-a-model.tar", crafted, None)
    before = _snapshot(tmp_path)

    with pytest.raises(tfcache.UnsafeArchive):
        _import(bundle_file, tmp_path / "nested" / "target", signed=False)

    assert _snapshot(tmp_path) == before


def test_an_existing_scratch_dir_is_refused_and_left_alone(tmp_path):
    bundle_file = _write(tmp_path / "plain.tar", Crafted(_manifest()), None)
    scratch = tmp_path / "target" / ".hubproxy-import-taken"
    scratch.mkdir(parents=True)
    (scratch / "theirs").write_text("not ours to delete")
    before = _snapshot(tmp_path)

    with pytest.raises(bundle.BundleError, match="scratch"):
        bundle.verify(bundle_file, scratch, None, allow_unsigned=True)

    assert _snapshot(tmp_path) == before


# -- hubproxy's own export -------------------------------------------------------------------

def _archive(directory: Path, payload: bytes) -> Archive:
    data = _savedmodel_lookalike(payload)
    path = directory / f"{hashlib.sha256(data).hexdigest()[:12]}.tar.gz"
    path.write_bytes(data)
    return Archive(path, hashlib.sha256(data).hexdigest(), len(data), f"test:{payload.decode()}")


def test_hubproxys_own_export_verifies_and_round_trips_every_handle(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    first, second = _archive(sources, b"first model"), _archive(sources, b"second model")
    other_spelling = "https://tfhub.dev/crafted/other-spelling/1"
    items = [bundle.Item([HANDLE, KAGGLE_HANDLE], first), bundle.Item(["https://tfhub.dev/crafted/second/1"], second),
             bundle.Item([other_spelling], first)]  # the same archive named again in another group
    out = tmp_path / "exported.tar"
    bundle.export(out, items, KEY)
    every_handle = [HANDLE, KAGGLE_HANDLE, "https://tfhub.dev/crafted/second/1", other_spelling]

    tfdir = tmp_path / "tfhub"
    assert sorted(_import(out, tfdir, signed=True)) == sorted(every_handle)
    for handle, payload in zip(every_handle, [b"first model", b"first model", b"second model", b"first model"]):
        assert (tfcache.model_dir(tfdir, handle) / "saved_model.pb").read_bytes() == payload

    cache = tmp_path / "proxy-cache"
    verified = bundle.verify(out, cache / f".hubproxy-import-{uuid.uuid4().hex}", KEY.public_key(), False)
    try:
        assert sorted(bundle.seed_proxy_cache(verified, cache)) == sorted(parse_handle(h).key for h in every_handle)
    finally:
        verified.discard()
    store = Store(cache)
    try:
        for handle, archive in zip(every_handle, [first, first, second, first]):
            entry = store.lookup(parse_handle(handle).key)
            assert (entry.sha256, entry.size) == (archive.sha256, archive.size)
            assert store.blob_path(entry.sha256).read_bytes() == archive.path.read_bytes()
    finally:
        store.close()
    assert not [path for path in cache.iterdir() if path.name.startswith(".hubproxy-import-")]
