"""What every ledger must do, written once and run on SQLite (test_sqlite.py) and on a
real PostgreSQL server (test_postgres.py). Each takes a factory of ledgers (one database
per test) and, where the state backend matters, the ``new_backend`` fixture's factory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from creditguard import CreditGuard, GateTimeout, InsufficientCredits, UnknownHold
from creditguard.ledger import Ledger
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend

MakeLedger = Callable[..., Ledger]
FAST = {"interval": 0.05, "sample_every": 0}


def guard_of(fake: FakeLensmor, ledger: Ledger, new_backend: NewBackend, **kw: Any) -> CreditGuard:
    return CreditGuard(
        fake.api_key, transport=fake.transport, ledger=ledger, backend=new_backend(), **kw
    )


def lensmor(fake: FakeLensmor) -> httpx.Client:
    return httpx.Client(
        transport=fake.transport,
        base_url="https://sandbox.invalid",
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )


def outcomes_and_charges(make: MakeLedger, new_backend: NewBackend) -> None:
    """A row per ended spend or hold: spent (charged from the report, or unknown), failed,
    released, expired; the fields as the guard knew them; no key anywhere."""
    fake = FakeLensmor(api_key="sk-live-very-secret-key")
    ledger = make(**FAST)
    with ledger, guard_of(fake, ledger, new_backend) as guard, lensmor(fake) as client:
        with guard.spend(2000, subject="alice", action="unlock") as s:
            s.report(client.post("/external/events/26855/unlock").raise_for_status())
        with guard.spend(5, subject="alice", action="search"):
            fake.charge(5)
        with pytest.raises(RuntimeError), guard.spend(7, subject="bob", action="search"):
            raise RuntimeError("the paid call failed")
        guard.hold(30, subject="carol", action="task").release()
        held = guard.hold(40, subject="carol", action="task")
        held.settle({"creditsUsed": 40})
        late = guard.hold(50, expires_in=0.05, subject="dave", action="task")
        time.sleep(0.2)
        with pytest.raises(UnknownHold):
            late.settle()
        assert ledger.flush(10)
        rows = {(e.subject, e.action, e.outcome): e for e in ledger.entries()}
        assert ledger.dropped == 0
    assert set(rows) == {
        ("alice", "unlock", "spent"),
        ("alice", "search", "spent"),
        ("bob", "search", "failed"),
        ("carol", "task", "released"),
        ("carol", "task", "spent"),
        ("dave", "task", "expired"),
    }
    unlock = rows["alice", "unlock", "spent"]
    assert (unlock.cost, unlock.charged) == (2000, 2000)
    assert unlock.balance_before == 30050
    assert unlock.balance_after == 28050
    assert unlock.trace_id  # Lensmor's trace id of the paid call
    search = rows["alice", "search", "spent"]
    assert (search.cost, search.charged) == (5, None)
    assert rows["bob", "search", "failed"].charged is None
    assert rows["carol", "task", "released"].charged == 0
    assert rows["carol", "task", "spent"].charged == 40
    assert rows["dave", "task", "expired"].cost == 50
    for entry in rows.values():
        assert entry.account == guard.account
        assert entry.at.tzinfo is not None
        assert abs((datetime.now(timezone.utc) - entry.at).total_seconds()) < 60
        assert entry.duration >= 0
        assert fake.api_key not in repr(entry)
    charged = {t.key: t.charged for t in ledger.totals(by="subject")}
    # charged, else the cost of a spent row: 2000 + 5; bob's failure 0; carol 0 + 40
    assert charged == {"alice": 2005, "bob": 0, "carol": 40, "dave": 0}


def refusals_counted(make: MakeLedger, new_backend: NewBackend) -> Ledger:
    """Refused and busy calls are counted per subject, action, outcome/reason and hour."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    ledger = make(**FAST)
    with ledger, guard_of(fake, ledger, new_backend, max_concurrent=1, gate_timeout=0.1) as g:
        for _ in range(3):
            with pytest.raises(InsufficientCredits), g.spend(500, subject="eve", action="big"):
                pass
        with pytest.raises(InsufficientCredits), g.spend(500, subject="eve", action="other"):
            pass
        inside, leave = threading.Event(), threading.Event()

        def occupy() -> None:
            with g.spend(1, subject="frank"):
                inside.set()
                leave.wait(10)

        worker = threading.Thread(target=occupy)
        worker.start()
        try:
            assert inside.wait(10)
            for _ in range(2):
                with pytest.raises(GateTimeout), g.spend(1, subject="eve", action="big"):
                    pass
        finally:
            leave.set()
            worker.join(10)
        totals = {t.key: t for t in ledger.totals(by="action")}
        assert totals["big"].refusals == 5
        assert totals["other"].refusals == 1
        assert {t.key: t.refusals for t in ledger.totals(by="subject")}["eve"] == 6
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        assert {t.key: t.refusals for t in ledger.totals(by="day")}[day] == 6
    return ledger


