"""The spend ledger: a row per paid call the guard let through, refusals counted, balance
reads sampled, in SQLite (one machine) or PostgreSQL (many), written off the paid call's
path. Pass one to the guard: ``CreditGuard(..., ledger=SQLiteLedger("spend.db"))``."""

from __future__ import annotations

import os
from typing import Any

from creditguard.ledger.base import Ledger
from creditguard.ledger.postgres import PostgresLedger
from creditguard.ledger.queries import LedgerTotal
from creditguard.ledger.schema import LATEST as SCHEMA_VERSION
from creditguard.ledger.schema import LedgerError
from creditguard.ledger.sqlite import SQLiteLedger

__all__ = [
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerError",
    "LedgerTotal",
    "PostgresLedger",
    "SQLiteLedger",
    "open_ledger",
]


def open_ledger(url: str, *, must_exist: bool = False, **options: Any) -> Ledger:
    """The ledger at ``url``: ``sqlite:///spend.db`` (a relative path),
    ``sqlite:////var/lib/app/spend.db`` (an absolute one), or a ``postgresql://`` (or
    ``postgres://``) URL. ``must_exist``: a SQLite file that is not there is an error
    (for reading a ledger, not starting one). ``options`` go to the ledger."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if must_exist and not os.path.exists(path):
            raise LedgerError(f"no ledger at {url}: {path} does not exist")
        return SQLiteLedger(path, **options)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(url, **options)
    raise LedgerError(
        "a ledger URL is sqlite:///PATH (sqlite:////ABSOLUTE/PATH) or postgresql://...,"
        f" not {url.partition('://')[0] or url!r}"
    )
