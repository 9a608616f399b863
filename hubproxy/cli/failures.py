"""How every command ends: one scheme of exit codes, and one line, never a traceback, on failure.

Exit codes, the same for every command:
    0  done;
    1  a finding: the command ran through and reports what it found wrong (a handle that could
       not be warmed, a bad blob, a TFHUB_CACHE_DIR entry that does not load), each named;
    2  the operator's error: usage, config, a bad path, an unopenable cache dir, refused input.

Invariants: every failure is one line on stderr naming the path at fault when there is one;
OSError, sqlite3 and diskcache errors, and text that is not UTF-8, that a command did not handle
itself are caught by the main group (GuardedGroup) and end the same way, so no traceback ever
reaches the operator.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path
from typing import Iterator, NoReturn

import click
import diskcache

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_OPERATOR = 2

ENVIRONMENT_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


class Failure(click.ClickException):
    """The one-line failure: the operator's error, exit status 2."""

    exit_code = EXIT_OPERATOR


def fail(message: str) -> NoReturn:
    raise Failure(message)


def exit_if_found(findings) -> None:
    """End with status 1 when the command found something wrong (it has named each already)."""
    if findings:
        sys.exit(EXIT_FINDING)


def reason(error: BaseException) -> str:
    """One line for an environment error, naming the path when the error carries one."""
    if isinstance(error, OSError):
        text = error.strerror or str(error)
        return f"{error.filename}: {text}" if error.filename else text
    return str(error) or type(error).__name__


class GuardedGroup(click.Group):
    """The last resort: an environment error, or a file that is not UTF-8 text, that a command did
    not handle itself still ends in one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ENVIRONMENT_ERRORS as e:
            raise Failure(reason(e)) from None
        except UnicodeDecodeError as e:
            raise Failure(f"a file read is not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x})") from None


def path_problem(directory: Path, role: str) -> str | None:
    """What keeps `directory` from being used as a writable directory, in one line, or None."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == directory else f" ({existing} is a file)"
        return f"{role} {directory} is not a directory{where}"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{role} {directory} is on a read-only file system"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{role} {directory} is not writable"
    return None


def check_file_target(path: Path, option: str) -> None:
    """Fail naming `path` unless its directory exists and takes a new file (commands that write one
    file never create its directory: a typo there is the operator's, said before any work is done)."""
    where = f"{option} {path}:"
    problem = path_problem(path.parent, where)
    if problem is None and not path.parent.is_dir():
        problem = f"{where} directory {path.parent} does not exist"
    if problem:
        fail(problem)


@contextlib.contextmanager
def directory_errors(directory: Path, role: str) -> Iterator[None]:
    """Environment errors inside become one line saying what is wrong with `directory`."""
    try:
        yield
    except ENVIRONMENT_ERRORS as e:
        fail(path_problem(directory, role) or f"cannot use {role} {directory}: {reason(e)}")


def ensure_dir(directory: Path, role: str) -> None:
    """Create `directory` (and parents) or fail naming it."""
    with directory_errors(directory, role):
        directory.mkdir(parents=True, exist_ok=True)
