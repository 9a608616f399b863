"""Writing the CA's files: created with their final mode from the first byte, whole or not at all.

Invariants: a file is opened with O_CREAT|O_EXCL and its mode (0600 for keys), so no moment
exists at which it is readable by more than it should be and nothing is ever chmod-ed after the
fact; `replace=False` never touches an existing file (FileExistsError); `replace=True` writes a
hidden sibling and renames it over the old one, so readers see the old file or the new, never a
part; a write that fails leaves no partial file behind.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


def write_new(path: Path, data: bytes, *, mode: int, replace: bool = False) -> None:
    """Write `data` to `path` with `mode` (less the umask); see the module's invariants."""
    target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") if replace else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