def sampled_reads_and_outside(make: MakeLedger, new_backend: NewBackend) -> None:
    """Balance reads are sampled; ``outside()`` counts what left the pool otherwise."""
    fake = FakeLensmor()
    ledger = make(**FAST)
    with ledger, guard_of(fake, ledger, new_backend) as guard:
        guard.balance(refresh=True)
        for _ in range(3):
            with guard.spend(10, subject="alice"):
                fake.charge(10)
            guard.balance(refresh=True)
        assert ledger.outside() == 0
        fake.spend_outside(120)  # Lensmor's web app, from the same pool
        with guard.spend(10, subject="alice"):
            fake.charge(10)
        guard.balance(refresh=True)
        assert ledger.outside() == 120
        fake.top_up(1000)  # a rise: not a spend, and not a negative one
        guard.balance(refresh=True)
        fake.spend_outside(30)
        guard.balance(refresh=True)
        assert ledger.outside() == 150
        assert ledger.outside(account=guard.account) == 150
        assert ledger.outside(account="acct_nobody") == 0
        assert ledger.outside(since=timedelta(seconds=0)) == 0
    # the sampling limit: one sample a minute by default
    fake = FakeLensmor(api_key="another-key")  # another account, in the same database
    ledger = make(interval=0.05)
    with ledger, guard_of(fake, ledger, new_backend) as guard:
        for _ in range(5):
            guard.balance(refresh=True)
        fake.spend_outside(50)
        guard.balance(refresh=True)
        assert ledger.outside(account=guard.account) == 0  # one sample: no interval yet
        assert ledger.outside() == 150


def totals_and_entries(make: MakeLedger, new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    ledger = make(**FAST)
    with ledger, guard_of(fake, ledger, new_backend) as guard:
        for subject, action, cost in [
            ("alice", "search", 3),
            ("alice", "unlock", 20),
            ("bob", "search", 4),
            (None, "search", 1),
        ]:
            with guard.spend(cost, subject=subject, action=action):
                fake.charge(cost)
        by_subject = ledger.totals(by="subject")
        assert [(t.key, t.charged, t.calls) for t in by_subject] == [
            ("alice", 23, 2),
            ("bob", 4, 1),
            (None, 1, 1),
        ]
        by_action = {t.key: (t.charged, t.calls) for t in ledger.totals(by="action")}
        assert by_action == {"search": (8, 3), "unlock": (20, 1)}
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        assert [(t.key, t.charged) for t in ledger.totals(by="day")] == [(day, 28)]
        assert ledger.totals(since=datetime.now(timezone.utc) + timedelta(minutes=1)) == []
        assert len(ledger.totals(since=timedelta(days=30))) == 3
        assert [e.cost for e in ledger.entries(subject="alice")] == [3, 20]
        assert len(ledger.entries(since=timedelta(days=1))) == 4
        assert ledger.entries(since=timedelta(seconds=0)) == []
        assert len(ledger.entries(limit=2)) == 2
        assert ledger.entries(account="acct_other") == []
        with pytest.raises(ValueError, match="aware"):
            ledger.entries(since=datetime(2026, 1, 1))  # naive: refused
        with pytest.raises(ValueError, match="by must be"):
            ledger.totals(by="month")  # type: ignore[arg-type]


def on_threads(make: MakeLedger, new_backend: NewBackend, threads: int = 8, each: int = 25) -> None:
    fake = FakeLensmor()
    ledger = make(**FAST)
    with ledger, guard_of(fake, ledger, new_backend) as guard:

        def work(n: int) -> None:
            for _ in range(each):
                with guard.spend(1, subject=f"t{n}"):
                    fake.charge(1)

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        totals = {t.key: (t.charged, t.calls) for t in ledger.totals()}
    assert totals == {f"t{n}": (each, each) for n in range(threads)}
    assert ledger.dropped == 0


async def on_tasks(
    make: MakeLedger, new_backend: NewBackend, tasks: int = 10, each: int = 10
) -> None:
    fake = FakeLensmor()
    ledger = make(**FAST)
    async with CreditGuard(
        fake.api_key, transport=fake.transport, ledger=ledger, backend=new_backend()
    ) as guard:

        async def work(n: int) -> None:
            for _ in range(each):
                async with guard.spend(1, subject=f"task{n}"):
                    fake.charge(1)
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for n in range(tasks):
                tg.start_soon(work, n)
        with pytest.raises(InsufficientCredits):
            async with guard.spend(10**9, subject="greedy"):
                pass
    ledger.close()  # flushes
    totals = {t.key: (t.charged, t.calls, t.refusals) for t in ledger.totals()}
    assert totals == {
        **{f"task{n}": (each, each, 0) for n in range(tasks)},
        "greedy": (0, 0, 1),
    }
