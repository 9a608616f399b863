"""The origin emulator's shared state (tests/origin.py): models, the storage objects they are made
of, fault switches, the request log, the emulated clock, and the signed storage URLs into it.

Invariants: every object a model exposes (its archive and each member file) is a Blob whose
digests and size are those of the file on disk; `by_object` maps every exposed object name to its
Blob and nothing else; a signed URL is an HMAC of (object, date, lifetime) under this run's secret.
Imported by tests/origin.py run as a script, so its siblings import it by its bare name.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import re
import time
import urllib.parse
from dataclasses import dataclass

# ---------------------------------------------------------------- checksums

try:
    import google_crc32c

    def new_crc32c():
        return google_crc32c.Checksum()

except ImportError:  # pure-Python fallback, slow but correct
    _CRC_TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _CRC_TABLE.append(_c)

    class _PyCrc32c:
        def __init__(self):
            self._crc = 0xFFFFFFFF

        def update(self, data):
            crc, table = self._crc, _CRC_TABLE
            for byte in data:
                crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
            self._crc = crc

        def digest(self):
            return (self._crc ^ 0xFFFFFFFF).to_bytes(4, "big")

    def new_crc32c():
        return _PyCrc32c()


def file_digests(path: str) -> tuple[str, str, int]:
    """Return (md5 hex, crc32c base64, size), reading the file in chunks."""
    md5, crc = hashlib.md5(), new_crc32c()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            md5.update(chunk)
            crc.update(chunk)
            size += len(chunk)
    return md5.hexdigest(), base64.b64encode(crc.digest()).decode(), size


# ---------------------------------------------------------------- models and their objects


@dataclass
class Blob:
    """One storage object: its name in the bucket and the file on disk that holds its bytes."""
    name: str
    file: str
    md5: str
    crc32c: str
    size: int
    mtime: float

    @classmethod
    def of_file(cls, name: str, path: str, mtime: float) -> "Blob":
        md5, crc, size = file_digests(path)
        return cls(name=name, file=path, md5=md5, crc32c=crc, size=size, mtime=mtime)

    def describe(self) -> dict:
        return {"object": self.name, "md5": self.md5, "crc32c": self.crc32c, "size": self.size}


@dataclass
class Model:
    handle: str
    owner: str
    model: str
    framework: str  # as Kaggle spells it in URLs and handles: "tensorFlow2"
    variation: str
    version: str
    archive: Blob
    files: dict[str, Blob]  # member path in the archive -> its own object
    private: bool = False
    token: str = ""  # what a private model's Authorization must carry
    instance_id: int = 0
    version_id: int = 0

    @property
    def object(self) -> str:
        return self.archive.name

    @property
    def coords(self) -> tuple[str, ...]:
        return (self.owner, self.model, self.framework, self.variation, self.version)

    @property
    def instance_coords(self) -> tuple[str, ...]:
        return self.coords[:4]

    @property
    def framework_enum(self) -> str:
        return framework_enum(self.framework)

    @property
    def kaggle_download_path(self) -> str:
        return "/api/v1/models/" + "/".join(urllib.parse.quote(p, safe="") for p in self.coords) + "/download"

    def blobs(self) -> list[Blob]:
        return [self.archive, *self.files.values()]


def framework_enum(framework: str) -> str:
    """Kaggle's URL spelling of a framework -> its ModelFramework name: "tensorFlow2" ->
    "MODEL_FRAMEWORK_TENSOR_FLOW_2", "tfLite" -> "MODEL_FRAMEWORK_TF_LITE"."""
    return "MODEL_FRAMEWORK_" + re.sub(r"(?<=[a-z])(?=[A-Z0-9])", "_", framework).upper()


class State:
    def __init__(self, signing_secret: str, url_ttl: int, scratch_dir: str):
        self.signing_secret = signing_secret.encode()
        self.url_ttl = url_ttl
        self.scratch_dir = scratch_dir  # where member files of registered archives are unpacked
        self.urls: dict[str, str] = {}
        self.models: dict[str, Model] = {}
        self.by_object: dict[str, Blob] = {}
        self.by_coords: dict[tuple[str, ...], Model] = {}
        self.instance_ids: dict[tuple[str, ...], int] = {}
        self.ids = itertools.count(1001)
        self.faults: dict[str, dict] = {}
        self.log: list[dict] = []
        self.clock_offset = 0.0
        self.release_event = asyncio.Event()
        self.held = 0
        self.held_changed = asyncio.Condition()

    def now(self) -> float:
        return time.time() + self.clock_offset

    def register(self, model: Model) -> None:
        for old in (self.models.pop(model.handle, None), self.by_coords.pop(model.coords, None)):
            if old is not None:
                self.models.pop(old.handle, None)
                self.by_coords.pop(old.coords, None)
                for blob in old.blobs():
                    self.by_object.pop(blob.name, None)
        model.instance_id = self.instance_ids.setdefault(model.instance_coords, next(self.ids))
        model.version_id = next(self.ids)
        self.models[model.handle] = model
        self.by_coords[model.coords] = model
        for blob in model.blobs():
            self.by_object[blob.name] = blob

    def versions_of(self, instance_coords: tuple[str, ...]) -> list[Model]:
        """The registered versions of one model instance, oldest first."""
        found = [m for m in self.models.values() if m.instance_coords == instance_coords]
        return sorted(found, key=lambda m: int(m.version) if m.version.isdigit() else -1)

    def faults_for(self, obj: str) -> dict:
        """Merged switches: object-specific ones override the '*' ones."""
        return {**self.faults.get("*", {}), **self.faults.get(obj, {})}

    def take_status_fault(self, obj: str) -> int | None:
        """Consume one forced status for obj, if any remains."""
        for key in (obj, "*"):
            switches = self.faults.get(key, {})
            if "status" not in switches:
                continue
            remaining = switches.get("status_count")
            if remaining is None:
                return switches["status"]
            if remaining > 0:
                switches["status_count"] = remaining - 1
                return switches["status"]
        return None

    def take_switch(self, obj: str, name: str) -> bool:
        """Use up a one-time switch of obj (or of '*'): True if it was on."""
        for key in (obj, "*"):
            if self.faults.get(key, {}).pop(name, None) is not None:
                return True
        return False

    def release_all(self) -> None:
        # Held transfers wait on the old event; new holds wait on a fresh one.
        self.release_event.set()
        self.release_event = asyncio.Event()

    def reset(self) -> None:
        self.faults.clear()
        self.log.clear()
        self.clock_offset = 0.0
        self.release_all()


# ---------------------------------------------------------------- signed storage URLs


SIGNATURE_PARAM = "&X-Goog-Signature="
SERVICE_ACCOUNT = "hub-models@kaggle-models.iam.gserviceaccount.com"


def sign(state: State, obj: str, canonical_query: str) -> str:
    """Like GCS's V4 signatures, over the query string's exact bytes: a client that re-encodes it
    (%2F to /, %40 to @, as yarl does by default) gets 403 SignatureDoesNotMatch."""
    message = f"{obj}\n{canonical_query}".encode()
    return hmac.new(state.signing_secret, message, hashlib.sha256).hexdigest()


def signed_gcs_url(state: State, blob: Blob) -> str:
    date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(state.now()))
    canonical = urllib.parse.urlencode({
        "X-Goog-Algorithm": "GOOG4-HMAC-SHA256",
        "X-Goog-Credential": f"{SERVICE_ACCOUNT}/{date[:8]}/auto/storage/goog4_request",
        "X-Goog-Date": date,
        "X-Goog-Expires": str(state.url_ttl),
        "X-Goog-SignedHeaders": "host",
    })
    query = canonical + SIGNATURE_PARAM + sign(state, blob.name, canonical)
    return f"{state.urls['gcs']}/{urllib.parse.quote(blob.name, safe='/')}?{query}"


def redirect_target(state: State, blob: Blob) -> str:
    """Where a download of blob is sent: its signed URL, unless a redirect_to switch says otherwise."""
    return state.faults_for(blob.name).get("redirect_to") or signed_gcs_url(state, blob)


def authorized(model: Model, header: str | None) -> bool:
    """A public model needs nothing; a private one `Bearer <token>` or `Basic base64(<user>:<token>)`."""
    if not model.private:
        return True
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except ValueError:
            return False
    elif scheme.lower() != "bearer":
        return False
    return bool(value) and hmac.compare_digest(value.encode(), model.token.encode())

