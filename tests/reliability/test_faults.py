"""Upstream faults over real loopback HTTP (the sandbox under uvicorn).

For every fault the sandbox can act out, on the sync path and the async path (asyncio and
trio): the guard raises the documented error (or, with ``on_unavailable="allow"``, runs the
action unchecked), within its configured time bound, leaves no reservation behind and
caches nothing, so the next read goes upstream and sees the true balance.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import anyio
import anyio.to_thread
import pytest

from creditguard import (
    AuthenticationError,
    BalanceUnavailable,
    CreditGuard,
    InvalidResponse,
    RateLimited,
    RetryPolicy,
    Spend,
)

from .conftest import Sandbox
from .support import assert_clean, reads_in_flight

COST = 10
# Faults answered at once: a generous deadline, so the number of attempts is exact.
QUICK = {"timeout": 2.0, "retry": RetryPolicy(attempts=3, deadline=5.0, backoff=0.02)}
# Faults that make the guard wait: a short deadline, so the bound is what is tested.
SLOW = {"timeout": 0.25, "retry": RetryPolicy(attempts=3, deadline=0.6, backoff=0.02)}


def _http_date(seconds_from_now: float) -> str:
    when = datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)
    return email.utils.format_datetime(when, usegmt=True)


@dataclass(frozen=True)
class Fault:
    """A fault scripted for every balance request, and what the guard must make of it."""

    id: str
    kind: int | str  # an HTTP status, a FakeLensmor fault, or "latency"
    error: type[Exception]
    reads: int | None  # upstream requests one failed read makes (None: bounded by time)
    status: int | None = None
    headers: Callable[[], dict[str, str]] = field(default=dict)
    retry_after: tuple[float, float] | None = None  # (low, high) of RateLimited.retry_after
    config: dict[str, object] = field(default_factory=lambda: QUICK)

    def script(self, sandbox: Sandbox) -> None:
        if self.kind == "latency":
            sandbox.fake.latency = 5.0
        else:
            sandbox.fake.fail_next(self.kind, times=1000, headers=self.headers())  # type: ignore[arg-type]

    def clear(self, sandbox: Sandbox) -> None:
        sandbox.fake.clear_faults()
        sandbox.fake.latency = 0.0

    @property
    def bound(self) -> float:
        retry = self.config["retry"]
        assert isinstance(retry, RetryPolicy)
        return retry.deadline + 1.0


FAULTS = [
    *(
        Fault(f"http-{status}", status, BalanceUnavailable, reads=3, status=status)
        for status in (500, 502, 503, 504)
    ),
    Fault(
        "429-retry-after-beyond-deadline",
        429,
        RateLimited,
        reads=1,
        headers=lambda: {"Retry-After": "30"},
        retry_after=(30, 30),
    ),
    Fault(
        "429-retry-after-http-date",
        429,
        RateLimited,
        reads=1,
        headers=lambda: {"Retry-After": _http_date(120)},
        retry_after=(100, 121),
    ),
    Fault(
        "429-retry-after-0",
        429,
        RateLimited,
        reads=3,
        headers=lambda: {"Retry-After": "0"},
        retry_after=(0, 0),
    ),
    Fault("429-no-retry-after", 429, RateLimited, reads=3),
    Fault("drop", "drop", BalanceUnavailable, reads=3),
    Fault("truncated", "truncated", BalanceUnavailable, reads=3),
    Fault("not-json", "not-json", InvalidResponse, reads=1),
    Fault("wrong-types", "wrong-types", InvalidResponse, reads=1),
    Fault("stall", "stall", BalanceUnavailable, reads=None, config=SLOW),
    Fault("latency", "latency", BalanceUnavailable, reads=None, config=SLOW),
]
FAULT_IDS = [f.id for f in FAULTS]


def check_error(fault: Fault, exc: BaseException, elapsed: float, reads: int) -> None:
    assert type(exc) is fault.error, f"{type(exc).__name__}: {exc}"
    assert elapsed < fault.bound, f"took {elapsed:.2f}s, bound {fault.bound}s"
    if fault.reads is not None:
        assert reads == fault.reads
    else:
        assert 1 <= reads <= 3
    if fault.status is not None:
        assert isinstance(exc, BalanceUnavailable)
        assert exc.status_code == fault.status
    if fault.retry_after is not None:
        assert isinstance(exc, RateLimited)
        assert exc.retry_after is not None
        low, high = fault.retry_after
        assert low <= exc.retry_after <= high


def check_recovered(sandbox: Sandbox, fault: Fault, balance_seen: object, reads: int) -> None:
    """After the fault clears, the guard read upstream (nothing was cached) and saw the truth."""
    assert sandbox.fake.balance_requests == reads + 1
    assert balance_seen == sandbox.fake.balance


# -- admission fails closed (on_unavailable="deny") -----------------------------------


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_admission_fault_sync(sandbox: Sandbox, fault: Fault) -> None:
    ran = []
    with sandbox.guard(**fault.config) as guard:  # type: ignore[arg-type]
        fault.script(sandbox)
        start = time.monotonic()
        with pytest.raises(BalanceUnavailable) as info, guard.spend(COST):
            ran.append(True)
        elapsed = time.monotonic() - start
        reads = sandbox.fake.balance_requests
        check_error(fault, info.value, elapsed, reads)
        assert not ran
        assert_clean(guard)
        fault.clear(sandbox)
        check_recovered(sandbox, fault, guard.balance(), reads)


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
async def test_admission_fault_async(sandbox: Sandbox, fault: Fault) -> None:
    ran = []
    guard = sandbox.guard(**fault.config)  # type: ignore[arg-type]
    async with guard:
        fault.script(sandbox)
        start = time.monotonic()
        with pytest.raises(BalanceUnavailable) as info:
            async with guard.spend(COST):
                ran.append(True)
        elapsed = time.monotonic() - start
        reads = sandbox.fake.balance_requests
        check_error(fault, info.value, elapsed, reads)
        assert not ran
        assert_clean(guard)
        fault.clear(sandbox)
        check_recovered(sandbox, fault, await guard.abalance(), reads)


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_balance_read_fault_sync(sandbox: Sandbox, fault: Fault) -> None:
    with sandbox.guard(**fault.config) as guard:  # type: ignore[arg-type]
        fault.script(sandbox)
        start = time.monotonic()
        with pytest.raises(BalanceUnavailable) as info:
            guard.balance()
        check_error(fault, info.value, time.monotonic() - start, sandbox.fake.balance_requests)
        assert_clean(guard)


# -- fail open (on_unavailable="allow"): the action runs, the policy is logged -----------


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_fail_open_sync(sandbox: Sandbox, fault: Fault, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="creditguard")
    with sandbox.guard(on_unavailable="allow", **fault.config) as guard:  # type: ignore[arg-type]
        fault.script(sandbox)
        start = time.monotonic()
        with guard.spend(COST) as spend:
            sandbox.fake.charge(COST)
        elapsed = time.monotonic() - start
        after = spend.balance_after  # its read meets the same fault
        read = time.monotonic() - start - elapsed
        _check_fail_open(sandbox, fault, guard, spend, after, (elapsed, read), caplog)
        fault.clear(sandbox)
        assert guard.balance() == sandbox.fake.balance
        assert_clean(guard, cached=True)  # that read settled the block


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
async def test_fail_open_async(
    sandbox: Sandbox, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="creditguard")
    guard = sandbox.guard(on_unavailable="allow", **fault.config)  # type: ignore[arg-type]
    async with guard:
        fault.script(sandbox)
        start = time.monotonic()
        async with guard.spend(COST) as spend:
            sandbox.fake.charge(COST)
        elapsed = time.monotonic() - start
        after = await spend.abalance_after()  # its read meets the same fault
        read = time.monotonic() - start - elapsed
        _check_fail_open(sandbox, fault, guard, spend, after, (elapsed, read), caplog)
        fault.clear(sandbox)
        assert await guard.abalance() == sandbox.fake.balance
        assert_clean(guard, cached=True)  # that read settled the block


def _check_fail_open(
    sandbox: Sandbox,
    fault: Fault,
    guard: CreditGuard,
    spend: Spend,
    after: object,
    elapsed: tuple[float, float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Admission, and the read balance_after asks for, each stay within one read's bound.
    block, read = elapsed
    assert block < fault.bound
    assert read < fault.bound
    assert spend.balance_before is None
    assert after is None  # the read met the same fault
    assert sandbox.fake.balance.total_balance == 1050 - COST
    messages = [r.getMessage() for r in caplog.records if r.name == "creditguard"]
    assert any("unchecked" in m for m in messages), messages
    assert any("balance read after it failed" in m for m in messages), messages
    # Run unchecked, it is reserved like any call: held until a read includes it.
    balance, reserved, inflight = guard._account.snapshot()
    assert (balance, reserved, inflight) == (None, COST, 1)
    assert reads_in_flight(guard) == 0


@pytest.mark.parametrize("kind", ["wrong-key", 401, 403])
def test_fail_open_never_covers_a_rejected_key_sync(sandbox: Sandbox, kind: int | str) -> None:
    key = "sk-not-the-sandbox-key" if kind == "wrong-key" else sandbox.fake.api_key
    if isinstance(kind, int):
        sandbox.fake.fail_next(kind, times=1000)  # type: ignore[arg-type]
    ran = []
    with sandbox.guard(api_key=key, on_unavailable="allow", **QUICK) as guard:  # type: ignore[arg-type]
        with pytest.raises(AuthenticationError) as info, guard.spend(COST):
            ran.append(True)
        assert not ran
        assert info.value.status_code == (401 if kind == "wrong-key" else kind)
        assert sandbox.fake.balance_requests == 1  # never retried
        assert_clean(guard)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["wrong-key", 401, 403])
async def test_fail_open_never_covers_a_rejected_key_async(
    sandbox: Sandbox, kind: int | str
) -> None:
    key = "sk-not-the-sandbox-key" if kind == "wrong-key" else sandbox.fake.api_key
    if isinstance(kind, int):
        sandbox.fake.fail_next(kind, times=1000)  # type: ignore[arg-type]
    ran = []
    guard = sandbox.guard(api_key=key, on_unavailable="allow", **QUICK)  # type: ignore[arg-type]
    async with guard:
        with pytest.raises(AuthenticationError):
            async with guard.spend(COST):
                ran.append(True)
        assert not ran
        assert sandbox.fake.balance_requests == 1
        assert_clean(guard)


# -- transient faults: retried within the budget, then the spend goes through -------------

# (id, fault, Retry-After header, how many requests in a row get it)
TRANSIENT = [
    ("http-500", 500, {}, 2),
    ("http-502", 502, {}, 2),
    ("http-503", 503, {}, 2),
    ("http-504", 504, {}, 2),
    ("429-retry-after-1", 429, {"Retry-After": "1"}, 1),
    ("429-retry-after-0", 429, {"Retry-After": "0"}, 2),
    ("drop", "drop", {}, 2),
    ("truncated", "truncated", {}, 2),
    ("stall", "stall", {}, 2),
]


@pytest.mark.parametrize(
    ("kind", "headers", "times"), [t[1:] for t in TRANSIENT], ids=[t[0] for t in TRANSIENT]
)
def test_transient_fault_is_retried_sync(
    sandbox: Sandbox, kind: int | str, headers: dict[str, str], times: int
) -> None:
    retry = RetryPolicy(attempts=3, deadline=3.0, backoff=0.02)
    with sandbox.guard(timeout=0.3, retry=retry) as guard:
        sandbox.fake.fail_next(kind, times=times, headers=headers)  # type: ignore[arg-type]
        before = sandbox.fake.balance
        start = time.monotonic()
        with guard.spend(COST) as spend:
            sandbox.fake.charge(COST)
        elapsed = time.monotonic() - start
        _check_transient(sandbox, guard, spend, before, elapsed, retry, headers, times)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "headers", "times"), [t[1:] for t in TRANSIENT], ids=[t[0] for t in TRANSIENT]
)
async def test_transient_fault_is_retried_async(
    sandbox: Sandbox, kind: int | str, headers: dict[str, str], times: int
) -> None:
    retry = RetryPolicy(attempts=3, deadline=3.0, backoff=0.02)
    guard = sandbox.guard(timeout=0.3, retry=retry)
    async with guard:
        sandbox.fake.fail_next(kind, times=times, headers=headers)  # type: ignore[arg-type]
        before = sandbox.fake.balance
        start = time.monotonic()
        async with guard.spend(COST) as spend:
            sandbox.fake.charge(COST)
        elapsed = time.monotonic() - start
        _check_transient(sandbox, guard, spend, before, elapsed, retry, headers, times)


def _check_transient(
    sandbox: Sandbox,
    guard: CreditGuard,
    spend: Spend,
    before: object,
    elapsed: float,
    retry: RetryPolicy,
    headers: dict[str, str],
    times: int,
) -> None:
    assert spend.balance_before == before
    assert spend.balance_after == sandbox.fake.balance
    reads = times + 2  # the faults, a good read, the refresh after the action
    assert sandbox.fake.balance_requests == reads
    assert elapsed < retry.deadline + 1.0
    if "Retry-After" in headers:
        # Retry-After is honoured (a lower bound on the wait it asked for, not a speed claim).
        assert elapsed >= times * float(headers["Retry-After"]) - 0.05
    assert_clean(guard, cached=True)
    assert guard.balance() == sandbox.fake.balance
    assert sandbox.fake.balance_requests == reads  # served from the cache


# -- the refresh after a successful action fails: the action's result stands ---------------


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_refresh_fault_after_spend_sync(
    sandbox: Sandbox, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="creditguard")
    with sandbox.guard(**fault.config) as guard:  # type: ignore[arg-type]
        with guard.spend(COST) as spend:
            sandbox.fake.charge(COST)
            fault.script(sandbox)  # the block exits with no read: it meets no fault
        start = time.monotonic()
        after = spend.balance_after
        elapsed = time.monotonic() - start
        _check_refresh_fault(sandbox, fault, guard, spend, after, elapsed, caplog)
        fault.clear(sandbox)
        assert guard.balance() == sandbox.fake.balance
        assert_clean(guard, cached=True)  # that read settled the block


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
async def test_refresh_fault_after_spend_async(
    sandbox: Sandbox, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="creditguard")
    guard = sandbox.guard(**fault.config)  # type: ignore[arg-type]
    async with guard:
        async with guard.spend(COST) as spend:
            sandbox.fake.charge(COST)
            fault.script(sandbox)  # the block exits with no read: it meets no fault
        start = time.monotonic()
        after = await spend.abalance_after()
        elapsed = time.monotonic() - start
        _check_refresh_fault(sandbox, fault, guard, spend, after, elapsed, caplog)
        fault.clear(sandbox)
        assert await guard.abalance() == sandbox.fake.balance
        assert_clean(guard, cached=True)  # that read settled the block


def _check_refresh_fault(
    sandbox: Sandbox,
    fault: Fault,
    guard: CreditGuard,
    spend: Spend,
    after: object,
    elapsed: float,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert elapsed < fault.bound
    assert spend.balance_before is not None
    assert spend.balance_before.total_balance == 1050
    assert after is None
    assert spend.balance_after is None  # remembered: no second try
    messages = [r.getMessage() for r in caplog.records if r.name == "creditguard"]
    assert any("balance read after it failed" in m for m in messages), messages
    # The block stays reserved until a read includes it (the cache, which does not, may
    # still serve admissions beside that reservation).
    _, reserved, inflight = guard._account.snapshot()
    assert (reserved, inflight) == (COST, 1)
    assert reads_in_flight(guard) == 0


# -- cancellation while a read is stalled -------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_leader_of_a_stalled_read(sandbox: Sandbox) -> None:
    """The leader of a read that stalls is cancelled: its waiter neither hangs nor inherits
    the cancellation; it leads a new read and is admitted. Nothing stays reserved."""
    sandbox.fake.fail_next("stall")
    guard = sandbox.guard(timeout=30.0, retry=RetryPolicy(attempts=1, deadline=30.0))
    admitted: list[int] = []

    async def spend(cost: int, scope: anyio.CancelScope) -> None:
        with scope:
            async with guard.spend(cost) as s:
                assert s.balance_before is not None
                admitted.append(s.balance_before.total_balance)
                sandbox.fake.charge(cost)

    async with guard:
        leader, waiter = anyio.CancelScope(), anyio.CancelScope()
        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(spend, 7, leader)
            await anyio.wait_all_tasks_blocked()  # the leader's read is stalled
            tg.start_soon(spend, 5, waiter)
            await anyio.wait_all_tasks_blocked()  # the waiter waits on that read
            leader.cancel()
        assert time.monotonic() - start < 10  # nobody waited for the stall to end
        assert leader.cancelled_caught
        assert not waiter.cancelled_caught
        assert admitted == [1050]
        assert sandbox.fake.balance_requests == 2  # stalled read, waiter's read
        assert await guard.abalance() == sandbox.fake.balance  # settles the waiter's block
        assert sandbox.fake.balance_requests == 3
        assert_clean(guard, cached=True)


async def _cancel_once_stalled(sandbox: Sandbox, scope: anyio.CancelScope, n: int) -> None:
    """Cancel ``scope`` once the sandbox has served ``n`` scripted faults: the request is
    then stalled mid-body (cancelling on a timer could fire before it even arrived, and
    leave the stall to the next read)."""
    await anyio.to_thread.run_sync(sandbox.fake.wait_faults_served, n)
    scope.cancel()


@pytest.mark.anyio
async def test_cancelled_during_stalled_admission(sandbox: Sandbox) -> None:
    sandbox.fake.fail_next("stall")
    ran = []
    guard = sandbox.guard(timeout=30.0, retry=RetryPolicy(attempts=1, deadline=30.0))
    async with guard:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_once_stalled, sandbox, scope, 1)
                async with guard.spend(COST):
                    ran.append(True)
        assert scope.cancelled_caught
        assert not ran
        assert_clean(guard)
        assert await guard.abalance() == sandbox.fake.balance


@pytest.mark.anyio
async def test_cancelled_during_stalled_refresh(sandbox: Sandbox) -> None:
    """Cancelled while the read ``abalance_after()`` asks for is stalled: the block stays
    reserved (the cache unchanged) and a later ask reads again."""
    guard = sandbox.guard(timeout=30.0, retry=RetryPolicy(attempts=1, deadline=30.0))
    async with guard:
        async with guard.spend(COST) as spend:
            sandbox.fake.charge(COST)
        cached = guard._account.snapshot()[0]
        assert cached is not None
        sandbox.fake.fail_next("stall")
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_once_stalled, sandbox, scope, 1)
                await spend.abalance_after()
        assert scope.cancelled_caught
        assert guard._account.snapshot() == (cached, COST, 1)
        assert reads_in_flight(guard) == 0
        after = await spend.abalance_after()  # asked again: read again
        assert after == sandbox.fake.balance
        assert after.total_balance == 1050 - COST
        assert_clean(guard, cached=True)
