"""Terminal output for the offline commands (rich): progress bars and tables on a terminal, plain
lines otherwise, so logs and scripts get something they can read.

Invariants: only presentation lives here; everything goes to stderr except tables and JSON.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

_stderr = Console(stderr=True)


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


class Transfers:
    """One progress bar per transfer (bytes, rate, ETA) on a terminal; a line per transfer otherwise."""

    def __init__(self) -> None:
        self._progress = None
        if _stderr.is_terminal:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=_stderr)

    def __enter__(self) -> "Transfers":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def tracker(self, label: str) -> Callable[[int, int | None], None]:
        if self._progress is None:
            print(f"fetching {label}", file=sys.stderr, flush=True)
            return lambda done, total: None
        task: TaskID = self._progress.add_task(label, total=None)
        return lambda done, total: self._progress.update(task, completed=done, total=total)


def summary(columns: list[str], rows: list[list[str]]) -> None:
    """A table on a terminal; tab-separated lines otherwise, the column names first."""
    out = Console()
    if out.is_terminal:
        table = Table(*columns)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        for row in [columns, *rows]:
            print("\t".join(row), flush=True)
