"""The spending policy's rules (docs/policy.md), one at a time, on both backends, from
threads, asyncio and trio: the floor (``keep``), allowances per subject per window,
``budget()`` blocks, ``usage()``, low-balance alerts and allowance warnings."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

import creditguard.core.spending as spending
from creditguard import (
    AdmissionTimeout,
    Allowance,
    AllowanceExceeded,
    BudgetExceeded,
    CreditGuard,
    GuardEvent,
    InsufficientCredits,
    LowBalance,
    Usage,
)
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend, waiting_for_release

AUTH = {"Authorization": "Bearer test-key"}


class Boom(Exception):
    pass


def make(
    new_backend: NewBackend,
    balance: int = 1000,
    **kwargs: Any,
) -> tuple[FakeLensmor, CreditGuard]:
    fake = FakeLensmor(subscription_balance=balance, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=60, backend=new_backend(), **kwargs
    )
    return fake, guard


def release_when_waiting(guard: CreditGuard, release: threading.Event) -> threading.Event:
    """Set ``release`` once a call waits at admission (or after 10 s); the event returned
    says whether one did."""
    saw = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if waiting_for_release(guard):
                saw.set()
                break
            threading.Event().wait(0.001)
        release.set()

    threading.Thread(target=watch, daemon=True).start()
    return saw


def spend(guard: CreditGuard, fake: FakeLensmor, cost: int, subject: str | None = None) -> None:
    with guard.spend(cost, subject=subject):
        fake.charge(cost)


# -- the floor ---------------------------------------------------------------------


def test_keep_is_never_spent(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 1000, keep=300)
    spend(guard, fake, 700)  # exactly down to the floor
    with pytest.raises(InsufficientCredits) as info, guard.spend(1):
        pass
    assert type(info.value) is InsufficientCredits
    assert info.value.keep == 300
    assert info.value.available == 0
    assert "kept back" in str(info.value)
    assert fake.balance.total_balance == 300


def test_keep_refuses_only_what_the_floor_stands_in_the_way_of(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 1000, keep=300)
    with pytest.raises(InsufficientCredits) as info, guard.spend(701):
        pass
    assert (info.value.keep, info.value.available) == (300, 700)
    spend(guard, fake, 100)  # smaller calls still go
    assert guard.keep == 300


def test_keep_with_calls_in_flight_waits_for_them_instead_of_refusing(
    new_backend: NewBackend,
) -> None:
    # 600 in flight, 1000 - 300 kept: another 300 fits only if the first charges less:
    # it waits for it (the rule for calls in flight is unchanged), then is admitted.
    fake, guard = make(new_backend, 1000, keep=300, admission_timeout=5)
    inside, release = threading.Event(), threading.Event()

    def first() -> None:
        with guard.spend(600):
            inside.set()
            release.wait(5)
            fake.charge(100)  # charged less than declared

    worker = threading.Thread(target=first)
    worker.start()
    assert inside.wait(5)
    saw = release_when_waiting(guard, release)
    spend(guard, fake, 300)
    worker.join(5)
    assert saw.is_set()  # it waited for the first call, and was admitted after it
    assert fake.balance.total_balance == 600


@pytest.mark.parametrize("keep", [-1, 1.5, True, "10"])
def test_bad_keep_is_refused_before_any_request(keep: object) -> None:
    fake = FakeLensmor()
    with pytest.raises(ValueError, match="keep"):
        CreditGuard(fake.api_key, transport=fake.transport, keep=keep)  # type: ignore[arg-type]
    assert fake.balance_requests == 0


# -- allowances --------------------------------------------------------------------


def test_an_allowance_caps_each_subject(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000, allowance=Allowance(100))
    spend(guard, fake, 40, "alice")
    spend(guard, fake, 40, "alice")
    with pytest.raises(AllowanceExceeded) as info, guard.spend(40, subject="alice"):
        pass
    refusal = info.value
    assert isinstance(refusal, InsufficientCredits)
    assert (refusal.subject, refusal.limit, refusal.spent, refusal.remaining) == (
        "alice",
        100,
        80,
        20,
    )
    assert (refusal.required, refusal.available) == (40, 20)
    now = datetime.now(timezone.utc)
    assert refusal.resets_at > now
    assert refusal.resets_at.tzinfo is not None
    assert refusal.resets_at == Allowance(100).period(now)[1]
    spend(guard, fake, 20, "alice")  # what is left still fits
    spend(guard, fake, 100, "bob")  # another subject has its own
    spend(guard, fake, 500)  # no subject: only the account's rules
    assert fake.balance.total_balance == 10_000 - 700


def test_a_failed_call_spends_nothing_of_the_allowance(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000, allowance=Allowance(100))
    for _ in range(3):
        with pytest.raises(Boom), guard.spend(60, subject="alice"):
            raise Boom
    assert guard.usage("alice").spent == 0
    spend(guard, fake, 60, "alice")
    assert guard.usage("alice") == Usage("alice", 100, 60, 0, 40, guard.usage("alice").resets_at)


def test_a_subject_is_charged_what_the_paid_call_reported(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000, allowance=Allowance(5000))
    fake.add_event("free", unlocked=True)  # unlocked already: charges nothing
    fake.add_event("paid")
    http = httpx.Client(transport=fake.transport, base_url="https://x.invalid", headers=AUTH)

    @guard.requires_credits(2000, subject=lambda event_id, user: user)
    def unlock(event_id: str, user: str) -> httpx.Response:
        return http.post(f"/external/events/{event_id}/unlock").raise_for_status()

    unlock("free", "alice")
    assert guard.usage("alice").spent == 0
    unlock("paid", "alice")
    usage = guard.usage("alice")
    assert (usage.spent, usage.reserved, usage.remaining) == (2000, 0, 3000)


def test_an_allowance_per_subject_from_a_callable(new_backend: NewBackend) -> None:
    plans = {"free": Allowance(10), "pro": Allowance(1000)}
    fake, guard = make(
        new_backend, 10_000, allowance=lambda subject: plans.get(subject.split(":")[0])
    )
    with pytest.raises(AllowanceExceeded), guard.spend(11, subject="free:1"):
        pass
    spend(guard, fake, 11, "pro:1")
    spend(guard, fake, 5000, "staff:1")  # None: no cap for that subject
    assert guard.usage("staff:1") == Usage("staff:1", None, 0, 0, None, None)


def test_a_callable_allowance_must_answer_an_allowance(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, allowance=lambda subject: 100)
    with pytest.raises(TypeError, match="Allowance"), guard.spend(1, subject="alice"):
        pass
    assert fake.balance_requests == 0


@pytest.mark.parametrize("subject", ["", "a\nb", 42])
def test_a_bad_subject_is_refused_before_any_request(subject: Any) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, allowance=Allowance(10))
    with pytest.raises((ValueError, TypeError)):
        guard.spend(1, subject=subject)
    assert fake.balance_requests == 0


def test_the_window_resets_at_its_end(
    new_backend: NewBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (far ahead: Redis expires a window's books by its own clock, a day after its end)
    now = [datetime(2099, 1, 31, 23, 59, tzinfo=timezone.utc).timestamp()]
    monkeypatch.setattr(spending, "_now", lambda: now[0])
    fake, guard = make(new_backend, 10_000, allowance=Allowance(100))
    spend(guard, fake, 100, "alice")
    with pytest.raises(AllowanceExceeded) as info, guard.spend(1, subject="alice"):
        pass
    assert info.value.resets_at == datetime(2099, 2, 1, tzinfo=timezone.utc)
    now[0] = datetime(2099, 2, 1, tzinfo=timezone.utc).timestamp()  # a new month
    spend(guard, fake, 100, "alice")
    assert guard.usage("alice").spent == 100


def test_calls_in_flight_of_a_subject_make_it_wait_not_refuse(new_backend: NewBackend) -> None:
    # 60 in flight of 100: another 60 fits only if the first is charged less. It waits.
    fake, guard = make(new_backend, 10_000, allowance=Allowance(100), admission_timeout=5)
    inside, release = threading.Event(), threading.Event()

    def first() -> None:
        try:
            with guard.spend(60, subject="alice"):
                inside.set()
                release.wait(5)
                raise Boom  # failed: charged nothing
        except Boom:
            pass

    worker = threading.Thread(target=first)
    worker.start()
    assert inside.wait(5)
    saw = release_when_waiting(guard, release)
    spend(guard, fake, 60, "alice")
    worker.join(5)
    assert saw.is_set()  # it waited for alice's first call, and was admitted after it
    assert guard.usage("alice").spent == 60


def test_a_subject_held_back_by_its_calls_in_flight_is_busy_after_the_wait(
    new_backend: NewBackend,
) -> None:
    fake, guard = make(new_backend, 10_000, allowance=Allowance(100), admission_timeout=0)
    with guard.spend(60, subject="alice"):
        with pytest.raises(AdmissionTimeout), guard.spend(60, subject="alice"):
            pass
        fake.charge(60)


def test_concurrent_threads_never_pass_an_allowance(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 100_000, allowance=Allowance(10 * 7), admission_timeout=0.5)
    admitted = []

    def call() -> None:
        try:
            with guard.spend(7, subject="alice"):
                fake.charge(7)
                admitted.append(1)
        except (AllowanceExceeded, AdmissionTimeout):
            pass

    with ThreadPoolExecutor(8) as pool:
        for _ in range(40):
            pool.submit(call)
    assert len(admitted) == 10
    assert guard.usage("alice").spent == 70


def test_one_warning_per_subject_per_window(new_backend: NewBackend) -> None:
    events: list[GuardEvent] = []
    fake, guard = make(
        new_backend, 10_000, allowance=Allowance(100, warn_at=0.5), on_event=events.append
    )
    for _ in range(5):
        spend(guard, fake, 20, "alice")
    spend(guard, fake, 60, "bob")
    warnings = [e for e in events if e.kind == "allowance_warning"]
    assert [(e.subject, e.cost) for e in warnings] == [("alice", 20), ("bob", 60)]


def test_holds_count_in_the_subject_window(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=10_000, gift_balance=0)
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=new_backend(),
        allowance=Allowance(100),
        admission_timeout=0,
    )
    held = guard.hold(60, subject="alice")
    assert guard.usage("alice").reserved == 60
    spend(guard, fake, 40, "alice")
    with pytest.raises(AdmissionTimeout), guard.spend(1, subject="alice"):
        pass  # the hold may charge less: busy, not refused
    held.release()  # nothing charged: it spent nothing of the allowance
    usage = guard.usage("alice")
    assert (usage.spent, usage.reserved) == (40, 0)
    held = guard.hold(60, subject="alice")
    fake.charge(60)
    held.settle()
    assert guard.usage("alice").spent == 100


@pytest.mark.anyio
async def test_async_allowance_and_usage(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000, allowance=Allowance(100))

    @guard.requires_credits(30, subject=lambda user: user)
    async def call(user: str) -> None:
        fake.charge(30)

    for _ in range(3):
        await call("alice")
    with pytest.raises(AllowanceExceeded):
        await call("alice")
    usage = await guard.ausage("alice")
    assert (usage.spent, usage.reserved, usage.remaining) == (90, 0, 10)

    admitted = []

    async def task() -> None:
        try:
            async with guard.spend(10, subject="bob"):
                await anyio.lowlevel.checkpoint()
                fake.charge(10)
                admitted.append(1)
        except (AllowanceExceeded, AdmissionTimeout):
            pass

    async with anyio.create_task_group() as tg:
        for _ in range(15):
            tg.start_soon(task)
    assert len(admitted) == 10
    assert (await guard.ausage("bob")).spent == 100


# -- budgets -----------------------------------------------------------------------


def test_a_budget_caps_the_calls_inside(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000)
    with guard.budget(100) as budget:
        spend(guard, fake, 60)
        with pytest.raises(BudgetExceeded) as info, guard.spend(50):
            pass
        assert (info.value.remaining, info.value.limit) == (40, 100)
        assert isinstance(info.value, InsufficientCredits)
        with pytest.raises(Boom), guard.spend(40):
            raise Boom  # a failed call spends nothing of it
        spend(guard, fake, 40)
        assert (budget.spent, budget.remaining) == (100, 0)
    spend(guard, fake, 500)  # outside it: no cap


def test_nested_budgets_all_apply(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000)
    with guard.budget(100) as outer:
        with guard.budget(1000) as inner:
            spend(guard, fake, 80)
            with pytest.raises(BudgetExceeded) as info, guard.spend(30):
                pass
            assert info.value.limit == 100
        assert inner.spent == 80
        with guard.budget(10), pytest.raises(BudgetExceeded), guard.spend(11):
            pass
    assert outer.spent == 80


@pytest.mark.anyio
async def test_tasks_started_inside_a_budget_inherit_it(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000)
    refused = []

    async def task() -> None:
        try:
            async with guard.spend(30):
                fake.charge(30)
        except BudgetExceeded:
            refused.append(1)

    async with guard.budget(100) as budget, anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(task)
    assert (budget.spent, len(refused)) == (90, 2)


def test_a_budget_across_threads_through_anyio(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 10_000)

    async def main() -> None:
        with guard.budget(50) as budget:
            await anyio.to_thread.run_sync(spend, guard, fake, 30)
            with pytest.raises(BudgetExceeded):
                await anyio.to_thread.run_sync(spend, guard, fake, 30)
        assert budget.spent == 30

    anyio.run(main)


@pytest.mark.parametrize("limit", [-1, 1.0, None])
def test_a_bad_budget_is_refused(limit: Any) -> None:
    guard = CreditGuard(FakeLensmor().api_key, transport=FakeLensmor().transport)
    with pytest.raises(ValueError, match="budget"):
        guard.budget(limit)


# -- low balance -------------------------------------------------------------------


def test_low_balance_fires_once_per_crossing(new_backend: NewBackend) -> None:
    events: list[GuardEvent] = []
    fake, guard = make(new_backend, 1000, on_event=events.append)
    heard: list[LowBalance] = []
    guard.on_low_balance(500, heard.append)
    for _ in range(8):
        spend(guard, fake, 100)
        guard.balance(refresh=True)
    assert heard == [LowBalance(500, 400, "low")]
    fake.top_up(1000)
    guard.balance(refresh=True)
    guard.balance(refresh=True)
    assert heard[1:] == [LowBalance(500, 1200, "recovered")]
    assert [e.kind for e in events if e.kind in ("low_balance", "balance_recovered")] == [
        "low_balance",
        "balance_recovered",
    ]


def test_low_balance_as_a_fraction_of_the_total_amount(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 1000)
    heard: list[LowBalance] = []
    guard.on_low_balance(0.25, heard.append)
    guard.balance(refresh=True)  # 1000: above; nothing to say
    fake.spend_outside(800)
    guard.balance(refresh=True)
    assert heard == [LowBalance(250, 200, "low")]


def test_a_low_balance_at_start_is_told(new_backend: NewBackend) -> None:
    _, guard = make(new_backend, 100)
    heard: list[LowBalance] = []
    guard.on_low_balance(500, heard.append)
    guard.balance()
    assert heard == [LowBalance(500, 100, "low")]


def test_a_low_balance_callback_that_raises_breaks_nothing(
    new_backend: NewBackend, caplog: pytest.LogCaptureFixture
) -> None:
    fake, guard = make(new_backend, 100)

    def boom(alert: LowBalance) -> None:
        raise Boom

    guard.on_low_balance(500, boom)
    spend(guard, fake, 10)
    assert "on_low_balance callback raised" in caplog.text


@pytest.mark.anyio
async def test_an_async_low_balance_callback_is_awaited(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 1000)
    heard: list[LowBalance] = []

    async def callback(alert: LowBalance) -> None:
        await anyio.lowlevel.checkpoint()
        heard.append(alert)

    guard.on_low_balance(950, callback)
    async with guard.spend(100):
        fake.charge(100)
    await guard.abalance(refresh=True)
    assert heard == [LowBalance(950, 900, "low")]


def test_guards_sharing_a_backend_hear_a_crossing_once(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    backend = new_backend()
    heard: list[LowBalance] = []
    guards = [
        CreditGuard(fake.api_key, transport=fake.transport, backend=backend) for _ in range(3)
    ]
    for g in guards:
        g.on_low_balance(500, heard.append)
    for g in guards:
        g.balance(refresh=True)
    fake.spend_outside(600)
    for g in guards:
        g.balance(refresh=True)
    assert heard == [LowBalance(500, 400, "low")]


@pytest.mark.parametrize(
    ("threshold", "error"),
    [(1.5, ValueError), (0.0, ValueError), (-1, ValueError), ("1", TypeError)],
)
def test_bad_thresholds_are_refused(threshold: Any, error: type[Exception]) -> None:
    guard = CreditGuard(FakeLensmor().api_key, transport=FakeLensmor().transport)
    with pytest.raises(error):
        guard.on_low_balance(threshold, print)


def test_the_gate_keeps_the_floor_and_the_allowance(new_backend: NewBackend) -> None:
    fake, guard = make(new_backend, 1000, keep=300, allowance=Allowance(100), max_concurrent=1)

    @guard.requires_credits(60, subject=lambda user: user)
    def call(user: str) -> None:
        fake.charge(60)

    call("alice")
    with pytest.raises(AllowanceExceeded):
        call("alice")
    refusals: list[InsufficientCredits] = []
    for user in "bcdefghijklmnop":
        try:
            call(user)
        except InsufficientCredits as refused:
            refusals.append(refused)
            break
    assert [r.keep for r in refusals] == [300]
    assert fake.balance.total_balance >= 300


def test_any_redis_prefix_holds_allowance_windows(redis_url: str) -> None:
    from creditguard.redis import RedisBackend

    fake = FakeLensmor(subscription_balance=10_000, gift_balance=0)
    backend = RedisBackend(redis_url, prefix="my app | tenants, v2=1 ")
    try:
        guard = CreditGuard(
            fake.api_key, transport=fake.transport, backend=backend, allowance=Allowance(50)
        )
        spend(guard, fake, 30, "alice")
        with pytest.raises(AllowanceExceeded), guard.spend(30, subject="alice"):
            pass
        spend(guard, fake, 20, "alice")
        assert guard.usage("alice").spent == 50
    finally:
        backend.close()


def test_a_flushed_redis_forgets_the_windows_and_breaks_nothing(
    redis_url: str, redis_client: Any
) -> None:
    from creditguard.redis import RedisBackend

    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    backend = RedisBackend(redis_url, prefix="flushed:")
    try:
        guard = CreditGuard(
            fake.api_key,
            transport=fake.transport,
            backend=backend,
            allowance=Allowance(100),
            keep=100,
        )
        spend(guard, fake, 60, "alice")
        with guard.spend(30, subject="alice"):
            redis_client.flushdb()  # an operator's FLUSHDB while a call is in flight
            fake.charge(30)
        # Documented: Redis forgot the window; the guard goes on, and the account's rules
        # (the balance, the floor) still hold on a balance read anew.
        assert guard.usage("alice").spent <= 30
        spend(guard, fake, 60, "alice")
        with pytest.raises(InsufficientCredits), guard.spend(800):
            pass
        assert guard.balance(refresh=True).total_balance == 1000 - 150
    finally:
        backend.close()
