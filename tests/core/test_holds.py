"""Holds: credits reserved past the call that took them, for paid work that finishes later.
A hold is admitted like a spend, keeps its credits until it is settled (a read after the
work, or the work's report), released (nothing charged: no read) or expires (credits back,
cached balance distrusted); any caller sharing the backend ends it by id."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest

from creditguard import (
    CreditGuard,
    CreditGuardError,
    GuardEvent,
    Hold,
    InsufficientCredits,
    MemoryBackend,
    Precheck,
    UnknownHold,
)
from creditguard.testing import FakeLensmor
from tests.helpers import Gate, NewBackend, reserved, settled

pytestmark = pytest.mark.anyio


def _setup(balance: int = 100, **kwargs: object) -> tuple[FakeLensmor, Gate, CreditGuard]:
    fake = FakeLensmor(subscription_balance=balance, gift_balance=0)
    gate = Gate(fake.transport)
    gate.open()
    guard = CreditGuard(
        fake.api_key,
        transport=gate,
        ttl=60,
        admission_timeout=0,
        **kwargs,  # type: ignore[arg-type]
    )
    return fake, gate, guard


def test_a_hold_keeps_its_credits_until_settled(new_backend: NewBackend) -> None:
    fake, _, guard = _setup(backend=new_backend())
    hold = guard.hold(60)
    assert isinstance(hold, Hold)
    assert isinstance(hold.id, str)
    assert hold.id
    assert hold.cost == 60
    assert hold.balance_before is not None
    assert hold.balance_before.total_balance == 100
    assert hold.expires_at > time.time()
    assert reserved(guard) == 60
    # The work is charged later (a task): its credits stay held meanwhile.
    with pytest.raises(InsufficientCredits) as refused, guard.spend(50):
        pass
    assert refused.value.available == 40
    fake.charge(55)
    after = hold.settle()
    assert after is not None
    assert after.total_balance == 45
    assert hold.balance_after == after
    assert reserved(guard) == 0
    with guard.spend(45) as spend:
        assert spend.balance_before is not None
        assert spend.balance_before.total_balance == 45


def test_settling_reads_a_balance_that_includes_the_work(new_backend: NewBackend) -> None:
    fake, gate, guard = _setup(backend=new_backend())
    hold = guard.hold(30)
    reads = gate.arrived
    fake.charge(30)
    assert guard.balance().total_balance == 100  # the cache does not know yet
    after = hold.settle()
    assert gate.arrived == reads + 1  # one read, started after settle() was called
    assert after is not None
    assert after.total_balance == 70
    assert guard.balance().total_balance == 70


def test_release_gives_the_credits_back_without_a_read(new_backend: NewBackend) -> None:
    events: list[GuardEvent] = []
    _, gate, guard = _setup(on_event=events.append, backend=new_backend())
    hold = guard.hold(80)
    reads = gate.arrived
    hold.release()
    assert reserved(guard) == 0
    assert gate.arrived == reads
    with guard.spend(100):  # the cached balance is still trusted: no read either
        pass
    assert gate.arrived == reads  # (the block settles later: no read of its own)
    assert [e.kind for e in events][:2] == ["admitted", "released"]


def test_a_hold_left_alone_expires_and_distrusts_the_cache(new_backend: NewBackend) -> None:
    _, gate, guard = _setup(backend=new_backend())
    hold = guard.hold(70, expires_in=0.2)
    assert reserved(guard) == 70
    time.sleep(0.3)  # the hold's life runs out
    reads = gate.arrived
    with guard.spend(100):  # its credits are back ...
        pass
    assert gate.arrived >= reads + 1  # ... and the cached balance was not trusted
    assert settled(guard) == 0
    with pytest.raises(UnknownHold):
        hold.settle()
    with pytest.raises(UnknownHold):
        guard.hold_by_id(hold.id)


def test_hold_by_id_gives_the_same_hold_to_another_thread(new_backend: NewBackend) -> None:
    fake, _, guard = _setup(backend=new_backend())
    hold = guard.hold(40)
    settled: list[int | None] = []

    def worker(hold_id: str) -> None:
        found = guard.hold_by_id(hold_id)
        assert (found.id, found.cost) == (hold.id, 40)
        assert found.balance_before == hold.balance_before
        assert found.expires_at == pytest.approx(hold.expires_at, abs=0.01)
        fake.charge(40)
        after = found.settle()
        settled.append(None if after is None else after.total_balance)

    thread = threading.Thread(target=worker, args=(hold.id,))
    thread.start()
    thread.join()
    assert settled == [60]
    assert reserved(guard) == 0
    with pytest.raises(UnknownHold):  # ended by the worker: nothing to end twice
        hold.settle()
    with pytest.raises(UnknownHold):
        hold.release()


def test_unknown_and_malformed_hold_ids(new_backend: NewBackend) -> None:
    _fake, _, guard = _setup(backend=new_backend())
    with pytest.raises(UnknownHold) as unknown:
        guard.hold_by_id("0" * 24)
    assert unknown.value.hold_id == "0" * 24
    assert isinstance(unknown.value, CreditGuardError)
    with pytest.raises(UnknownHold):
        guard.hold_by_id("no/such:id")
    with pytest.raises(TypeError):
        guard.hold_by_id(42)  # type: ignore[arg-type]
    hold = guard.hold(10)
    other = guard.for_key("lm_other_" + "x" * 24)
    with pytest.raises(UnknownHold):  # a hold is its account's only
        other.hold_by_id(hold.id)
    hold.release()


def test_bad_input_is_refused_before_any_request(new_backend: NewBackend) -> None:
    _, gate, guard = _setup(backend=new_backend())
    with pytest.raises(ValueError, match="expires_in"):
        guard.hold(10, expires_in=0)
    with pytest.raises(ValueError, match="expires_in"):
        guard.hold(10, expires_in=float("inf"))
    with pytest.raises((ValueError, TypeError)):
        guard.hold(-1)
    assert gate.arrived == 0


def test_a_hold_settles_from_the_report_given_to_it(new_backend: NewBackend) -> None:
    _, gate, guard = _setup(backend=new_backend())
    hold = guard.hold(60)
    reads = gate.arrived
    after = hold.settle({"creditsUsed": 45, "balanceAfter": 55})
    assert after is not None
    assert after.total_balance == 55
    assert hold.charged == 45
    assert gate.arrived == reads  # the report stood in for a read
    assert reserved(guard) == 0


def test_the_with_block_is_the_submission(new_backend: NewBackend) -> None:
    fake, _, guard = _setup(backend=new_backend())
    with guard.hold(50) as hold:
        pass  # the paid call that starts the work
    assert reserved(guard) == 50  # the hold outlives its block
    fake.charge(50)
    after = hold.settle()
    assert after is not None
    assert after.total_balance == 50


def test_a_block_that_raises_ends_the_hold_and_keeps_the_error(new_backend: NewBackend) -> None:
    _, gate, guard = _setup(backend=new_backend())
    with pytest.raises(RuntimeError, match="submission failed"), guard.hold(50) as hold:
        raise RuntimeError("submission failed")
    assert reserved(guard) == 0
    with pytest.raises(UnknownHold):
        hold.settle()
    reads = gate.arrived
    guard.balance()  # what it spent is unknown: the cache is distrusted
    assert gate.arrived == reads + 1


def test_a_402_from_the_submission_is_insufficient_credits(new_backend: NewBackend) -> None:
    _, _, guard = _setup(backend=new_backend())
    request = httpx.Request("POST", "https://platform.lensmor.com/external/contacts/unlock")
    response = httpx.Response(
        402, json={"errorKey": "INSUFFICIENT_CREDITS", "message": "no"}, request=request
    )
    with pytest.raises(InsufficientCredits) as refused, guard.hold(50):
        raise httpx.HTTPStatusError("402", request=request, response=response)
    assert isinstance(refused.value.__cause__, httpx.HTTPStatusError)
    assert reserved(guard) == 0


def test_a_hold_is_refused_like_a_spend(new_backend: NewBackend) -> None:
    _, _gate, guard = _setup(backend=new_backend())
    with pytest.raises(InsufficientCredits):
        guard.hold(101)
    assert reserved(guard) == 0
    hold = guard.hold(100)
    with pytest.raises(InsufficientCredits):
        guard.hold(1)
    hold.release()


def test_a_hold_may_cost_what_the_precheck_says(new_backend: NewBackend) -> None:
    _, _, guard = _setup(balance=1000, backend=new_backend())
    cost = Precheck("unlock_contact_emails", {"personnel_ids": ["11", "12", "13"]})
    hold = guard.hold(cost)
    assert hold.cost == 45
    assert reserved(guard) == 45
    hold.release()


async def test_async_holds(new_backend: NewBackend) -> None:
    fake, _gate, guard = _setup(backend=new_backend())
    hold = await guard.ahold(60, expires_in=30)
    assert hold.cost == 60
    assert reserved(guard) == 60
    found = await guard.ahold_by_id(hold.id)
    fake.charge(20)
    after = await found.asettle()
    assert after is not None
    assert after.total_balance == 80
    async with await guard.ahold(30) as second:
        pass
    assert reserved(guard) == 30
    await second.arelease()
    assert reserved(guard) == 0
    with pytest.raises(UnknownHold):
        await second.asettle()
    with pytest.raises(UnknownHold):
        await guard.ahold_by_id(second.id)
    with pytest.raises(ValueError, match="boom"):
        async with await guard.ahold(10):
            raise ValueError("boom")
    assert reserved(guard) == 0


async def test_a_hold_cancelled_while_admitted_leaves_nothing(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    gate = Gate(fake.transport)  # closed: the balance read hangs until cancelled
    guard = CreditGuard(fake.api_key, transport=gate, ttl=60, backend=new_backend())
    with anyio.move_on_after(10) as scope:
        async with anyio.create_task_group() as tg:

            async def take() -> None:
                await guard.ahold(10)

            tg.start_soon(take)
            await gate.await_arrivals(1)
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    gate.open()
    assert reserved(guard) == 0
    hold = await guard.ahold(100)  # everything is there
    await hold.arelease()


def test_a_refusal_beside_an_open_hold_is_decided_at_once(new_backend: NewBackend) -> None:
    """A hold is a commitment that will not settle while a caller waits: a call that only
    fits if the hold charged nothing is refused at once, however long admission may wait
    (before, it waited ten times admission_timeout)."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    # A short TTL: the balance is read again while the caller waits.
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=0.05, admission_timeout=5, backend=new_backend()
    )
    hold = guard.hold(60)
    threading.Event().wait(0.06)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: guard.spend(50).__enter__())
        with pytest.raises(InsufficientCredits) as refused:
            future.result(10)
    assert (refused.value.required, refused.value.available) == (50, 40)
    assert reserved(guard) == 60
    hold.release()


@pytest.mark.usefixtures("new_backend")
@pytest.mark.memory_only  # the memory backend's bound on accounts
def test_an_account_with_an_open_hold_is_never_evicted() -> None:
    """MemoryBackend keeps its max_accounts most recent accounts; an account with an open
    hold pushed out of them is kept aside until it is idle: the hold stays findable by id
    and its credits stay held."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    backend = MemoryBackend(max_accounts=2)
    root = CreditGuard("another-key", transport=fake.transport, ttl=60, backend=backend)
    tenant = root.for_key(fake.api_key)
    hold_id = tenant.hold(60).id
    del tenant
    for i in range(50):  # push it out of the recent accounts
        root.for_key(f"key-{i}")
    gc.collect()
    tenant = root.for_key(fake.api_key)
    with pytest.raises(InsufficientCredits) as refused, tenant.spend(50):
        pytest.fail("must not run")
    assert refused.value.available == 40
    hold = tenant.hold_by_id(hold_id)
    assert hold.cost == 60
    hold.release()
    del tenant, hold, refused
    for i in range(50, 100):  # idle now: it may be forgotten like any other
        root.for_key(f"key-{i}")
    gc.collect()
    assert len(backend) <= 3
