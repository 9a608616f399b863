"""Human-friendly sizes ("200G", "512M", "1.5GiB", "4096"; binary multiples) and durations
("30d", "12h", "90m", "45s").

Invariants: pure functions; a malformed value raises ValueError with a one-line reason.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 512M, 200G, 1.5T)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** _POWERS[unit.upper()])


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 30d, 12h, 90m, 45s (a bare number is seconds)."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 30d, 12h, 90m)")
    number, unit = match.groups()
    return float(number) * _SECONDS[unit.lower()]
