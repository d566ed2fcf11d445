"""Defects of the core, each pinned by a test that fails without its fix.

Deadlocks across event loops, unbounded waits for someone else's read, one exception
object shared by every caller of a failed read, a reservation leaked by an interrupted
hook, equivalent base URLs naming different accounts, unvalidated configuration, and the
API items: strict ``for_key``, ``current_spend()``, cost functions checked against the
function they guard.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from creditguard import (
    BalanceUnavailable,
    CreditGuard,
    CreditGuardError,
    GuardEvent,
    InsufficientCredits,
    RateLimited,
    RetryPolicy,
    Spend,
    current_spend,
)
from creditguard.lensmor.client import rate_limit_wait
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend

pytestmark = pytest.mark.anyio

# A retry budget far longer than the liveness bounds below: a waiter that only got out
# through the budget would still fail these tests.
LONG_BUDGET = RetryPolicy(attempts=1, deadline=60.0)


def run_in_threads(*targets: Callable[[], None], timeout: float = 20.0) -> None:
    """Run each target in a daemon thread; fail (not hang) if any is still running."""
    errors: list[BaseException] = []

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
    if errors:
        raise errors[0]


# -- 1. no deadlock across event loops ---------------------------------------------------


@pytest.mark.parametrize("backends", [("asyncio", "trio"), ("asyncio", "asyncio")])
def test_sync_calls_inside_two_event_loops_do_not_deadlock(
    backends: tuple[str, str], new_backend: NewBackend
) -> None:
    """Each loop has a task leading a read; then sync code in each loop's thread asks
    for the balance. A thread never waits for a task-led read, so neither blocks on the
    other's loop."""
    fake = FakeLensmor(latency=0.2)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=0, retry=LONG_BUDGET, backend=new_backend()
    )
    both_leading = threading.Barrier(2, timeout=10)
    results: list[int] = []

    def loop_thread(backend: str) -> Callable[[], None]:
        async def main() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(guard.abalance)  # a task of this loop leads a read
                await anyio.wait_all_tasks_blocked()
                await anyio.to_thread.run_sync(both_leading.wait)
                results.append(guard.balance().total_balance)  # sync, blocking the loop

        return lambda: anyio.run(main, backend=backend)

    run_in_threads(*(loop_thread(b) for b in backends))
    assert results == [30050, 30050]


async def test_a_loop_blocked_on_a_pool_thread_that_needs_the_balance(
    new_backend: NewBackend,
) -> None:
    """A coroutine blocks its loop on ``pool.submit(sync_guarded).result()`` while a task
    of that loop leads a read: the pool thread must not wait for that read."""
    fake = FakeLensmor(latency=0.2)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=0, retry=LONG_BUDGET, backend=new_backend()
    )

    @guard.requires_credits(10)
    def unlock() -> str:
        return "done"

    with ThreadPoolExecutor(1) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(guard.abalance)
            await anyio.wait_all_tasks_blocked()
            assert pool.submit(unlock).result(timeout=20) == "done"  # blocks this loop


# -- 5. waiting for someone else's read is bounded ----------------------------------------


