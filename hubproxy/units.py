"""Human-friendly sizes ("200G", "512M", "1.5GiB", "4096B"; binary multiples) and durations
("30d", "12h", "90m", "45s"), and sizes formatted for people.

Invariants: pure functions; the unit is never implied: a bare number ("200", "3") is refused,
since read as bytes or seconds it would empty a cache; a malformed value raises ValueError with
a one-line reason and a hint.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGTP]i?)?B|[KMGTP])?\s*", re.IGNORECASE)
_BYTES = {unit: 1024 ** power for power, unit in enumerate(("", "K", "M", "G", "T", "P"))}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])?\s*", re.IGNORECASE)
_SECONDS = {"S": 1, "M": 60, "H": 3600, "D": 86400, "W": 604800}


def parse_size(text: str) -> int:
    """Bytes in a size such as 512M, 200G, 1.5T or 4096B."""
    number, unit = _parse(text, _SIZE, "size", "512M, 200G, 1.5T", "{n}G, {n}M or {n}B (bytes)")
    return int(number * _BYTES[unit.upper().removesuffix("B").removesuffix("I")])


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 30d, 12h, 90m or 45s."""
    number, unit = _parse(text, _DURATION, "duration", "30d, 12h, 90m", "{n}d, {n}h, {n}m or {n}s")
    return number * _SECONDS[unit.upper()]


def _parse(text: str, pattern: re.Pattern, kind: str, examples: str, with_units: str) -> tuple[float, str]:
    match = pattern.fullmatch(text)
    if not match:
        raise ValueError(f"not a {kind}: {text!r} (try {examples})")
    number, unit = match.groups()
    if unit is None:
        raise ValueError(f"{kind} {number!r} has no unit: say {with_units.format(n=number)}")
    return float(number), unit


def format_size(n: int) -> str:
    """A size for people: 1.5 GiB, 312.0 KiB, 12 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
