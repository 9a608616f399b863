"""Human-friendly sizes: "200G", "512M", "1.5GiB", "4096". Binary multiples (K = 1024).

Invariants: pure functions; a malformed size raises ValueError with a one-line reason.
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