class StuckFirst(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """The first request never gets an answer (its leader stops making progress); the
    others are served by the sandbox."""

    def __init__(self, fake: FakeLensmor) -> None:
        self.fake = fake
        self.requests = 0
        self.stuck = threading.Event()
        self.stuck_in_loop: asyncio.Event | None = None  # set too, for an asyncio waiter
        self.unstick = threading.Event()

    def _first(self) -> bool:
        self.requests += 1
        return self.requests == 1

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._first():
            self.stuck.set()
            if self.stuck_in_loop is not None:
                self.stuck_in_loop.set()
            await anyio.sleep_forever()
        return await self.fake.transport.handle_async_request(request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._first():
            self.stuck.set()
            self.unstick.wait(30)
        return self.fake.transport.handle_request(request)


@pytest.mark.memory_only  # looks at how the memory backend shares one read
def test_a_read_whose_loop_stopped_does_not_block_its_waiters_for_ever(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    transport = StuckFirst(fake)
    guard = CreditGuard(
        fake.api_key,
        transport=transport,
        ttl=60,
        timeout=0.2,
        retry=RetryPolicy(attempts=1, deadline=0.2),
        backend=new_backend(),
    )
    # A task left pending by run_until_complete: its loop stops while it leads a read.
    loop = asyncio.new_event_loop()
    try:
        transport.stuck_in_loop = asyncio.Event()
        stuck_task = loop.create_task(guard.abalance())
        loop.run_until_complete(transport.stuck_in_loop.wait())
        assert not stuck_task.done()
        assert guard._account.flights

        async def join() -> int:
            with anyio.fail_after(10):  # liveness bound, far above the 0.4 s budget
                return (await guard.abalance()).total_balance

        assert anyio.run(join) == 30050
        assert not guard._account.flights  # the stuck read is no longer joined
    finally:
        loop.close()


@pytest.mark.memory_only  # looks at how the memory backend shares one read
def test_a_thread_waiting_on_a_stalled_sync_read_reads_on_its_own(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    transport = StuckFirst(fake)
    guard = CreditGuard(
        fake.api_key,
        transport=transport,
        ttl=60,
        timeout=0.2,
        retry=RetryPolicy(attempts=1, deadline=0.2),
        backend=new_backend(),
    )
    leader_errors: list[BaseException] = []

    def lead() -> None:
        try:
            guard.balance()
        except BalanceUnavailable as exc:  # its answer came after the read's deadline
            leader_errors.append(exc)

    leader = threading.Thread(target=lead, daemon=True)
    leader.start()
    assert transport.stuck.wait(10)
    try:
        run_in_threads(lambda: guard.balance(), timeout=10)
        assert guard.balance().total_balance == 30050
    finally:
        transport.unstick.set()
        leader.join(10)


# -- 3. every caller gets its own exception ------------------------------------------------


@pytest.mark.memory_only  # looks at how the memory backend shares one read
async def test_every_waiter_of_a_failed_read_gets_its_own_exception(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(latency=0.05)
    fake.fail_next(503, times=5)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, retry=RetryPolicy(attempts=1), backend=new_backend()
    )
    errors: list[BalanceUnavailable] = []

    async def read() -> None:
        try:
            await guard.abalance()
        except BalanceUnavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(300):
            tg.start_soon(read)
    assert len(errors) == 300
    assert len({id(e) for e in errors}) == 300
    causes = {id(e.__cause__) for e in errors if isinstance(e.__cause__, BalanceUnavailable)}
    assert len(causes) == 1  # the read's own error, shared as the cause
    deepest = max(len(traceback.extract_tb(e.__traceback__)) for e in errors)
    assert deepest < 30, deepest  # not growing with each caller
    assert all(e.status_code == 503 for e in errors)


def test_every_thread_waiting_on_a_failed_read_gets_its_own_exception(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(latency=0.05)
    fake.fail_next(503, times=5)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, retry=RetryPolicy(attempts=1), backend=new_backend()
    )
    errors: list[BaseException] = []
    lock = threading.Lock()

    def read() -> None:
        try:
            guard.balance()
        except BalanceUnavailable as exc:
            with lock:
                errors.append(exc)

    with ThreadPoolExecutor(16) as pool:
        for f in [pool.submit(read) for _ in range(16)]:
            f.result(20)
    assert len({id(e) for e in errors}) == len(errors) == 16
    assert max(len(traceback.extract_tb(e.__traceback__)) for e in errors) < 30


# -- 4. an interrupted hook gives the reservation back -------------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_the_admitted_hook_leaves_no_reservation(
    interrupt: type[BaseException],
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)

    def hook(event: GuardEvent) -> None:
        if event.kind == "admitted" and event.cost == 60:
            raise interrupt

    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=hook, backend=new_backend()
    )
    ran = []
    with pytest.raises(interrupt), guard.spend(60):
        ran.append(60)
    assert not ran
    assert guard._account.snapshot()[1:] == (0, 0)
    with guard.spend(50):  # not "50 required, 40 available"
        fake.charge(50)


async def test_an_interrupt_in_the_unchecked_hook_leaves_no_reservation(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)

    def hook(event: GuardEvent) -> None:
        if event.kind == "unchecked":
            raise KeyboardInterrupt

    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        on_event=hook,
        on_unavailable="allow",
        retry=RetryPolicy(attempts=1),
        backend=new_backend(),
    )
    fake.fail_next(503)
    with pytest.raises(KeyboardInterrupt):
        async with guard.spend(60):
            pytest.fail("must not run")
    assert guard._account.snapshot()[1:] == (0, 0)


# -- 7. equivalent base URLs are one account ------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://platform.lensmor.com",
        "https://platform.lensmor.com/",
        "https://platform.lensmor.com:443",
        "https://PLATFORM.Lensmor.com:443/",
        "HTTPS://platform.lensmor.com",
    ],
)
def test_equivalent_base_urls_name_one_account(url: str, new_backend: NewBackend) -> None:
    reference = CreditGuard("k", base_url="https://platform.lensmor.com", backend=new_backend())
    guard = CreditGuard("k", base_url=url, backend=new_backend())
    assert guard.account == reference.account
    assert guard.base_url == "https://platform.lensmor.com"


