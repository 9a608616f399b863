"""A read-only view of the cache's diskcache index, for a cache on a read-only mount.

Invariants: never writes a byte (sqlite opened with mode=ro, no pragma, no table created); it falls
back to immutable=1 only when mode=ro cannot open (a WAL index without its -shm file on a read-only
filesystem), since immutable would hide a writer on another mount; values decode through diskcache's
own Disk.fetch, as Store's do. Knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

import diskcache

DATABASE = "cache.db"  # diskcache's file name inside the index directory


class ReadOnlyIndex:
    """The part of diskcache.Cache that Store reads with: get, _sql, disk, close; writes raise."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        database = self.directory / DATABASE
        self._uri = f"file:{quote(str(database))}?mode=ro" if database.is_file() else None
        self.disk = diskcache.Disk(str(self.directory))
        self._local = threading.local()
        self._connection()  # fail now, in the caller's words, rather than at the first read

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._open()
            self._local.connection = connection
        return connection

    def _open(self) -> sqlite3.Connection:
        if self._uri is None:  # an index no writer has made yet: empty, and left uncreated
            connection = sqlite3.connect(":memory:", check_same_thread=False)
            connection.execute("CREATE TABLE Cache (key, raw, mode, filename, value)")
            return connection
        try:
            connection = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
            connection.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
            return connection
        except sqlite3.OperationalError:
            # A WAL index on a read-only filesystem whose -shm is gone: nothing can write through
            # this mount, so reading it as immutable is sound for this mount's view.
            connection = sqlite3.connect(self._uri + "&immutable=1", uri=True, check_same_thread=False)
            connection.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
            return connection

    def _sql(self, statement: str, params=()):
        return self._connection().execute(statement, params)

    def get(self, key: str):
        db_key, raw = self.disk.put(key)
        row = self._sql("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = ?", (db_key, raw)).fetchone()
        if row is None:
            return None
        mode, filename, value = row
        return self.disk.fetch(mode, filename, value, False)

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()
            self._local.connection = None

    def _refuse(self, *args, **kwargs):
        raise ReadOnlyCache(f"{self.directory.parent} is opened read-only")

    set = delete = transact = _refuse


class ReadOnlyCache(OSError):
    """A write asked of a cache opened read-only."""

    def __init__(self, message: str):
        import errno
        super().__init__(errno.EROFS, message)
