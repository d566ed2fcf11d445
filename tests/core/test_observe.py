"""What observers (the telemetry, the ledger) are told: each guarded call's start, its
admission (with the refusal's reason), its end (an ``Entry``), each upstream read; on
both backends, from threads, asyncio and trio. An observer that raises breaks nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from creditguard import (
    Allowance,
    CreditGuard,
    InsufficientCredits,
)
from creditguard.core.observe import Entry
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.entries: list[Entry] = []

    def begin(self, engine: Any, call: Any) -> object:
        self.log.append(("begin", call.cost))
        return f"token-{len(self.log)}"

    def decided(
        self, engine: Any, call: Any, token: object, outcome: str, reason: str | None, s: float
    ) -> None:
        assert s >= 0
        self.log.append(("decided", outcome, reason))

    def ended(self, engine: Any, call: Any, token: object, entry: Entry) -> None:
        self.entries.append(entry)
        self.log.append(("ended", entry.outcome))

    def read(
        self, engine: Any, balance: Any, error: BaseException | None, started: float, s: float
    ) -> None:
        self.log.append(("read", None if balance is None else balance.total_balance, error))

    def outcomes(self) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[0] != "read"]


def make(new_backend: NewBackend, **kwargs: Any) -> tuple[FakeLensmor, CreditGuard, Recorder]:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    seen = Recorder()
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=new_backend(),
        ledger=seen,
        telemetry=False,
        **kwargs,
    )
    return fake, guard, seen


class Boom(Exception):
    pass


def test_a_spend_a_failure_and_the_refusals_with_their_reasons(new_backend: NewBackend) -> None:
    fake, guard, seen = make(new_backend, keep=100, allowance=Allowance(300))
    with guard.spend(200, subject="alice", action="unlock") as spend:
        fake.charge(200)
    with pytest.raises(Boom), guard.spend(50):
        raise Boom
    with pytest.raises(InsufficientCredits), guard.spend(200, subject="alice"):
        pass  # the allowance
    with pytest.raises(InsufficientCredits), guard.spend(750):
        pass  # the floor: 800 left, 100 kept
    with pytest.raises(InsufficientCredits), guard.spend(5000):
        pass  # the balance
    with guard.budget(10), pytest.raises(InsufficientCredits), guard.spend(20):
        pass  # the budget
    assert seen.outcomes() == [
        ("begin", 200),
        ("decided", "admitted", None),
        ("ended", "spent"),
        ("begin", 50),
        ("decided", "admitted", None),
        ("ended", "failed"),
        ("begin", 200),
        ("decided", "refused", "allowance"),
        ("begin", 750),
        ("decided", "refused", "keep"),
        ("begin", 5000),
        ("decided", "refused", "balance"),
        ("begin", 20),
        ("decided", "refused", "budget"),
    ]
    spent = seen.entries[0]
    assert (spent.subject, spent.action, spent.cost, spent.outcome) == (
        "alice",
        "unlock",
        200,
        "spent",
    )
    assert spent.balance_before == 1000
    assert spent.balance_after is None  # a block settles later: nothing was read
    assert spent.account == guard.account
    assert spent.duration >= 0
    assert spend.balance_after is not None  # asked for: read now
    assert next(e for e in seen.log if e[0] == "read")[1] == 1000


def test_decorated_calls_are_named_by_their_function_and_report_their_charge(
    new_backend: NewBackend,
) -> None:
    fake, guard, seen = make(new_backend)
    fake.add_event("e1")
    http = httpx.Client(
        transport=fake.transport,
        base_url="https://x.invalid",
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )

    @guard.requires_credits(2000)
    def unlock_event(event_id: str) -> httpx.Response:
        return http.post(f"/external/events/{event_id}/unlock")

    fake.top_up(2000)
    unlock_event("e1")
    (entry,) = seen.entries
    assert entry.action is not None
    assert entry.action.endswith("unlock_event")
    assert entry.outcome == "spent"


def test_holds_released_settled_and_failed(new_backend: NewBackend) -> None:
    fake, guard, seen = make(new_backend)
    guard.hold(20, subject="bob").release()
    hold = guard.hold(30)
    fake.charge(30)
    hold.settle()
    with pytest.raises(Boom), guard.hold(40):
        raise Boom
    assert [(e.outcome, e.cost, e.subject) for e in seen.entries] == [
        ("released", 20, "bob"),
        ("spent", 30, None),
        ("failed", 40, None),
    ]
    assert seen.entries[0].charged == 0
    assert seen.entries[1].balance_after == 1000 - 30


def test_a_hold_taken_elsewhere_is_told_where_it_ends(new_backend: NewBackend) -> None:
    _, guard, seen = make(new_backend)
    hold = guard.hold(25)
    again = guard.hold_by_id(hold.id)
    again.release()
    assert [(e.outcome, e.cost) for e in seen.entries] == [("released", 25)]


@pytest.mark.anyio
async def test_async_calls_are_told_alike(new_backend: NewBackend) -> None:
    fake, guard, seen = make(new_backend, allowance=Allowance(100))

    @guard.requires_credits(60, subject=lambda user: user)
    async def call(user: str) -> None:
        fake.charge(60)

    await call("carol")
    with pytest.raises(InsufficientCredits):
        await call("carol")
    assert seen.outcomes() == [
        ("begin", 60),
        ("decided", "admitted", None),
        ("ended", "spent"),
        ("begin", 60),
        ("decided", "refused", "allowance"),
    ]


def test_an_observer_that_raises_breaks_nothing(
    new_backend: NewBackend, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Recorder):
        def ended(self, engine: Any, call: Any, token: object, entry: Entry) -> None:
            raise RuntimeError("the database is on fire")

    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, backend=new_backend(), ledger=Broken()
    )
    with guard.spend(10):
        fake.charge(10)
    assert "an observer failed" in caplog.text


def test_a_ledger_must_be_an_observer() -> None:
    fake = FakeLensmor()
    with pytest.raises(TypeError, match="ledger"):
        CreditGuard(fake.api_key, transport=fake.transport, ledger=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="telemetry"):
        CreditGuard(fake.api_key, transport=fake.transport, telemetry="yes")  # type: ignore[arg-type]


def test_no_observer_no_cost(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, backend=new_backend(), telemetry=False
    )
    with guard.spend(10) as spend:
        fake.charge(10)
    assert spend._observed is None
