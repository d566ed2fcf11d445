"""A ``with guard.spend()`` block settles like a decorated call: it exits without a
balance read, and its ``balance_after`` is read when first asked for (the sync property,
or ``await s.abalance_after()``), from a read that started after its action finished.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import pytest

from creditguard import CreditGuard, GuardEvent, RetryPolicy
from creditguard.testing import FakeLensmor
from tests.helpers import AsyncOnly, NewBackend, reserved

pytestmark = pytest.mark.anyio

BLOCKS = 200


def _charge_and_raise(fake: FakeLensmor, credits: int) -> None:
    fake.charge(credits)
    raise RuntimeError("boom")


@pytest.fixture
def guard(fake: FakeLensmor, new_backend: NewBackend) -> Iterator[CreditGuard]:
    with CreditGuard(fake.api_key, transport=fake.transport, ttl=5, backend=new_backend()) as g:
        yield g


def test_sequential_blocks_make_no_read_of_their_own(guard: CreditGuard, fake: FakeLensmor) -> None:
    for _ in range(BLOCKS):
        with guard.spend(1):
            fake.charge(1)
    assert fake.balance_requests / BLOCKS <= 0.05
    assert guard.balance().total_balance == fake.balance.total_balance  # settles them all
    assert reserved(guard) == 0


async def test_sequential_async_blocks_make_no_read_of_their_own(
    guard: CreditGuard, fake: FakeLensmor
) -> None:
    for _ in range(BLOCKS):
        async with guard.spend(1):
            fake.charge(1)
            await anyio.lowlevel.checkpoint()
    assert fake.balance_requests / BLOCKS <= 0.05
    assert (await guard.abalance()).total_balance == fake.balance.total_balance
    assert reserved(guard) == 0
    await guard.aclose()


def test_balance_after_includes_the_blocks_charge(guard: CreditGuard, fake: FakeLensmor) -> None:
    before = fake.balance.total_balance
    with guard.spend(7) as spend:
        fake.charge(7)
    reads = fake.balance_requests
    assert "after" not in repr(spend)  # not known yet; repr makes no request
    assert fake.balance_requests == reads
    after = spend.balance_after
    assert after is not None
    assert after.total_balance == before - 7
    assert fake.balance_requests == reads + 1
    assert spend.balance_after is after  # read once, then remembered
    assert fake.balance_requests == reads + 1
    assert f"after={before - 7}" in repr(spend)
    assert reserved(guard) == 0  # that read settled the block


@pytest.mark.memory_only  # Redis numbers a deferred end only when told: it reads anew
def test_balance_after_read_from_the_cache_when_it_already_includes_the_block(
    guard: CreditGuard, fake: FakeLensmor
) -> None:
    with guard.spend(3) as spend:
        fake.charge(3)
    settled = guard.balance()  # a read after the block: it includes the charge
    reads = fake.balance_requests
    assert spend.balance_after == settled
    assert fake.balance_requests == reads


def test_balance_after_a_raised_block_is_none_with_no_read(
    guard: CreditGuard, fake: FakeLensmor
) -> None:
    spend = guard.spend(5)
    with pytest.raises(RuntimeError), spend:
        _charge_and_raise(fake, 5)
    reads = fake.balance_requests
    assert spend.balance_after is None
    assert "after=None" in repr(spend)
    assert fake.balance_requests == reads


def test_a_failed_read_makes_balance_after_none(
    fake: FakeLensmor, new_backend: NewBackend, caplog: pytest.LogCaptureFixture
) -> None:
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        ttl=60,
        retry=RetryPolicy(attempts=1),
        backend=new_backend(),
    )
    before = guard.balance().total_balance
    with guard.spend(5) as spend:
        fake.charge(5)
    fake.fail_next(503)
    with caplog.at_level(logging.WARNING, logger="creditguard"):
        assert spend.balance_after is None
    assert "balance read after it failed" in caplog.text
    assert spend.balance_after is None  # remembered: no second try
    assert reserved(guard) == 5  # still held until a read includes it
    assert guard.balance().total_balance == before - 5
    assert reserved(guard) == 0
    guard.close()


def test_the_first_of_two_blocks_sees_at_least_its_own_charge(
    guard: CreditGuard, fake: FakeLensmor
) -> None:
    before = fake.balance.total_balance
    with guard.spend(4) as first:
        fake.charge(4)
    with guard.spend(6) as second:
        fake.charge(6)
    after_first = first.balance_after
    assert after_first is not None
    assert after_first.total_balance <= before - 4
    assert second.balance_after is not None
    assert second.balance_after.total_balance == before - 10


async def test_abalance_after_reads_with_the_async_client(
    guard: CreditGuard, fake: FakeLensmor
) -> None:
    before = (await guard.abalance()).total_balance
    async with guard.spend(9) as spend:
        fake.charge(9)
    reads = fake.balance_requests
    after = await spend.abalance_after()
    assert after is not None
    assert after.total_balance == before - 9
    assert fake.balance_requests == reads + 1
    assert await spend.abalance_after() is after
    assert spend.balance_after is after
    assert fake.balance_requests == reads + 1
    await guard.aclose()


async def test_the_sync_property_works_after_an_async_block(
    guard: CreditGuard, fake: FakeLensmor
) -> None:
    before = (await guard.abalance()).total_balance
    async with guard.spend(2) as spend:
        fake.charge(2)
    after = spend.balance_after  # a sync read from the loop's thread
    assert after is not None
    assert after.total_balance == before - 2
    assert reserved(guard) == 0
    await guard.aclose()


async def test_abalance_after_a_raised_block_is_none(guard: CreditGuard, fake: FakeLensmor) -> None:
    spend = guard.spend(5)
    with pytest.raises(RuntimeError):
        async with spend:
            _charge_and_raise(fake, 5)
    reads = fake.balance_requests
    assert await spend.abalance_after() is None
    assert fake.balance_requests == reads
    await guard.aclose()


def test_the_spent_event_of_a_block_has_no_balance_after(fake: FakeLensmor) -> None:
    events: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=events.append)
    with guard.spend(15) as spend:
        fake.charge(15)
    assert [event.kind for event in events] == ["admitted", "spent"]
    assert events[-1].balance_after is None  # settled later
    assert spend.balance_after is not None
    assert [event.kind for event in events] == ["admitted", "spent"]  # a read, no event
    guard.close()


async def test_an_async_block_over_an_async_only_transport_reads_at_exit(
    fake: FakeLensmor,
) -> None:
    """No sync read can be made over it, so the property could not read later: such a
    block settles at exit, with its balance after, as blocks always did."""
    guard = CreditGuard(fake.api_key, transport=AsyncOnly(fake.transport), ttl=60)
    before = (await guard.abalance()).total_balance
    async with guard.spend(3) as spend:
        fake.charge(3)
    assert reserved(guard) == 0
    reads = fake.balance_requests
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == before - 3
    assert await spend.abalance_after() is spend.balance_after
    assert fake.balance_requests == reads
    await guard.aclose()
