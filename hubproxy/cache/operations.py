"""Carrying out what the plans choose, the one way every caller does it (admin API, command line,
housekeeping): entries leave the index, then the blobs that no entry names any more; pins.

Invariants: an entry leaves the index before its blob is deleted, and a blob is deleted only when
no index entry names it; blocking calls, run them in a thread from async code.
"""

from __future__ import annotations

from .plans import Plan, matching
from .store import Store


def carry_out(store: Store, plan: Plan) -> None:
    """Remove the plan's entries, then those of its blobs no remaining entry uses."""
    store.remove_keys(plan.keys)
    store.delete_unused_blobs(plan.blobs)


def set_pinned(store: Store, patterns: list[str], pinned: bool) -> list[str]:
    """Pin (or unpin) every entry matching the patterns; returns their keys."""
    keys = matching(store.entries(), patterns, include_pinned=True).keys
    for key in keys:
        store.set_pinned(key, pinned)
    return keys
