"""Human-friendly sizes ("200G", "512M", "1.5GiB", "4096"; binary multiples) and durations
("30d", "12h", "90m", "45s"), and sizes formatted for people.

Invariants: pure functions; a malformed value raises ValueError with a one-line reason.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)
_BYTES = {unit: 1024 ** power for power, unit in enumerate(("", "K", "M", "G", "T", "P"))}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_SECONDS = {"": 1, "S": 1, "M": 60, "H": 3600, "D": 86400, "W": 604800}


def parse_size(text: str) -> int:
    """Bytes in a size such as 512M, 200G, 1.5T (a bare number is bytes)."""
    return int(_parse(text, _SIZE, _BYTES, "size", "512M, 200G, 1.5T"))


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 30d, 12h, 90m, 45s (a bare number is seconds)."""
    return _parse(text, _DURATION, _SECONDS, "duration", "30d, 12h, 90m")


def _parse(text: str, pattern: re.Pattern, units: dict[str, int], kind: str, examples: str) -> float:
    match = pattern.fullmatch(text)
    if not match:
        raise ValueError(f"not a {kind}: {text!r} (try {examples})")
    number, unit = match.groups()
    return float(number) * units[unit.upper()]


def format_size(n: int) -> str:
    """A size for people: 1.5 GiB, 312.0 KiB, 12 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
