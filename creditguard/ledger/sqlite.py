"""``SQLiteLedger``: the ledger in a SQLite file (the standard library's ``sqlite3``).

Safe for many processes on one machine: the file is in WAL mode (readers never wait for
the writer), every write is one short ``BEGIN IMMEDIATE`` transaction of a batch, and a
writer waits up to ``busy_timeout`` seconds for another's lock before trying again later.
Not for a file on a network file system: use :class:`PostgresLedger` for many machines.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

from creditguard.ledger.base import Ledger
from creditguard.ledger.schema import SQLITE, LedgerError

__all__ = ["SQLiteLedger"]


class SQLiteLedger(Ledger):
    """The spend ledger in the SQLite file ``path`` (made, with its schema, at the first
    write). ``busy_timeout``: seconds a write waits for another process's lock before it
    is tried again later. The other options are :class:`Ledger`'s."""

    dialect = SQLITE

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0, **options: Any
    ) -> None:
        if sqlite3.sqlite_version_info < (3, 24, 0):
            raise LedgerError(
                f"SQLiteLedger needs SQLite 3.24 or later, not {sqlite3.sqlite_version}"
            )
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            raise ValueError(f"path must be a file's path, got {self.path!r}")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)):
            raise ValueError(f"busy_timeout must be seconds, got {busy_timeout!r}")
        self._busy = max(float(busy_timeout), 0.0)
        super().__init__(**options)

    @property
    def where(self) -> str:
        return f"sqlite:///{self.path}"

    def __repr__(self) -> str:
        return f"SQLiteLedger({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._busy, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _transaction(self, conn: Any, write: bool = True) -> Iterator[Any]:
        cursor = conn.cursor()
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cursor
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")
