"""A bundle's manifest: what export writes, and the strict check import makes before using any of it.

Invariants: `parse` returns a Manifest only when every field has exactly its shape (a sha256 is 64
lowercase hex digits, a size an int, not a bool, between 0 and MAX_ARCHIVE_BYTES, every handle
parses as a hub handle, no field unknown, no sha256 listed twice, bounded counts), so nothing
derived from it can name a file or a host; a signature says who wrote a manifest, never that its
shape is good, so signed manifests get the same check. A refusal is a BundleError whose one-line
message names the field at fault.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..cache.store import SHA256_HEX
from ..units import format_size
from .sources import SourceError, parse_handle

FORMAT = "hubproxy-bundle/1"
MAX_ARCHIVES = 10_000
MAX_HANDLES = 1_000  # spellings of one archive
MAX_ARCHIVE_BYTES = 1 << 40
MAX_TEXT = 4096  # characters in a source or version string
KEY_ID_HEX = re.compile(r"[0-9a-f]{16}")  # signing.key_id

_TOP_FIELDS = {"format", "hubproxy", "created", "key_id", "archives"}
_ENTRY_FIELDS = {"sha256", "size", "handles", "source"}
_SHOWN = 80  # characters of a bad value quoted in a message


class BundleError(ValueError):
    """The bundle is refused; the message is one line."""


@dataclass(frozen=True)
class Entry:
    """One archive the manifest lists, every field checked."""

    sha256: str
    size: int
    handles: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Manifest:
    key_id: str | None
    entries: tuple[Entry, ...]


def build(entries: list[Entry], key_id: str | None, version: str, created: float) -> dict:
    """The JSON-ready manifest export writes; `parse` accepts exactly this shape."""
    return {
        "format": FORMAT,
        "hubproxy": version,
        "created": created,
        "key_id": key_id,
        "archives": [{"sha256": entry.sha256, "size": entry.size, "handles": list(entry.handles),
                      "source": entry.source} for entry in entries],
    }


def parse(data: bytes) -> Manifest:
    """The checked manifest from its bytes; raises BundleError naming the first field at fault."""
    document = _load_json(data)
    if not isinstance(document, dict):
        raise BundleError(f"the manifest must be a JSON object, not a {type(document).__name__}")
    _no_unknown_fields(document, _TOP_FIELDS, "the manifest")
    if document.get("format") != FORMAT:
        raise BundleError(f"the manifest's format must be {FORMAT!r}, {_got(document, 'format')}")
    _optional_text(document, "hubproxy", "the manifest's hubproxy")
    created = document.get("created")
    if created is not None and (isinstance(created, bool) or not isinstance(created, (int, float))):
        raise BundleError(f"the manifest's created must be a number, {_got(document, 'created')}")
    key_id = document.get("key_id")
    if key_id is not None and not _matches(KEY_ID_HEX, key_id):
        raise BundleError(f"the manifest's key_id must be 16 lowercase hex digits, {_got(document, 'key_id')}")
    return Manifest(key_id, _entries(document))


def _load_json(data: bytes) -> object:
    try:
        return json.loads(data, object_pairs_hook=_refuse_repeated_keys, parse_constant=_refuse_constant)
    except BundleError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise BundleError(f"the manifest is not JSON: {reason}") from None


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    found: dict = {}
    for name, value in pairs:
        if name in found:
            raise BundleError(f"the manifest is ambiguous JSON: field {quote(name)} appears twice in one object")
        found[name] = value
    return found


def _refuse_constant(name: str) -> None:
    raise BundleError(f"the manifest is not JSON: {name} is not a JSON number")


def _entries(document: dict) -> tuple[Entry, ...]:
    archives = document.get("archives")
    if not isinstance(archives, list):
        raise BundleError(f"the manifest's archives must be a list, {_got(document, 'archives')}")
    if len(archives) > MAX_ARCHIVES:
        raise BundleError(f"the manifest's archives lists {len(archives)} archives, more than {MAX_ARCHIVES}")
    entries, first_listed = [], {}
    for index, raw in enumerate(archives):
        entry = _entry(raw, f"the manifest's archives[{index}]")
        if entry.sha256 in first_listed:
            raise BundleError(f"the manifest's archives[{index}].sha256 repeats "
                              f"archives[{first_listed[entry.sha256]}]: list each archive once")
        first_listed[entry.sha256] = index
        entries.append(entry)
    return tuple(entries)


def _entry(raw: object, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise BundleError(f"{where} must be an object, not {quote(raw)}")
    _no_unknown_fields(raw, _ENTRY_FIELDS, where)
    sha256 = raw.get("sha256")
    if not _matches(SHA256_HEX, sha256):
        raise BundleError(f"{where}.sha256 must be 64 lowercase hex digits, {_got(raw, 'sha256')}")
    size = raw.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_ARCHIVE_BYTES:
        raise BundleError(f"{where}.size must be a whole number of bytes from 0 to {format_size(MAX_ARCHIVE_BYTES)}, "
                          f"{_got(raw, 'size')}")
    return Entry(sha256, size, _handles(raw, f"{where}.handles"), _optional_text(raw, "source", f"{where}.source"))


def _handles(raw: dict, where: str) -> tuple[str, ...]:
    handles = raw.get("handles")
    if not isinstance(handles, list) or not 1 <= len(handles) <= MAX_HANDLES:
        raise BundleError(f"{where} must be a list of 1 to {MAX_HANDLES} handle URLs, {_got(raw, 'handles')}")
    for index, handle in enumerate(handles):
        if not isinstance(handle, str):
            raise BundleError(f"{where}[{index}] must be a handle URL, not {quote(handle)}")
        try:
            parse_handle(handle)
        except SourceError:
            raise BundleError(f"{where}[{index}] is not a hub handle URL: {quote(handle)}") from None
    return tuple(handles)


def _optional_text(fields: dict, name: str, where: str) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise BundleError(f"{where} must be text of at most {MAX_TEXT} characters, {_got(fields, name)}")
    return value


def _no_unknown_fields(fields: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BundleError(f"{where} has an unknown field {quote(unknown[0])}")


def _matches(pattern: re.Pattern, value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _got(fields: dict, name: str) -> str:
    """What a message says was there instead: the value, or that the field is missing."""
    return f"not {quote(fields[name])}" if name in fields else "but it is missing"


def quote(value: object) -> str:
    """A value from a bundle quoted for a one-line message: repr (which escapes newlines), cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"
