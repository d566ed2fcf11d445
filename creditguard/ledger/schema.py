"""The ledger's schema, the same on SQLite and PostgreSQL, and its migrations.

``creditguard_schema`` holds the version the database is at. Version 1:

* ``entries``: one row per ended spend or hold (``Entry``'s fields), its ``id`` the key;
* ``refusals``: refused and busy calls counted per hour, account, subject, action, outcome
  and reason (a missing subject, action or reason is ``''``, so that the key is unique);
* ``balances``: balance reads sampled (at most one a minute per account by default).

Indexes: ``entries`` on ``(at)``, ``(subject, at)`` and ``(account, at)``; ``balances`` on
``(account, at)``. Timestamps are UTC: ``TIMESTAMPTZ`` on PostgreSQL, ISO 8601 text of one
width on SQLite (``2026-01-31T12:00:00.000000+00:00``, ordered as text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

__all__ = ["LATEST", "MIGRATIONS", "POSTGRES", "SQLITE", "Dialect", "LedgerError", "migrate"]


class LedgerError(Exception):
    """The ledger cannot be used: a URL it does not know, a database whose schema is newer
    than this version of creditguard, a ledger file that does not exist."""


def _text_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _text_back(value: object) -> datetime:
    return datetime.fromisoformat(str(value))


def _pg_time(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


def _pg_back(value: object) -> datetime:
    assert isinstance(value, datetime)
    return value.astimezone(timezone.utc)


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What differs between the two databases: the placeholder, the timestamp type, how a
    timestamp is sent and read back, and the day of a timestamp (``YYYY-MM-DD``, UTC)."""

    name: str
    mark: str
    timestamp: str
    day: str  # a format with {column}
    to_db: Callable[[datetime], object]
    from_db: Callable[[object], datetime]
    lock: str | None = None  # taken before a migration, when the transaction does not

    def sql(self, text: str) -> str:
        """``text`` with its ``?`` placeholders in this dialect."""
        return text if self.mark == "?" else text.replace("?", self.mark)

    def day_of(self, column: str) -> str:
        return self.day.format(column=column)


SQLITE = Dialect("sqlite", "?", "TEXT", "substr({column}, 1, 10)", _text_time, _text_back)
POSTGRES = Dialect(
    "postgresql",
    "%s",
    "TIMESTAMPTZ",
    "to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    _pg_time,
    _pg_back,
    "SELECT pg_advisory_xact_lock(7355608003)",
)

# Each version's statements; ``{ts}`` is the dialect's timestamp type.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE entries (
            id TEXT PRIMARY KEY,
            at {ts} NOT NULL,
            account TEXT NOT NULL,
            subject TEXT,
            action TEXT,
            cost BIGINT NOT NULL,
            charged BIGINT,
            balance_before BIGINT,
            balance_after BIGINT,
            outcome TEXT NOT NULL,
            trace_id TEXT,
            duration DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX entries_at ON entries (at)",
        "CREATE INDEX entries_subject_at ON entries (subject, at)",
        "CREATE INDEX entries_account_at ON entries (account, at)",
        """CREATE TABLE refusals (
            hour {ts} NOT NULL,
            account TEXT NOT NULL,
            subject TEXT NOT NULL,
            action TEXT NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT NOT NULL,
            count BIGINT NOT NULL,
            PRIMARY KEY (hour, account, subject, action, outcome, reason)
        )""",
        """CREATE TABLE balances (
            at {ts} NOT NULL,
            account TEXT NOT NULL,
            total BIGINT NOT NULL
        )""",
        "CREATE INDEX balances_account_at ON balances (account, at)",
    ),
}
LATEST = max(MIGRATIONS)

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS creditguard_schema (version INTEGER NOT NULL)"

INSERT_ENTRY = (
    "INSERT INTO entries (id, at, account, subject, action, cost, charged, balance_before,"
    " balance_after, outcome, trace_id, duration) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)
UPSERT_REFUSALS = (
    "INSERT INTO refusals (hour, account, subject, action, outcome, reason, count)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (hour, account, subject, action, outcome, reason)"
    " DO UPDATE SET count = refusals.count + excluded.count"
)
INSERT_BALANCE = "INSERT INTO balances (at, account, total) VALUES (?, ?, ?)"


def migrate(cursor: Any, dialect: Dialect) -> None:
    """Bring the schema to :data:`LATEST`, inside the caller's transaction (which holds
    the database's write lock, so that two processes never migrate at once)."""
    execute = cursor.execute
    if dialect.lock is not None:
        execute(dialect.lock)
    execute(VERSION_TABLE)
    execute("SELECT MAX(version) FROM creditguard_schema")
    row = cursor.fetchone()
    version = 0 if row is None or row[0] is None else int(row[0])
    if version > LATEST:
        raise LedgerError(
            f"the ledger's schema is at version {version}, newer than this creditguard"
            f" knows ({LATEST}): upgrade creditguard"
        )
    for step in range(version + 1, LATEST + 1):
        for statement in MIGRATIONS[step]:
            execute(statement.format(ts=dialect.timestamp))
        execute(dialect.sql("INSERT INTO creditguard_schema (version) VALUES (?)"), (step,))
