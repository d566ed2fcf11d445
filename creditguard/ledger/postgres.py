"""``PostgresLedger``: the ledger in PostgreSQL, for processes on many machines
(``pip install 'creditguard[postgres]'``: psycopg 3, imported only by this ledger)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from creditguard.ledger.base import Ledger
from creditguard.ledger.schema import POSTGRES, LedgerError

__all__ = ["PostgresLedger", "shown_dsn"]


def shown_dsn(dsn: str) -> str:
    """``dsn`` without its password (a URL's ``user:password@``, a ``password=`` pair)."""
    shown = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1:***@", dsn)
    shown = re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", shown)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", shown)


class PostgresLedger(Ledger):
    """The spend ledger in the PostgreSQL database ``dsn`` (a ``postgresql://`` URL or
    a ``key=value`` string; the schema is made at the first write). ``connect_timeout``:
    seconds to wait for a connection. The other options are :class:`Ledger`'s."""

    dialect = POSTGRES

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, **options: Any) -> None:
        try:
            import psycopg  # noqa: F401 - checked here, used by the writer
        except ImportError:
            raise LedgerError(
                "PostgresLedger needs psycopg 3: pip install 'creditguard[postgres]'"
            ) from None
        if not isinstance(dsn, str) or not dsn:
            raise ValueError("dsn must be a PostgreSQL connection string")
        self.dsn = dsn
        self._connect_timeout = max(1, round(connect_timeout))
        super().__init__(**options)

    @property
    def where(self) -> str:
        return shown_dsn(self.dsn)

    def __repr__(self) -> str:
        return f"PostgresLedger({self.where!r})"

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, connect_timeout=self._connect_timeout, autocommit=True)

    @contextlib.contextmanager
    def _transaction(self, conn: Any, write: bool = True) -> Iterator[Any]:
        with conn.transaction(), conn.cursor() as cursor:
            yield cursor
