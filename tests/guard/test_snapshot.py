"""``guard.snapshot()`` / ``asnapshot()``: what the guard holds for one account, the same
on both backends (over Redis, across every process), with no request to Lensmor."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest

from creditguard import AccountSnapshot, CreditGuard, OpenHold
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend

pytestmark = pytest.mark.anyio


def _guard(fake: FakeLensmor, **kwargs: object) -> CreditGuard:
    return CreditGuard(fake.api_key, transport=fake.transport, ttl=60, **kwargs)  # type: ignore[arg-type]


def test_a_fresh_account_holds_nothing(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    snap = guard.snapshot()
    assert isinstance(snap, AccountSnapshot)
    assert snap.balance is None
    assert (snap.reserved, snap.in_flight, snap.held, snap.holds) == (0, 0, 0, 0)
    assert (snap.settling, snap.gate_waiting, snap.open_holds) == (0, 0, ())
    assert snap.backend in ("memory", "redis")
    assert fake.balance_requests == 0  # no request to Lensmor


def test_calls_in_flight_holds_settling_and_the_gate_queue(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = _guard(fake, max_concurrent=1, gate_timeout=10, backend=new_backend())
    hold = guard.hold(30, expires_in=120)
    snap = guard.snapshot()
    assert snap.balance is not None
    assert snap.balance.total_balance == 100
    assert (snap.held, snap.holds) == (30, 1)
    assert snap.open_holds == (OpenHold(hold.id, 30, snap.open_holds[0].expires_at),)
    assert 0 < snap.open_holds[0].expires_at - time.time() <= 120
    hold.release()  # gives its turn back

    inside = threading.Event()
    leave = threading.Event()

    def in_flight() -> None:
        with guard.spend(20):
            inside.set()
            assert leave.wait(10)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(in_flight)
        assert inside.wait(10)
        second = pool.submit(lambda: guard.requires_credits(5)(lambda: None)())
        deadline = time.monotonic() + 10
        while guard.snapshot().gate_waiting == 0:
            assert time.monotonic() < deadline
            threading.Event().wait(0.005)
        snap = guard.snapshot()
        assert (snap.reserved, snap.in_flight, snap.gate_waiting) == (20, 1, 1)
        assert (snap.held, snap.holds) == (0, 0)
        leave.set()
        first.result(10)
        second.result(10)
    snap = guard.snapshot()  # the block and the decorated call returned: they wait for a read
    assert (snap.reserved, snap.in_flight, snap.settling) == (25, 2, 2)
    guard.balance()
    snap = guard.snapshot()
    assert (snap.reserved, snap.in_flight, snap.settling) == (0, 0, 0)


async def test_asnapshot(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = _guard(fake, backend=new_backend())
    inside = anyio.Event()
    leave = anyio.Event()

    spend = guard.spend(40)

    async def in_flight() -> None:
        async with spend:
            inside.set()
            await leave.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(in_flight)
        await inside.wait()
        snap = await guard.asnapshot()
        assert (snap.reserved, snap.in_flight) == (40, 1)
        assert snap.balance is not None
        leave.set()
    snap = await guard.asnapshot()  # the block returned: it waits for a read
    assert (snap.reserved, snap.in_flight, snap.settling) == (40, 1, 1)
    assert await spend.abalance_after() is not None  # that read
    snap = await guard.asnapshot()
    assert (snap.reserved, snap.in_flight, snap.settling) == (0, 0, 0)
