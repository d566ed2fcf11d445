"""Exact admission: never admit what the account cannot pay, never refuse what it can.

A balance read that overlapped spends in flight may already include their charges while
their credits are still reserved; the guard must not count them twice. These tests build
that situation on purpose (a read made while a spend is in flight, after its charge) and
check that a call the account can pay waits for the spend to settle instead of being
refused, that a call it cannot pay is refused at once with what is really available, and
that the wait is bounded, holds nothing and can be cancelled without a trace.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from creditguard import AdmissionTimeout, CreditGuard, InsufficientCredits
from creditguard.testing import FakeLensmor
from tests.helpers import Gate, NewBackend, reserved, waiting_for_release

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake100() -> FakeLensmor:
    return FakeLensmor(subscription_balance=100, gift_balance=0)


class InFlight:
    """A guarded spend of ``cost`` run in a thread: it charges the sandbox, then holds
    until ``finish()``, so the test can act while it is in flight after its charge."""

    def __init__(self, guard: CreditGuard, fake: FakeLensmor, cost: int) -> None:
        self.charged = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with guard.spend(cost):
                    fake.charge(cost)
                    self.charged.set()
                    assert self.release.wait(10)
            except BaseException as exc:  # pragma: no cover - reported by the test
                self.error = exc
                self.charged.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.charged.wait(10)
        assert self.error is None

    def finish(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.error is None


@pytest.fixture
def in_flight() -> Iterator[list[InFlight]]:
    started: list[InFlight] = []
    yield started
    for spend in started:
        spend.release.set()
        spend.thread.join(10)


def overlapping(guard: CreditGuard, fake: FakeLensmor, in_flight: list[InFlight]) -> InFlight:
    """A 60-credit spend in flight whose charge the cached balance already includes:
    the balance says 40 while the 60 credits are still reserved."""
    spend = InFlight(guard, fake, 60)
    in_flight.append(spend)
    guard.invalidate()  # e.g. the TTL ran out mid-burst: the next read overlaps the spend
    assert guard.balance().total_balance == 40
    assert reserved(guard) == 60
    return spend


# -- sync --------------------------------------------------------------------------------


def test_a_call_the_account_can_pay_waits_for_spends_in_flight_instead_of_being_refused(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    spend = overlapping(guard, fake100, in_flight)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: guard.requires_credits(30)(lambda: fake100.charge(30))())
        # The call waits (40 - 60 reserved leaves nothing, but 40 covers 30)...
        while waiting_for_release(guard) == 0:
            assert not future.done(), future.exception()
            threading.Event().wait(0.001)
        # ...and is admitted once the spend in flight has settled.
        spend.finish()
        future.result(10)
    assert fake100.balance.total_balance == 10
    guard.balance()  # the calls returned; this read settles them
    assert reserved(guard) == 0


def test_a_refusal_is_decided_at_once_when_the_balance_cannot_pay(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    """The cached 40 may or may not include the 60 in flight; either way the account
    cannot pay 50 even if the 60 charge nothing: refused at once, saying 40 available
    (not "0 available"), without waiting for the call in flight."""
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    overlapping(guard, fake100, in_flight)
    with pytest.raises(InsufficientCredits) as info, guard.spend(50):
        pytest.fail("must not run")
    assert (info.value.required, info.value.available, info.value.reserved) == (50, 40, 60)
    assert waiting_for_release(guard) == 0
    assert reserved(guard) == 60  # the refused call holds nothing


def test_a_call_only_calls_in_flight_stand_in_the_way_of_waits_then_is_decided(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    """100 credits, 60 reserved by a call in flight admitted after the read: 50 does not
    fit beside it, but the account could pay it if the 60 charged nothing. It waits for
    the call to settle, then is decided on what it left: 40, refused."""
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    assert guard.balance().total_balance == 100
    spend = InFlight(guard, fake100, 60)
    in_flight.append(spend)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: guard.spend(50).__enter__())
        while waiting_for_release(guard) == 0:
            assert not future.done(), future.exception()
            threading.Event().wait(0.001)
        spend.finish()
        with pytest.raises(InsufficientCredits) as info:
            future.result(10)
    assert (info.value.required, info.value.available, info.value.reserved) == (50, 40, 0)
    assert reserved(guard) == 0


def test_calls_in_flight_that_fail_upstream_leave_their_credits_to_the_waiters(
    fake100: FakeLensmor,
    new_backend: NewBackend,
) -> None:
    """20 concurrent spend(10) on 100 credits; the first 10 admitted fail upstream and
    charge nothing. No call is refused: the other 10 wait, are admitted and spend the
    100 (never "0 available (100 reserved by calls in flight)")."""
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    guard.balance()
    admitted = threading.Semaphore(0)
    fail_now = threading.Event()
    failing = threading.BoundedSemaphore(10)
    refused: list[BaseException] = []
    spent: list[int] = []

    def call() -> None:
        try:
            with guard.spend(10):
                if failing.acquire(blocking=False):  # one of the first 10 admitted
                    admitted.release()
                    assert fail_now.wait(10)
                    raise RuntimeError("upstream 409: nothing charged")
                fake100.charge(10)
                spent.append(10)
        except RuntimeError:
            pass
        except BaseException as exc:  # pragma: no cover - reported by the test
            refused.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for _ in range(10):
        assert admitted.acquire(timeout=10)
    while waiting_for_release(guard) < 10:  # the other ten wait for the ten in flight
        assert not refused, refused
        threading.Event().wait(0.001)
    fail_now.set()
    for t in threads:
        t.join(10)
    assert refused == []
    assert sum(spent) == 100
    assert fake100.balance.total_balance == 0


def test_the_wait_is_bounded_then_busy_not_insufficient(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    """The calls in flight do not settle within admission_timeout: AdmissionTimeout
    (retry later), never a false InsufficientCredits, and nothing reserved."""
    guard = CreditGuard(
        fake100.api_key,
        transport=fake100.transport,
        ttl=60,
        admission_timeout=0.05,
        backend=new_backend(),
    )
    spend = overlapping(guard, fake100, in_flight)
    with pytest.raises(AdmissionTimeout) as info, guard.spend(30):
        pytest.fail("must not run")
    assert not isinstance(info.value, InsufficientCredits)
    assert (info.value.required, info.value.available, info.value.reserved) == (30, 0, 60)
    assert info.value.retry_after > 0
    assert reserved(guard) == 60  # the call that gave up holds nothing
    assert waiting_for_release(guard) == 0
    spend.finish()
    assert guard.requires_credits(30)(lambda: fake100.charge(30))() is not None


def test_admission_timeout_zero_is_busy_at_once(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    guard = CreditGuard(
        fake100.api_key,
        transport=fake100.transport,
        ttl=60,
        admission_timeout=0,
        backend=new_backend(),
    )
    spend = overlapping(guard, fake100, in_flight)
    with pytest.raises(AdmissionTimeout) as info, guard.spend(30):
        pytest.fail("must not run")
    assert (info.value.available, info.value.reserved) == (0, 60)
    assert waiting_for_release(guard) == 0
    with pytest.raises(InsufficientCredits), guard.spend(41):  # 40 cannot pay it at all
        pytest.fail("must not run")
    spend.finish()


def test_a_failed_spend_in_flight_wakes_the_waiter_which_reads_again(
    fake100: FakeLensmor,
    new_backend: NewBackend,
) -> None:
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    charged = threading.Event()
    release = threading.Event()

    failures: list[RuntimeError] = []

    def failing() -> None:
        try:
            with guard.spend(60):
                fake100.charge(60)
                charged.set()
                assert release.wait(10)
                raise RuntimeError("the paid call failed after charging")
        except RuntimeError as exc:
            failures.append(exc)

    t = threading.Thread(target=failing)
    t.start()
    assert charged.wait(10)
    guard.invalidate()
    assert guard.balance().total_balance == 40
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: guard.requires_credits(40)(lambda: fake100.charge(40))())
        while waiting_for_release(guard) == 0:
            assert not future.done(), future.exception()
            threading.Event().wait(0.001)
        release.set()
        t.join(10)
        future.result(10)
    assert len(failures) == 1
    assert fake100.balance.total_balance == 0


# -- async -------------------------------------------------------------------------------


@pytest.mark.memory_only  # waits for a task blocked at admission
async def test_async_waiter_is_admitted_after_the_spend_settles(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    spend = await anyio.to_thread.run_sync(overlapping, guard, fake100, in_flight)
    ran = []

    @guard.requires_credits(30)
    async def unlock() -> None:
        fake100.charge(30)
        ran.append(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(unlock)
        await anyio.wait_all_tasks_blocked()
        assert waiting_for_release(guard) == 1
        assert not ran
        await anyio.to_thread.run_sync(spend.finish)
    assert ran == [1]
    assert fake100.balance.total_balance == 10
    await guard.abalance()  # the calls returned; this read settles them
    assert reserved(guard) == 0


async def test_cancelling_a_waiter_leaves_no_trace(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    spend = await anyio.to_thread.run_sync(overlapping, guard, fake100, in_flight)
    with anyio.CancelScope() as scope:

        async def cancel_when_waiting() -> None:
            await anyio.wait_all_tasks_blocked()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_waiting)
            async with guard.spend(30):
                pytest.fail("must not run")
    assert scope.cancelled_caught
    assert reserved(guard) == 60
    assert waiting_for_release(guard) == 0  # nothing left registered
    await anyio.to_thread.run_sync(spend.finish)
    await guard.abalance()  # the block returned; this read settles it
    assert reserved(guard) == 0


async def test_waiting_does_not_block_the_event_loop(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    guard = CreditGuard(fake100.api_key, transport=fake100.transport, ttl=60, backend=new_backend())
    spend = await anyio.to_thread.run_sync(overlapping, guard, fake100, in_flight)
    ticks = 0
    waiter_done = anyio.Event()

    async def waiter() -> None:
        async with guard.spend(30):
            fake100.charge(30)
        waiter_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        while waiting_for_release(guard) == 0:
            await anyio.lowlevel.checkpoint()
        for _ in range(100):  # other tasks of the loop keep running while it waits
            ticks += 1
            await anyio.lowlevel.checkpoint()
        await anyio.to_thread.run_sync(spend.finish)
        await waiter_done.wait()
    assert ticks == 100
    assert fake100.balance.total_balance == 10


# -- bursts: the defect as reported ------------------------------------------------------


@pytest.mark.parametrize("ttl", [0.02, 600.0], ids=["ttl_expires_mid_burst", "ttl_long"])
async def test_burst_of_excess_demand_spends_every_credit(
    ttl: float, new_backend: NewBackend
) -> None:
    """200 tasks of 1 credit on 100 credits: exactly 100 run, whatever the TTL does."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, latency=0.002)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=ttl, backend=new_backend())
    await guard.abalance()  # warm
    ran = 0
    refused: list[InsufficientCredits] = []

    @guard.requires_credits(1)
    async def unlock() -> None:
        nonlocal ran
        await anyio.sleep(0.005)  # the paid call's own latency
        fake.charge(1)
        ran += 1

    async def call() -> None:
        try:
            await unlock()
        except InsufficientCredits as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(call)
    assert ran == 100
    assert len(refused) == 100
    assert fake.balance.total_balance == 0
    # Each refusal was true: the balance it was decided on could not pay the call even
    # if every call in flight charged nothing.
    for exc in refused:
        assert exc.balance is not None
        assert exc.available == exc.balance.total_balance == 0
    await guard.abalance()  # the calls returned; this read settles them
    assert reserved(guard) == 0
    assert fake.balance_requests < 200  # waiting callers share the reads that settle


