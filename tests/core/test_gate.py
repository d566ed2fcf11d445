"""The per-account gate (``max_concurrent``): at most N guarded actions of one account in
flight; further callers wait their turn in order, for at most ``gate_timeout``, then get
``GateTimeout``. Waiting holds no reservation and never blocks the event loop; giving up
(timeout, cancellation) leaves no place in the queue."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.to_thread
import httpx
import pytest

from creditguard import CreditGuard, CreditGuardError, GateTimeout, InsufficientCredits
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend, reserved, settled

pytestmark = pytest.mark.anyio

SEARCH = "/external/exhibitors/search-by-company-name"


def _search(client: httpx.Client) -> httpx.Response:
    return client.post(SEARCH, json={"company_name": "Acme"})


def _guard(fake: FakeLensmor, **kwargs: object) -> CreditGuard:
    return CreditGuard(fake.api_key, transport=fake.transport, ttl=60, **kwargs)  # type: ignore[arg-type]


def _client(fake: FakeLensmor) -> httpx.Client:
    return httpx.Client(
        transport=fake.transport,
        base_url="https://platform.lensmor.com",
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )


def _overlapping_searches(guard: CreditGuard, fake: FakeLensmor, n: int) -> list[int]:
    """``n`` threads each make a guarded exhibitor search while the sandbox holds paid
    calls open (each one holds the key's credit operation until the block ends, so any
    two that are sent together overlap). The statuses Lensmor answered."""
    client = _client(fake)
    statuses: list[int] = []
    lock = threading.Lock()
    started = threading.Barrier(n + 1)

    def call() -> None:
        started.wait()
        with guard.spend(50):
            response = _search(client)
        with lock:
            statuses.append(response.status_code)

    with ThreadPoolExecutor(n) as pool:
        with fake.hold_paid_calls():
            futures = [pool.submit(call) for _ in range(n)]
            started.wait()
            assert fake.wait_for_paid_call()
            # Every other caller has either sent its search (and met the 409) or is
            # queued at the gate; the held call is still in progress.
            _wait_settled(statuses, lock, guard, n)
        for future in futures:
            future.result()
    return statuses


def _wait_settled(statuses: list[int], lock: threading.Lock, guard: CreditGuard, n: int) -> None:
    """Until every caller but the one in flight has answered or is queued."""
    event = threading.Event()
    for _ in range(2000):
        with lock:
            answered = len(statuses)
        if answered + _queued(guard) >= n - 1:
            return
        event.wait(0.005)
    raise AssertionError("the callers neither answered nor queued")


def _queued(guard: CreditGuard) -> int:
    account = guard._account
    gate = getattr(account, "gate", None)
    if gate is not None:
        with account.lock:
            return len(gate.queue)
    return int(account.queued())  # type: ignore[attr-defined]


def test_without_the_gate_overlapping_paid_calls_get_409(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    statuses = _overlapping_searches(_guard(fake, backend=new_backend()), fake, 4)
    assert sorted(statuses) == [201, 409, 409, 409]
    assert fake.charges == 1


def test_max_concurrent_1_sends_paid_calls_one_at_a_time(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=1, backend=new_backend())
    statuses = _overlapping_searches(guard, fake, 4)
    assert statuses == [201] * 4
    assert fake.charges == 4
    assert settled(guard) == 0


def test_turns_are_given_in_the_order_callers_came(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=1, backend=new_backend())
    order: list[int] = []
    guard.balance()
    with ThreadPoolExecutor(5) as pool:
        with guard.spend(1):
            futures = []
            for i in range(5):

                def call(i: int = i) -> None:
                    with guard.spend(1):
                        order.append(i)

                futures.append(pool.submit(call))
                _until(lambda i=i: _queued(guard) == i + 1)
            assert reserved(guard) == 1  # waiting holds no reservation
        for future in futures:
            future.result()
    assert order == [0, 1, 2, 3, 4]


def _until(condition: object, timeout: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.002)):
        if condition():  # type: ignore[operator]
            return
        event.wait(0.002)
    raise AssertionError("condition not reached")


def test_a_caller_that_waits_too_long_gets_gate_timeout_and_leaves_no_trace(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=1, gate_timeout=0.2, backend=new_backend())
    errors: list[BaseException] = []
    with guard.spend(10):

        def call() -> None:
            try:
                with guard.spend(5):
                    pass
            except CreditGuardError as exc:
                errors.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
        assert _queued(guard) == 0
        assert reserved(guard) == 10
    assert len(errors) == 1
    assert isinstance(errors[0], GateTimeout)
    assert isinstance(errors[0], TimeoutError)
    assert errors[0].max_concurrent == 1
    assert errors[0].waited >= 0.2
    with guard.spend(5):  # the turn is free at once
        pass


def test_a_guarded_call_inside_another_shares_its_turn(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=1, gate_timeout=5, backend=new_backend())

    @guard.requires_credits(3)
    def inner() -> str:
        return "inner"

    with guard.spend(10):
        assert inner() == "inner"
        with guard.spend(2):
            pass
    assert settled(guard) == 0


def test_a_hold_has_its_turn_until_its_block_ends_or_it_ends(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=1, gate_timeout=0.1, backend=new_backend())
    with guard.hold(10) as hold, pytest.raises(GateTimeout):
        _other_thread(guard)
    _other_thread(guard)  # the block ended: its turn is back
    hold.release()
    second = guard.hold(10)  # no block: the turn is held until the hold ends
    with pytest.raises(GateTimeout):
        _other_thread(guard)
    second.settle()
    _other_thread(guard)


def _other_thread(guard: CreditGuard) -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with guard.spend(1):
                pass
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_bad_max_concurrent(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_concurrent"):
            _guard(fake, max_concurrent=bad, backend=new_backend())
    with pytest.raises(ValueError, match="gate_timeout"):
        _guard(fake, max_concurrent=1, gate_timeout=-1, backend=new_backend())
    assert _guard(fake, max_concurrent=3, backend=new_backend()).max_concurrent == 3
    assert _guard(fake, backend=new_backend()).max_concurrent is None


async def test_tasks_wait_their_turn_without_blocking_the_loop(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=2, backend=new_backend())
    in_flight = 0
    most = 0
    done = 0
    ticks = 0
    entered = 0
    two_in = anyio.Event()

    async def call() -> None:
        nonlocal in_flight, most, done, entered
        async with guard.spend(1):
            in_flight += 1
            entered += 1
            most = max(most, in_flight)
            if in_flight == 2:
                two_in.set()
            if entered <= 2:  # the first two stay until both are in: two turns at once
                with anyio.fail_after(10):
                    await two_in.wait()
            await anyio.lowlevel.checkpoint()
            in_flight -= 1
        done += 1

    async def ticker() -> None:  # runs while callers wait: the loop is not blocked
        nonlocal ticks
        while done < 10:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        for _ in range(10):
            tg.start_soon(call)
    assert most == 2
    assert done == 10
    assert ticks > 0
    assert settled(guard) == 0


async def test_a_task_cancelled_while_waiting_leaves_no_trace(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=1, backend=new_backend())
    async with guard.spend(10):
        with anyio.move_on_after(10):
            async with anyio.create_task_group() as tg:

                async def waiting() -> None:
                    async with guard.spend(5):
                        raise AssertionError("never gets a turn here")

                tg.start_soon(waiting)
                await _aqueued(guard, 1)
                tg.cancel_scope.cancel()
        assert _queued(guard) == 0
        assert reserved(guard) == 10
    async with guard.spend(5):  # nobody stands in the queue
        pass


async def _aqueued(guard: CreditGuard, n: int) -> None:
    for _ in range(5000):  # what is queued may be in Redis: looked at, not awaited
        if _queued(guard) >= n:
            return
        await anyio.sleep(0.002)
    raise AssertionError(f"fewer than {n} callers queued")


async def test_a_thread_hands_its_turn_to_a_task(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = _guard(fake, max_concurrent=1, backend=new_backend())
    entered = threading.Event()
    leave = threading.Event()

    def thread_call() -> None:
        with guard.spend(1):
            entered.set()
            leave.wait(10)

    got_turn = anyio.Event()

    async def task_call() -> None:
        async with guard.spend(1):
            got_turn.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, thread_call)
        await anyio.to_thread.run_sync(entered.wait, 10)
        tg.start_soon(task_call)
        await _aqueued(guard, 1)
        assert not got_turn.is_set()
        leave.set()
        with anyio.fail_after(10):
            await got_turn.wait()
    assert settled(guard) == 0


def test_a_call_the_account_cannot_pay_is_refused_before_it_queues(new_backend: NewBackend) -> None:
    """One guarded call has the only turn; a call the balance cannot pay even if the
    call in flight charges nothing is refused at once, not after waiting for a turn it
    would only be refused in."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = _guard(fake, max_concurrent=1, gate_timeout=60, backend=new_backend())
    inside = threading.Event()
    leave = threading.Event()

    def holder() -> None:
        with guard.spend(10):
            inside.set()
            assert leave.wait(10)

    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(holder)
        assert inside.wait(10)
        refused = pool.submit(lambda: guard.spend(101).__enter__())
        with pytest.raises(InsufficientCredits) as info:
            refused.result(10)
        assert (info.value.required, info.value.available) == (101, 100)
        leave.set()
        held.result(10)
    assert settled(guard) == 0
