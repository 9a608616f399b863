"""Choosing what to evict or purge: least recently used first, never a pinned entry; and which
entries a typed handle or glob names, checked the one way the CLI and the admin API share.

Invariants: pure functions over Entry lists, no I/O; a blob shared by several keys counts once
and goes only when every key using it goes; the plan never includes a pinned key, nor a key
whose blob is also named by a pinned key; a pattern is a normalised handle key or path, or a glob
of keys or paths, else BadHandle with a one-line reason.
"""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass

from ..handles import (
    FILES_PATH,
    KAGGLE_FILE,
    UPSTREAM_NAMES,
    BadHandle,
    handle_from_key,
    parse_handle_url,
    parse_kaggle_file,
    parse_request_target,
)
from .store import Entry

GLOB_CHARS = "*?["
_GLOB = re.compile(r"[A-Za-z0-9._\-/:*?\[\]!]+")
_KEY_KINDS = (*UPSTREAM_NAMES, KAGGLE_FILE)  # what index keys begin with: archives' upstreams, kagglehub's files
_GLOB_STARTS = ("/", *GLOB_CHARS, *(f"{name}:" for name in _KEY_KINDS))


@dataclass(frozen=True)
class Plan:
    keys: list[str]  # index entries to drop
    blobs: list[str]  # sha256 of blobs no remaining entry uses
    freed: int  # bytes the blobs free
    pinned: int = 0  # how many of the keys are pinned entries (only a purge may take them)


def usage(entries: list[Entry]) -> int:
    """Bytes on disk: each blob once, however many keys name it."""
    return sum({entry.sha256: entry.size for entry in entries}.values())


def to_fit(entries: list[Entry], max_bytes: int) -> Plan:
    """Drop least recently used blobs (with all their keys) until usage <= max_bytes."""
    by_blob = _group_by_blob(entries)
    victims: list[str] = []
    total = usage(entries)
    for sha256, group in sorted(by_blob.items(), key=lambda item: max(e.last_access for e in item[1])):
        if total <= max_bytes:
            break
        if any(entry.pinned for entry in group):
            continue
        victims.append(sha256)
        total -= group[0].size
    return _plan(by_blob, victims)


def older_than(entries: list[Entry], seconds: float, now: float | None = None) -> Plan:
    """Drop blobs none of whose keys was used in the last `seconds`."""
    cutoff = (time.time() if now is None else now) - seconds
    by_blob = _group_by_blob(entries)
    victims = [sha for sha, group in by_blob.items()
               if not any(e.pinned for e in group) and max(e.last_access for e in group) < cutoff]
    return _plan(by_blob, victims)


def matching(entries: list[Entry], patterns: list[str], *, include_pinned: bool) -> Plan:
    """Drop the keys matching any pattern (a key, its path, or a glob of either); a blob goes
    when no remaining key names it."""
    chosen = {e.key for e in entries if (include_pinned or not e.pinned) and _matches(e.key, patterns)}
    remaining = {e.sha256 for e in entries if e.key not in chosen}
    blobs = {e.sha256: e.size for e in entries if e.key in chosen and e.sha256 not in remaining}
    pinned = sum(e.pinned for e in entries if e.key in chosen)
    return Plan(sorted(chosen), sorted(blobs), sum(blobs.values()), pinned)


def _matches(key: str, patterns: list[str]) -> bool:
    path = key.partition(":")[2]
    return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def _group_by_blob(entries: list[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.sha256, []).append(entry)
    return groups


def _plan(by_blob: dict[str, list[Entry]], victims: list[str]) -> Plan:
    keys = sorted(e.key for sha in victims for e in by_blob[sha])
    return Plan(keys, sorted(victims), sum(by_blob[sha][0].size for sha in victims))


def patterns(typed: list[str]) -> list[str]:
    """What operators type → match patterns (see pattern); BadHandle names the first that is none."""
    return [pattern(text) for text in typed]


def pattern(typed: str) -> str:
    """One typed handle → its match pattern: a URL becomes its key, a literal key or path must
    name a handle (returned normalised), a glob must be one of keys or paths."""
    if not typed.isprintable() or any(c.isspace() for c in typed):
        raise BadHandle(f"{typed[:60]!r} contains spaces or control characters")
    text = parse_handle_url(typed).key if typed.startswith(("http://", "https://")) else typed
    return _glob(text) if any(c in text for c in GLOB_CHARS) else _literal(text)


def _glob(text: str) -> str:
    if not _GLOB.fullmatch(text) or not text.startswith(_GLOB_STARTS):
        raise BadHandle(f"{text[:60]!r} is no glob of keys (tfhub:/google/*) or paths (/google/*)")
    return text


def _literal(text: str) -> str:
    if text.startswith("/"):
        return parse_request_target(text).path
    upstream, colon, rest = text.partition(":")
    if not colon:
        raise BadHandle(f"{text[:60]!r} is neither a handle URL (https://tfhub.dev/…), an index key (tfhub:/…), "
                        "a mirror path (/…) nor a glob of them")
    if upstream == KAGGLE_FILE:
        return parse_kaggle_file(FILES_PATH + rest).key
    if upstream not in UPSTREAM_NAMES:
        raise BadHandle(f"{text[:60]!r}: {upstream[:20]!r} is no upstream; keys begin "
                        f"{', '.join(n + ':/' for n in _KEY_KINDS)}")
    return handle_from_key(text).key