def test_steady_threads_spend_every_credit_and_never_refuse_while_credits_remain(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0, latency=0.001)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=0.01, backend=new_backend())
    refused: list[InsufficientCredits] = []
    lock = threading.Lock()

    @guard.requires_credits(10)
    def unlock() -> None:
        threading.Event().wait(0.002)
        fake.charge(10)

    def worker() -> None:
        for _ in range(10):
            try:
                unlock()
            except InsufficientCredits as exc:
                with lock:
                    refused.append(exc)

    with ThreadPoolExecutor(16) as pool:
        for f in [pool.submit(worker) for _ in range(16)]:
            f.result(60)
    assert fake.balance.total_balance == 0
    assert len(refused) == 160 - 100
    # Every refusal was true: the balance it was decided on could not pay for the call
    # even if every call in flight charged nothing.
    for exc in refused:
        assert exc.balance is not None
        assert exc.available == exc.balance.total_balance < 10
    guard.balance()  # the calls returned; this read settles them
    assert reserved(guard) == 0


def test_a_waiter_keeps_waiting_while_calls_in_flight_keep_settling(
    new_backend: NewBackend,
) -> None:
    """Six calls in flight settle one every tenth of a second; a call that waits for them
    with a 2 s bound is admitted once they all have (12 - 6 = 6 fit exactly)."""
    fake = FakeLensmor(subscription_balance=12, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=60, admission_timeout=2, backend=new_backend()
    )
    spends = [InFlight(guard, fake, 1) for _ in range(6)]  # each has charged its credit
    try:
        guard.invalidate()
        assert guard.balance().total_balance == 6  # holds the six charges, still reserved
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(lambda: guard.requires_credits(6)(lambda: fake.charge(6))())
            while waiting_for_release(guard) == 0:
                assert not future.done(), future.exception()
                threading.Event().wait(0.001)
            for spend in spends:
                threading.Event().wait(0.1)
                spend.finish()
            future.result(10)  # admitted once they all settled: 12 - 6 = 6 fit exactly
    finally:
        for spend in spends:
            spend.release.set()
    assert fake.balance.total_balance == 0
    guard.balance()  # the calls returned; this read settles them
    assert reserved(guard) == 0


