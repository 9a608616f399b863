"""Where offline tools get a verified archive for a handle: a hubproxy cache dir, a running
mirror, or the upstream itself through the proxy's own verified fetch (flight + store).

Invariants: every Archive handed out is complete and its sha256 is known and checked; scratch
files live under the scratch dir the caller names and are gone when the source is closed;
a failure is a SourceError with a one-line reason naming the handle.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import shutil
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..cache.store import Store
from ..config import Settings
from ..fetch.errors import FetchFailed
from ..fetch.oneshot import Progress, fetch_verified
from ..handles import BadHandle, Handle, parse_handle_url
from .copying import copy_hashing


class SourceError(RuntimeError):
    """No verified archive could be had; the message is one line."""


@dataclass(frozen=True)
class Archive:
    path: Path  # a complete, verified archive on local disk
    sha256: str
    size: int
    source: str  # where it came from, for manifests and messages
    disposable: bool = False  # a scratch copy the caller may delete once used


def parse_handle(handle_url: str) -> Handle:
    """Any spelling a user types (tfhub.dev, Kaggle, storage or mirror URL) → the proxy's Handle."""
    try:
        return parse_handle_url(handle_url)
    except BadHandle as e:
        raise SourceError(str(e)) from None


class CacheSource:
    """Archives from a hubproxy cache dir, with no network at all. Opened read-only: it only reads,
    so a cache on a read-only mount (an air-gapped volume) serves as a source too."""

    def __init__(self, cache_dir: Path):
        if not (cache_dir / "index").is_dir():
            raise SourceError(f"{cache_dir} is not a hubproxy cache dir (no index)")
        self._store = Store(cache_dir, read_only=True)

    def get(self, handle_url: str, progress: Progress | None = None) -> Archive:
        entry = self._store.lookup(parse_handle(handle_url).key)
        if entry is None:
            raise SourceError(f"{handle_url} is not in the cache")
        return Archive(self._store.blob_path(entry.sha256), entry.sha256, entry.size, entry.source)

    def close(self) -> None:
        self._store.close()


class MirrorSource:
    """Archives fetched through a running hubproxy (or any mirror with the same paths)."""

    def __init__(self, mirror_url: str, scratch: Path):
        self._base = mirror_url.rstrip("/")
        self._scratch = scratch

    def get(self, handle_url: str, progress: Progress | None = None) -> Archive:
        handle = parse_handle(handle_url)
        url = f"{self._base}{handle.path}?tf-hub-format=compressed"
        self._scratch.mkdir(parents=True, exist_ok=True)
        target = self._scratch / f"download-{uuid.uuid4().hex}.part"
        try:
            digest, size, announced = _download(url, target, progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            target.unlink(missing_ok=True)
            raise SourceError(f"{handle_url}: download from {self._base} failed: {_reason(e)}") from None
        if announced is not None and announced != digest:
            target.unlink(missing_ok=True)
            raise SourceError(f"{handle_url}: bytes from {self._base} do not match their Repr-Digest")
        return Archive(target, digest, size, url, disposable=True)

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)


def _download(url: str, target: Path, progress: Progress | None) -> tuple[str, int, str | None]:
    """Stream url into target hashing it; a short or broken body raises. (sha256, size, Repr-Digest)."""
    with urllib.request.urlopen(url, timeout=300) as response, target.open("wb") as out:
        total = response.length
        report = None if progress is None else lambda done: progress(done, total)
        digest, size = copy_hashing(response, out, report)
        if total is not None and response.length:
            raise SourceError(f"{url}: body ended {response.length} bytes short")
        announced = _repr_digest_sha256(response.headers.get("Repr-Digest"))
    return digest, size, announced


def _repr_digest_sha256(header: str | None) -> str | None:
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "sha-256" and value.startswith(":") and value.endswith(":"):
            return base64.b64decode(value[1:-1]).hex()
    return None


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        body = error.read(300).decode(errors="replace").strip().splitlines()
        return f"HTTP {error.code}" + (f": {body[0]}" if body else "")
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"


class UpstreamSource:
    """Archives fetched from the hub itself with the proxy's own verified fetch, into a scratch store."""

    def __init__(self, settings: Settings, scratch: Path):
        self._settings = settings
        self._scratch = scratch
        self._store: Store | None = None

    def get(self, handle_url: str, progress: Progress | None = None) -> Archive:
        handle = parse_handle(handle_url)
        if self._store is None:
            self._store = Store(self._scratch)
        try:
            entry = asyncio.run(fetch_verified(self._store, self._settings, handle, progress))
        except FetchFailed as e:
            raise SourceError(f"{handle_url}: {e.message}") from None
        return Archive(self._store.blob_path(entry.sha256), entry.sha256, entry.size, entry.source, disposable=True)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        shutil.rmtree(self._scratch, ignore_errors=True)
