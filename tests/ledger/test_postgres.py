"""The PostgreSQL ledger against the real server the ``postgres`` fixture starts (a
database of its own per test): the rows, refusals, samples, totals and entries (tests/
ledger/scenarios.py) on threads, asyncio and trio and both state backends; the server
going away mid-run and coming back, with no row lost within the buffer's bound and the
rows beyond it counted as dropped."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from creditguard import CreditGuard
from creditguard.ledger import SCHEMA_VERSION, Ledger, PostgresLedger, open_ledger
from creditguard.ledger.postgres import shown_dsn
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend
from tests.ledger import scenarios

if TYPE_CHECKING:
    from creditguard.testing._postgres_server import PostgresServer


@pytest.fixture
def dsn(postgres: PostgresServer) -> str:
    """A new database on the session's server."""
    name = f"cg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def make(dsn: str) -> scenarios.MakeLedger:
    def new(**options: Any) -> Ledger:
        return PostgresLedger(dsn, **options)

    return new


def _count(dsn: str, sql: str = "SELECT COUNT(*) FROM entries") -> Any:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def test_outcomes_and_charges(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.outcomes_and_charges(make, new_backend)


def test_refusals_are_counted_per_hour(
    make: scenarios.MakeLedger, new_backend: NewBackend, dsn: str
) -> None:
    scenarios.refusals_counted(make, new_backend)
    rows = _count(dsn, "SELECT subject, action, outcome, reason, count FROM refusals")
    assert sorted(rows) == [
        ("eve", "big", "busy", "", 2),
        ("eve", "big", "refused", "balance", 3),
        ("eve", "other", "refused", "balance", 1),
    ]
    assert _count(dsn, "SELECT COUNT(DISTINCT hour) FROM refusals") == [(1,)]


def test_sampled_reads_and_outside(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.sampled_reads_and_outside(make, new_backend)


def test_totals_and_entries(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.totals_and_entries(make, new_backend)


def test_threads(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.on_threads(make, new_backend)


@pytest.mark.anyio
async def test_tasks(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    await scenarios.on_tasks(make, new_backend)


def test_the_schema_is_the_same(dsn: str) -> None:
    with PostgresLedger(dsn) as ledger:
        assert ledger.entries() == []
    assert _count(dsn, "SELECT version FROM creditguard_schema") == [(SCHEMA_VERSION,)]
    indexes = {r[0] for r in _count(dsn, "SELECT indexname FROM pg_indexes")}
    assert {"entries_at", "entries_subject_at", "entries_account_at"} <= indexes
    types = dict(
        _count(
            dsn,
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 'entries'",
        )
    )
    assert types["at"] == "timestamp with time zone"
    assert types["charged"] == "bigint"


def test_the_database_goes_away_and_comes_back(
    postgres: PostgresServer, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeLensmor()
    ledger = PostgresLedger(
        dsn, buffer=40, interval=0.02, max_backoff=0.2, connect_timeout=1, sample_every=3600
    )
    with ledger, CreditGuard(fake.api_key, transport=fake.transport, ledger=ledger) as guard:
        for _ in range(10):
            with guard.spend(1, subject="before"):
                fake.charge(1)
        assert ledger.flush(10)
        postgres.stop()
        try:
            slowest = 0.0
            with caplog.at_level(logging.WARNING, "creditguard.ledger"):
                for _ in range(55):
                    start = time.monotonic()
                    with guard.spend(1, subject="during"):
                        fake.charge(1)
                    slowest = max(slowest, time.monotonic() - start)
                assert not ledger.flush(0.3)
            assert slowest < 0.05  # the paid call never waits for the database
            assert ledger.pending == 40  # the buffer's bound
            assert ledger.dropped == 15  # the rows beyond it
            assert "cannot write" in caplog.text
            assert "password" not in caplog.text
        finally:
            postgres.start()
        assert ledger.flush(30)
        with guard.spend(1, subject="after"):
            fake.charge(1)
    totals = {t.key: t.calls for t in ledger.totals()}
    assert totals == {"before": 10, "during": 40, "after": 1}
    assert ledger.dropped == 15


def test_open_ledger_and_the_dsn_shown(dsn: str) -> None:
    ledger = open_ledger(dsn)
    assert isinstance(ledger, PostgresLedger)
    ledger.close()
    assert shown_dsn("postgresql://u:hunter2@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert "hunter2" not in shown_dsn("host=db password=hunter2 dbname=x")
    assert "hunter2" not in shown_dsn("postgresql://db/x?password=hunter2")
    assert "hunter2" not in repr(PostgresLedger("postgresql://u:hunter2@db/x"))