def test_equivalent_base_urls_share_reservations(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    backend = new_backend()
    a = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, admission_timeout=0)
    b = CreditGuard(
        fake.api_key,
        base_url="https://PLATFORM.lensmor.com:443/",
        transport=fake.transport,
        backend=backend,
        admission_timeout=0,
    )
    with a.spend(80):
        with pytest.raises(InsufficientCredits), b.spend(80):
            pytest.fail("both 80-credit calls admitted on 100 credits")
        fake.charge(80)


def test_a_base_url_with_credentials_is_refused_and_never_echoed(new_backend: NewBackend) -> None:
    with pytest.raises(CreditGuardError) as info:
        CreditGuard(
            "k", base_url="https://user:hunter2@platform.lensmor.com", backend=new_backend()
        )
    assert "hunter2" not in str(info.value)
    assert "user" not in str(info.value).replace("user:password", "")
    with pytest.raises(CreditGuardError):
        CreditGuard("k", base_url="https://platform.lensmor.com/?key=1", backend=new_backend())


# -- 8. bad configuration is refused at construction ------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": float("nan")},
        {"timeout": -1},
        {"timeout": 0},
        {"timeout": float("inf")},
        {"timeout": httpx.Timeout(1.0, read=-1.0)},
        {"timeout": httpx.Timeout(1.0, connect=float("nan"))},
        {"ttl": 10**400},
        {"ttl": float("inf")},
        {"ttl": float("nan")},
        {"admission_timeout": -1},
        {"admission_timeout": float("inf")},
        {"admission_timeout": True},
    ],
)
def test_bad_seconds_are_refused_at_construction(
    kwargs: dict[str, Any], new_backend: NewBackend
) -> None:
    with pytest.raises((ValueError, TypeError)):
        CreditGuard("k", **kwargs, backend=new_backend())


def test_an_httpx_timeout_with_no_limit_on_a_phase_is_accepted(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, timeout=httpx.Timeout(None), backend=new_backend()
    )
    assert guard.balance().total_balance == 30050


# -- issue items: for_key, current_spend, cost functions -------------------------------------


def test_for_key_never_falls_back_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, new_backend: NewBackend
) -> None:
    monkeypatch.setenv("LENSMOR_API_KEY", "operator-key")
    guard = CreditGuard(backend=new_backend())
    for bad in (None, "", " ", "key with space"):
        with pytest.raises(CreditGuardError):
            guard.for_key(bad)  # type: ignore[arg-type]
    assert guard.for_key("tenant").account != guard.account