def test_time_spent_waiting_for_a_read_does_not_use_up_the_admission_wait(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    """A call whose balance read took longer than admission_timeout must still wait for
    the calls in flight that the read may include, not be refused at once."""
    gate = Gate(fake100.transport)
    guard = CreditGuard(
        fake100.api_key, transport=gate, ttl=60, admission_timeout=0.5, backend=new_backend()
    )
    gate.open()
    spend = InFlight(guard, fake100, 60)  # admitted on a first read, then charged
    in_flight.append(spend)
    gate.close_gate()
    guard.invalidate()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: guard.requires_credits(40)(lambda: fake100.charge(40))())
        gate.wait_arrivals(2)  # its read is held...
        threading.Event().wait(0.8)  # ...longer than admission_timeout
        gate.open()  # the read says 40: it holds the 60 in flight, still reserved
        while waiting_for_release(guard) == 0:
            assert not future.done(), future.exception()  # refused at once: the defect
            threading.Event().wait(0.001)
        spend.finish()
        future.result(10)  # admitted: 40 fit exactly once the 60 settled
    assert fake100.balance.total_balance == 0


def test_no_read_restarts_the_admission_window(
    fake100: FakeLensmor, in_flight: list[InFlight], new_backend: NewBackend
) -> None:
    """admission_timeout bounds the whole wait: a waiting call woken again and again to a
    dropped cache reads again each time, and still gives up (AdmissionTimeout) once its
    window, counted from when it first waited, is over."""
    guard = CreditGuard(
        fake100.api_key,
        transport=fake100.transport,
        ttl=60,
        admission_timeout=0.3,
        backend=new_backend(),
    )
    spend = overlapping(guard, fake100, in_flight)  # cached 40, 60 in flight
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: guard.requires_credits(40)(lambda: fake100.charge(40))())
        while waiting_for_release(guard) == 0:
            assert not future.done(), future.exception()
            threading.Event().wait(0.001)
        wakes = 0
        while not future.done() and wakes < 400:  # 4 s of wakes: ten windows and more
            with pytest.raises(RuntimeError), guard.spend(0):  # a failed call drops the
                raise RuntimeError("failed")  # cache: the waiter wakes and reads again
            wakes += 1
            threading.Event().wait(0.01)
        with pytest.raises(AdmissionTimeout):
            future.result(10)
    assert wakes < 400
    assert reserved(guard) == 60
    spend.finish()


# -- nested and free calls -----------------------------------------------------------------


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
