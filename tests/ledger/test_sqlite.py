"""The SQLite ledger: the rows, refusals, samples, totals and entries (tests/ledger/
scenarios.py) on threads, asyncio and trio and both state backends; two processes writing
one file; a locked database never holds up a paid call; close() flushes."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from creditguard import CreditGuard
from creditguard.ledger import SCHEMA_VERSION, Ledger, LedgerError, SQLiteLedger, open_ledger
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend
from tests.ledger import scenarios
from tests.ledger.workers import spend_into


@pytest.fixture
def make(tmp_path: Path) -> scenarios.MakeLedger:
    def new(**options: Any) -> Ledger:
        return SQLiteLedger(tmp_path / "spend.db", **options)

    return new


def _rows(path: Path, sql: str = "SELECT COUNT(*) FROM entries") -> Any:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def test_outcomes_and_charges(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.outcomes_and_charges(make, new_backend)


def test_refusals_are_counted_per_hour(
    make: scenarios.MakeLedger, new_backend: NewBackend, tmp_path: Path
) -> None:
    scenarios.refusals_counted(make, new_backend)
    rows = _rows(
        tmp_path / "spend.db",
        "SELECT hour, subject, action, outcome, reason, count FROM refusals ORDER BY count",
    )
    hour = time.strftime("%Y-%m-%dT%H:00:00.000000+00:00", time.gmtime())
    assert sorted(r[1:] for r in rows) == [
        ("eve", "big", "busy", "", 2),
        ("eve", "big", "refused", "balance", 3),
        ("eve", "other", "refused", "balance", 1),
    ]
    assert {r[0] for r in rows} == {hour}  # one row an hour, not a row each


def test_sampled_reads_and_outside(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.sampled_reads_and_outside(make, new_backend)


def test_totals_and_entries(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.totals_and_entries(make, new_backend)


def test_threads(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    scenarios.on_threads(make, new_backend)


@pytest.mark.anyio
async def test_tasks(make: scenarios.MakeLedger, new_backend: NewBackend) -> None:
    await scenarios.on_tasks(make, new_backend)


def test_two_processes_write_one_file_and_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "spend.db")
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=spend_into, args=(path, f"p{n}", 300)) for n in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    with SQLiteLedger(path) as ledger:
        totals = {t.key: (t.charged, t.calls) for t in ledger.totals()}
    assert totals == {"p0": (300, 300), "p1": (300, 300)}
    assert _rows(Path(path), "SELECT COUNT(DISTINCT id) FROM entries") == [(600,)]
    assert _rows(Path(path), "PRAGMA journal_mode") == [("wal",)]


def test_a_locked_database_never_holds_up_a_paid_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spend.db"
    fake = FakeLensmor()
    ledger = SQLiteLedger(path, interval=0.02, busy_timeout=0.05, max_backoff=0.1)
    with ledger, CreditGuard(fake.api_key, transport=fake.transport, ledger=ledger) as guard:
        with guard.spend(1):
            pass
        assert ledger.flush(10)  # the file exists, in WAL mode
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            slowest = 0.0
            with caplog.at_level(logging.WARNING, "creditguard.ledger"):
                for _ in range(50):
                    start = time.monotonic()
                    with guard.spend(1, subject="locked"):
                        pass
                    slowest = max(slowest, time.monotonic() - start)
                assert not ledger.flush(0.5)  # nothing can be written while it is locked
            assert slowest < 0.05
            assert "cannot write" in caplog.text
            assert ledger.pending == 50
        finally:
            locker.execute("COMMIT")
            locker.close()
        assert ledger.flush(10)
        assert ledger.pending == 0
    assert _rows(path) == [(51,)]
    assert ledger.dropped == 0


def test_close_flushes_and_later_rows_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    fake = FakeLensmor()
    ledger = SQLiteLedger(path, interval=3600)  # only flush() and close() write
    with CreditGuard(fake.api_key, transport=fake.transport, ledger=ledger) as guard:
        guard.balance()  # its sample written: then only the entries are left
        assert ledger.flush(10)
        for _ in range(20):
            with guard.spend(1):
                pass
        assert ledger.pending == 20
        ledger.close()
        assert _rows(path) == [(20,)]
        with guard.spend(1):
            pass
    assert ledger.dropped == 1
    assert _rows(path) == [(20,)]


def test_a_full_buffer_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    fake = FakeLensmor()
    ledger = SQLiteLedger(path, buffer=10, interval=3600, batch=1000)
    with ledger, CreditGuard(fake.api_key, transport=fake.transport, ledger=ledger) as guard:
        guard.balance()
        assert ledger.flush(10)
        for _ in range(15):
            with guard.spend(1):
                pass
        assert ledger.dropped == 5
    assert _rows(path) == [(10,)]


def test_the_schema_is_versioned_and_indexed(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    with SQLiteLedger(path) as ledger:
        assert ledger.entries() == []
    assert _rows(path, "SELECT version FROM creditguard_schema") == [(SCHEMA_VERSION,)]
    indexes = {r[0] for r in _rows(path, "SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"entries_at", "entries_subject_at", "entries_account_at"} <= indexes
    with SQLiteLedger(path) as again:  # migrating twice changes nothing
        assert again.totals() == []
    assert _rows(path, "SELECT COUNT(*) FROM creditguard_schema") == [(1,)]
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO creditguard_schema (version) VALUES (99)")
    with SQLiteLedger(path) as newer, pytest.raises(LedgerError, match="newer"):
        newer.totals()


def test_open_ledger_by_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_ledger("sqlite:///spend.db")
    assert isinstance(relative, SQLiteLedger)
    assert relative.path == "spend.db"
    absolute = open_ledger(f"sqlite:///{tmp_path}/abs.db")
    assert isinstance(absolute, SQLiteLedger)
    assert absolute.path == f"{tmp_path}/abs.db"
    with pytest.raises(LedgerError, match="does not exist"):
        open_ledger("sqlite:///missing.db", must_exist=True)
    with pytest.raises(LedgerError, match="sqlite:///PATH"):
        open_ledger("mysql://localhost/db")
    for ledger in (relative, absolute):
        ledger.close()
    with pytest.raises(ValueError, match="path"):
        SQLiteLedger(":memory:")
    with pytest.raises(ValueError, match="buffer"):
        SQLiteLedger(tmp_path / "x.db", buffer=0)
    with pytest.raises(TypeError, match="ledger"):
        CreditGuard("k", ledger=object())  # type: ignore[arg-type]


def test_no_key_reaches_the_file(tmp_path: Path) -> None:
    key = "sk-live-0123456789abcdef-secret"
    fake = FakeLensmor(api_key=key)
    path = tmp_path / "spend.db"
    ledger = SQLiteLedger(path, sample_every=0)
    with ledger, CreditGuard(key, transport=fake.transport, ledger=ledger) as guard:
        with guard.spend(3, subject="alice"):
            fake.charge(3)
        guard.balance(refresh=True)
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert key.encode() not in data
    assert guard.account.encode() in data