async def test_current_spend_inside_decorated_functions(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    seen: list[Spend | None] = []

    @guard.requires_credits(lambda ids: 15 * len(ids))
    async def unlock(ids: list[str]) -> None:
        seen.append(current_spend())

    @guard.requires_credits(10)
    def search() -> None:
        seen.append(current_spend())

    assert current_spend() is None
    await unlock(["a", "b"])
    await anyio.to_thread.run_sync(search)
    assert current_spend() is None
    first, second = seen
    assert first is not None
    assert second is not None
    assert (first.cost, second.cost) == (30, 10)
    assert first.balance_before is not None
    assert first.balance_before.total_balance == 30050


def test_current_spend_nests_and_stays_in_its_thread(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    other: list[Spend | None] = []
    with guard.spend(5) as outer:
        assert current_spend() is outer
        with guard.spend(3) as inner:
            assert current_spend() is inner
            t = threading.Thread(target=lambda: other.append(current_spend()))
            t.start()
            t.join()
        assert current_spend() is outer
    assert current_spend() is None
    assert other == [None]


def test_a_nested_call_does_not_wait_for_its_own_enclosing_spend(new_backend: NewBackend) -> None:
    """A guarded call inside another cannot wait for the outer one to settle (it never
    will first): decided at once, on what the outer spend leaves."""
    fake = FakeLensmor(subscription_balance=10, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, admission_timeout=30, backend=new_backend()
    )
    with guard.spend(6):
        with pytest.raises(InsufficientCredits) as info, guard.spend(5):
            pytest.fail("only 4 credits are not reserved")
        assert (info.value.available, info.value.reserved) == (4, 6)
        with guard.spend(4):
            fake.charge(4)
        fake.charge(6)


def test_a_cost_function_that_cannot_take_the_arguments_fails_at_decoration(
    new_backend: NewBackend,
) -> None:
    guard = CreditGuard("k", backend=new_backend())
    with pytest.raises(TypeError, match="cannot take the arguments of unlock"):

        @guard.requires_credits(lambda ids: 15 * len(ids))  # type: ignore[arg-type]
        def unlock(ids: list[str], *, dry_run: bool = False) -> None: ...

    with pytest.raises(TypeError, match="cannot take the arguments"):

        @guard.requires_credits(lambda: 1)  # type: ignore[arg-type]
        async def search(query: str) -> None: ...

    @guard.requires_credits(lambda ids, *, dry_run=False: 0 if dry_run else 15 * len(ids))
    def unlock_ok(ids: list[str], *, dry_run: bool = False) -> None: ...

    @guard.requires_credits(lambda *args, **kwargs: 1)
    def anything(a: int, b: str = "") -> None: ...


# -- rate limits: X-RateLimit-Remaining / X-RateLimit-Reset ------------------------------


def _limited_transport(
    fake: FakeLensmor, reset_in: float, remaining: str = "0"
) -> tuple[httpx.MockTransport, list[int]]:
    """The sandbox's balance, with rate-limit headers saying what is left."""
    sent: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(1)
        body = json.dumps(fake.balance.to_api()).encode()
        return httpx.Response(
            200,
            content=body,
            headers={
                "content-type": "application/json",
                "x-ratelimit-limit": "60",
                "x-ratelimit-remaining": remaining,
                "x-ratelimit-reset": str(int(time.time() + reset_in)),
            },
        )

    return httpx.MockTransport(handler), sent


def test_no_balance_request_while_the_rate_limit_is_used_up(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    transport, sent = _limited_transport(fake, reset_in=120)
    guard = CreditGuard(fake.api_key, transport=transport, ttl=60, backend=new_backend())
    assert guard.balance().total_balance == 30050  # the answer says none are left
    with guard.spend(10):  # the cache still serves within its TTL
        fake.charge(10)
    # ...but the refresh after spending may not call: it fails fast (the action's result
    # stands, the refresh is reported as failed), and so does the next read.
    assert len(sent) == 1
    with pytest.raises(RateLimited) as info:
        guard.balance()
    assert info.value.retry_after is not None
    assert 100 < info.value.retry_after <= 120
    assert len(sent) == 1


async def test_rate_limit_fails_fast_in_async_code_too(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    transport, sent = _limited_transport(fake, reset_in=60)
    guard = CreditGuard(fake.api_key, transport=transport, ttl=0, backend=new_backend())
    await guard.abalance()
    with pytest.raises(RateLimited):
        async with guard.spend(1):
            pytest.fail("must not run: the balance cannot be read")
    assert len(sent) == 1


def test_requests_left_or_no_headers_never_block(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    transport, sent = _limited_transport(fake, reset_in=60, remaining="5")
    guard = CreditGuard(fake.api_key, transport=transport, ttl=0, backend=new_backend())
    for _ in range(3):
        guard.balance()
    assert len(sent) == 3


@pytest.mark.usefixtures("new_backend")
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1030"}, 30.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "900"}, 0.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "99999999"}, 3600.0),
        ({"x-ratelimit-remaining": "1", "x-ratelimit-reset": "1030"}, None),
        ({"x-ratelimit-remaining": "0"}, None),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "soon"}, None),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1e3"}, None),
        ({}, None),
    ],
)
def test_rate_limit_wait(headers: dict[str, str], expected: float | None) -> None:
    assert rate_limit_wait(httpx.Headers(headers), now=1000.0) == expected


# -- a 402 from the paid call itself -----------------------------------------------------


def test_a_402_from_the_paid_call_is_insufficient_credits_with_the_original_as_cause(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    assert guard.balance().total_balance == 100
    fake.charge(80)  # the Lensmor web app spends from the same pool: the guard cannot see it
    client = httpx.Client(transport=fake.transport, base_url="https://sandbox.invalid")
    auth = {"Authorization": f"Bearer {fake.api_key}"}

    @guard.requires_credits(50)
    def unlock() -> None:
        client.post("/sandbox/charge", params={"credits": 50}, headers=auth).raise_for_status()

    with pytest.raises(InsufficientCredits) as info:
        unlock()
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)
    assert info.value.__cause__.response.status_code == 402
    assert info.value.required == 50
    cached, reserved, inflight = guard._account.snapshot()
    assert (cached, reserved, inflight) == (None, 0, 0)  # the stale balance is dropped
    with pytest.raises(InsufficientCredits) as again:  # decided on a fresh read now
        unlock()
    assert again.value.__cause__ is None
    assert again.value.available == 20


async def test_a_402_in_async_code_and_other_errors_pass_through_unchanged(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    await guard.abalance()
    fake.charge(80)
    request = httpx.Request("POST", "https://sandbox.invalid/x")
    with pytest.raises(InsufficientCredits):
        async with guard.spend(50):
            raise httpx.HTTPStatusError(
                "402", request=request, response=httpx.Response(402, request=request)
            )
    with pytest.raises(httpx.HTTPStatusError):  # a 409 is the action's own error
        async with guard.spend(10):
            raise httpx.HTTPStatusError(
                "409", request=request, response=httpx.Response(409, request=request)
            )


def test_spends_exited_out_of_order_leave_no_finished_spend_current(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    a, b, c = guard.spend(1), guard.spend(2), guard.spend(3)
    a.__enter__()
    b.__enter__()
    c.__enter__()
    b.__exit__(None, None, None)  # the middle one first
    assert current_spend() is c
    c.__exit__(None, None, None)
    assert current_spend() is a  # not b, which has finished
    a.__exit__(None, None, None)
    assert current_spend() is None
    a2, b2 = guard.spend(1), guard.spend(2)
    a2.__enter__()
    b2.__enter__()
    a2.__exit__(None, None, None)  # the outer one first
    assert current_spend() is b2
    b2.__exit__(None, None, None)
    assert current_spend() is None


async def test_a_task_started_inside_a_spend_does_not_see_it_once_it_ended(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    ended = anyio.Event()
    seen: list[Spend | None] = []

    async def child() -> None:
        await ended.wait()
        seen.append(current_spend())

    async with anyio.create_task_group() as tg:
        async with guard.spend(1):
            tg.start_soon(child)  # inherits the context, with the spend current
        ended.set()
    assert seen == [None]


def test_a_free_call_is_admitted_even_when_reservations_exceed_the_balance(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=10, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=60, admission_timeout=0, backend=new_backend()
    )
    with guard.spend(10):
        fake.charge(10)
        guard.invalidate()
        assert guard.balance().total_balance == 0  # 0 - 10 reserved: below zero
        with guard.spend(0) as free:
            assert free.balance_before is not None


@pytest.mark.parametrize("backends", [("asyncio", "trio"), ("asyncio", "asyncio")])
def test_mixed_sync_and_async_guarded_calls_in_two_loops_finish(
    backends: tuple[str, str],
    new_backend: NewBackend,
) -> None:
    """The shape reported as hanging: two event loops in two threads, 20 tasks each,
    every third call a sync guarded call made from the loop's thread."""
    fake = FakeLensmor(latency=0.02)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=0, retry=LONG_BUDGET, backend=new_backend()
    )
    done: list[int] = []
    lock = threading.Lock()

    @guard.requires_credits(1)
    def sync_unlock() -> None:
        fake.charge(1)

    @guard.requires_credits(1)
    async def async_unlock() -> None:
        fake.charge(1)

    def loop_thread(backend: str) -> Callable[[], None]:
        async def task(i: int) -> None:
            for j in range(3):
                if (i + j) % 3 == 0:
                    sync_unlock()  # blocks this loop's thread
                else:
                    await async_unlock()
                with lock:
                    done.append(1)

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(task, i)

        return lambda: anyio.run(main, backend=backend)

    run_in_threads(*(loop_thread(b) for b in backends), timeout=30)
    assert len(done) == 120
    assert fake.charges == 120


def test_lensmors_insufficient_credits_error_body_counts_as_a_402(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    request = httpx.Request("POST", "https://sandbox.invalid/external/events/e1/unlock")
    body = {"code": 402, "message": "Insufficient credits", "errorKey": "INSUFFICIENT_CREDITS"}
    refused = httpx.Response(400, json=body, request=request)  # the key, not the status
    with pytest.raises(InsufficientCredits) as info, guard.spend(10):
        raise httpx.HTTPStatusError("refused", request=request, response=refused)
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)


def test_an_app_error_wrapping_a_402_keeps_its_type(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    request = httpx.Request("POST", "https://sandbox.invalid/x")

    class PaymentNeeded(Exception):
        pass

    def unlock() -> None:
        try:
            raise httpx.HTTPStatusError(
                "402", request=request, response=httpx.Response(402, request=request)
            )
        except httpx.HTTPStatusError as exc:
            raise PaymentNeeded from exc

    with pytest.raises(PaymentNeeded), guard.spend(10):
        unlock()
