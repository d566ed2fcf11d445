"""A decorated call returns as soon as its action returns: no caller waits for a refresh it
does not look at. Its reservation is held until a read that started after the action
finished comes back, whoever makes that read: a later admission that needs the credits,
``guard.balance()``, or the read after the TTL. A ``with guard.spend()`` block settles
the same way; its ``balance_after`` is read when first asked for (see
tests/guard/test_lazy_blocks.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest

from creditguard import (
    BalanceUnavailable,
    CreditGuard,
    GuardEvent,
    InsufficientCredits,
    RetryPolicy,
)
from creditguard.core.settling import MAX_SETTLING
from creditguard.testing import FakeLensmor
from tests.helpers import Gate, NewBackend, reserved, waiting_for_release

pytestmark = pytest.mark.anyio


@pytest.fixture
def guard(fake: FakeLensmor, new_backend: NewBackend) -> Iterator[CreditGuard]:
    """The conftest's ``guard``, on the backend the test runs on."""
    with CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend()) as g:
        yield g


def test_a_decorated_call_returns_without_a_refresh(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    gate = Gate(fake.transport)
    guard = CreditGuard(fake.api_key, transport=gate, ttl=60, backend=new_backend())
    gate.open()
    assert guard.balance().total_balance == 100
    gate.close_gate()  # from now on a balance read would hang until the test opens it

    @guard.requires_credits(10)
    def unlock() -> str:
        fake.charge(10)
        return "done"

    assert unlock() == "done"
    assert unlock() == "done"
    assert gate.arrived == 1  # only the first read
    assert reserved(guard) == 20  # held until a read includes the two spends
    gate.open()
    assert guard.balance().total_balance == 80  # this read settles them
    assert reserved(guard) == 0
    assert gate.arrived == 2


async def test_an_async_decorated_call_returns_without_a_refresh(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    gate = Gate(fake.transport)
    guard = CreditGuard(fake.api_key, transport=gate, ttl=60, backend=new_backend())
    gate.open()
    assert (await guard.abalance()).total_balance == 100
    gate.close_gate()

    @guard.requires_credits(10)
    async def unlock() -> str:
        fake.charge(10)
        await anyio.lowlevel.checkpoint()
        return "done"

    with anyio.fail_after(5):
        assert await unlock() == "done"
        assert await unlock() == "done"
    assert gate.arrived == 1
    assert reserved(guard) == 20
    gate.open()
    assert (await guard.abalance()).total_balance == 80
    assert reserved(guard) == 0
    await guard.aclose()


def test_sequential_calls_read_once_per_ttl(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())

    @guard.requires_credits(50)
    def search() -> None:
        fake.charge(50)

    for _ in range(100):
        search()
    assert fake.balance_requests == 1
    assert guard.balance().total_balance == fake.balance.total_balance
    assert fake.balance_requests == 2
    assert reserved(guard) == 0


def test_a_call_that_does_not_fit_reads_to_settle_finished_calls(new_backend: NewBackend) -> None:
    """The finished call was declared at 60 but charged nothing: the next 60-credit call
    must not be refused on the 60 still reserved; it reads, and the read settles it."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=60, admission_timeout=0, backend=new_backend()
    )

    @guard.requires_credits(60)
    def maybe_unlock(charge: bool) -> None:
        if charge:
            fake.charge(60)

    maybe_unlock(False)
    assert fake.balance_requests == 1
    maybe_unlock(True)  # admitted: 100 - 60 reserved does not cover it, the read does
    assert fake.balance_requests == 2
    with pytest.raises(InsufficientCredits) as info:
        maybe_unlock(True)  # reads again to settle the last call: 40 left
    assert (info.value.available, info.value.reserved) == (40, 0)
    assert fake.balance_requests == 3
    assert fake.balance.total_balance == 40


def test_a_blocks_balance_after_is_read_when_asked_for(
    guard: CreditGuard, fake: FakeLensmor
) -> None:
    before = fake.balance.total_balance
    with guard.spend(5) as spend:
        fake.charge(5)
    assert reserved(guard) == 5  # settled later, like a decorated call
    assert spend.balance_after is not None  # the read that settles it
    assert spend.balance_after.total_balance == before - 5
    assert reserved(guard) == 0


def test_the_spent_event_of_a_deferred_call_has_no_balance_after(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    events: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=events.append, backend=new_backend()
    )

    @guard.requires_credits(15)
    def unlock() -> None:
        fake.charge(15)

    unlock()
    assert [event.kind for event in events] == ["admitted", "spent"]
    assert events[-1].balance_before is not None
    assert events[-1].balance_after is None  # settled later, by the next read
    assert guard.balance().total_balance == events[-1].balance_before.total_balance - 15


def test_a_waiting_call_is_woken_to_settle_a_call_that_finished(new_backend: NewBackend) -> None:
    """A call waits for a spend in flight whose charge the cached balance may include;
    when that spend's decorated call returns (without a refresh), the waiter is woken,
    reads, and is admitted on what is really left."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    charged, finish = threading.Event(), threading.Event()

    @guard.requires_credits(60)
    def slow_unlock() -> None:
        fake.charge(60)
        charged.set()
        assert finish.wait(10)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(slow_unlock)
        assert charged.wait(10)
        guard.invalidate()  # the next read overlaps the spend in flight
        assert guard.balance().total_balance == 40  # includes the 60, still reserved
        second = pool.submit(guard.requires_credits(30)(lambda: fake.charge(30)))
        while waiting_for_release(guard) == 0:
            assert not second.done(), second.exception()
            threading.Event().wait(0.001)
        finish.set()
        first.result(10)
        second.result(10)
    assert fake.balance.total_balance == 10
    assert guard.balance().total_balance == 10
    assert reserved(guard) == 0


@pytest.mark.memory_only  # Redis: expired leases do this job
def test_too_many_finished_calls_waiting_are_released_and_the_cache_distrusted(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())

    @guard.requires_credits(1)
    def call() -> None:
        fake.charge(1)

    for _ in range(MAX_SETTLING):
        call()
    assert reserved(guard) == MAX_SETTLING
    assert fake.balance_requests == 1
    call()  # one too many: all released, and the cached balance is no longer trusted
    assert reserved(guard) == 0
    assert guard._account.snapshot()[0] is None
    call()
    assert fake.balance_requests == 2  # read anew, and that read includes every spend
    assert guard.balance().total_balance == fake.balance.total_balance


def test_a_failed_read_keeps_finished_calls_reserved_until_one_succeeds(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        ttl=60,
        admission_timeout=0,
        retry=RetryPolicy(attempts=1),
        backend=new_backend(),
    )

    @guard.requires_credits(40)
    def unlock() -> None:
        fake.charge(40)

    unlock()
    unlock()
    assert reserved(guard) == 80
    fake.fail_next(503)
    with pytest.raises(BalanceUnavailable):
        unlock()  # 100 - 80 does not cover 40: it must read, and the read fails
    assert reserved(guard) == 80  # still held: nothing has shown the two spends yet
    with pytest.raises(InsufficientCredits) as info:
        unlock()  # this read succeeds and settles them: 20 left
    assert (info.value.available, info.value.reserved) == (20, 0)
    assert fake.charges == 2


def test_a_block_is_admitted_like_a_decorated_call(new_backend: NewBackend) -> None:
    """A block is admitted on the fresh cached balance (no read to settle the calls that
    returned before it); its balance after includes them and its own charge."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=20)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())

    @guard.requires_credits(50)
    def unlock() -> None:
        fake.charge(50)

    unlock()
    with guard.spend(40) as spend:
        fake.charge(40)
    assert fake.balance_requests == 1  # admission of the first call only
    assert spend.balance_before is not None
    assert spend.balance_before.total_balance == 120  # the cached balance
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == 30
    assert reserved(guard) == 0
    assert fake.balance_requests == 2  # the read balance_after asked for


async def test_an_async_block_is_admitted_like_a_decorated_call(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=20)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())

    @guard.requires_credits(50)
    async def unlock() -> None:
        fake.charge(50)

    await unlock()
    async with guard.spend(40) as spend:
        fake.charge(40)
    assert fake.balance_requests == 1
    assert spend.balance_before is not None
    assert spend.balance_before.total_balance == 120
    after = await spend.abalance_after()
    assert after is not None
    assert after.total_balance == 30
    assert reserved(guard) == 0
    await guard.aclose()


@pytest.mark.memory_only  # Redis: its lease renewer stops at RedisBackend.close()
def test_nothing_is_left_running_after_close(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    threads = threading.active_count()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())

    @guard.requires_credits(5)
    def call() -> None:
        fake.charge(5)

    for _ in range(10):
        call()
    guard.close()
    assert threading.active_count() == threads  # no refresh runs in the background
