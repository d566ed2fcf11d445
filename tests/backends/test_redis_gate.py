"""The gate's and the holds' scripts (``_redis_gate``) against a real redis-server: turns in
order, leases that expire, waiters that stop looking, holds kept, looked at and ended once."""

from __future__ import annotations

import time

import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from creditguard.backends.redis.gate import RedisGate
from creditguard.backends.redis.scripts import RedisAccountState

pytestmark = pytest.mark.anyio

FP = "acct_0123456789abcdef"


def _gate(client: redis.Redis) -> RedisGate:
    return RedisGate(client, None, "t:", FP)


def _reserve(client: redis.Redis, rid: str, cost: int = 10) -> RedisAccountState:
    """An account with a cached balance of 100 and the reservation ``rid`` of ``cost``."""
    state = RedisAccountState(client, None, "t:", FP, 60_000)
    state.invalidate()
    begun = state.read_begin("tok", 10_000)
    state.read_done("tok", begun.start_seq, '{"totalBalance": 100}', 100)
    admitted = state.admit(rid, cost, 60_000, True, False, [], None)
    assert admitted.__class__.__name__ == "Admitted", admitted
    return state


def test_turns_go_in_order(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    assert gate.enter("a", 1, 60_000, 2_000) == 0
    ticket_b = gate.enter("b", 1, 60_000, 2_000)
    ticket_c = gate.enter("c", 1, 60_000, 2_000)
    assert 0 < ticket_b < ticket_c  # the lower ticket is next
    assert gate.enter("c", 1, 60_000, 2_000) == ticket_c  # its place is kept
    assert gate.queued() == 2
    assert gate.enter("c", 1, 60_000, 2_000) > 0  # c asks first, but b came first
    gate.leave("a")
    assert gate.enter("c", 1, 60_000, 2_000) > 0
    assert gate.enter("b", 1, 60_000, 2_000) == 0
    assert gate.enter("b", 1, 60_000, 2_000) == 0  # asking again: still its turn
    gate.leave("b")
    assert gate.enter("c", 1, 60_000, 2_000) == 0
    assert gate.queued() == 0


def test_several_turns_at_once(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    assert [gate.enter(t, 2, 60_000, 2_000) == 0 for t in "abc"] == [True, True, False]
    gate.leave("c")  # gave up waiting: leaves the queue
    assert gate.queued() == 0
    gate.leave("a")
    assert gate.enter("d", 2, 60_000, 2_000) == 0


def test_a_turn_whose_process_died_expires(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    assert gate.enter("dead", 1, 50, 2_000) == 0  # never renewed, never given back
    assert gate.enter("next", 1, 60_000, 2_000) > 0
    time.sleep(0.1)
    assert gate.enter("next", 1, 60_000, 2_000) == 0


def test_renewed_turns_stay(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    assert gate.enter("live", 1, 100, 2_000) == 0
    for _ in range(3):
        time.sleep(0.05)
        gate.renew_turns(["live"], 100)
    assert gate.enter("next", 1, 60_000, 2_000) > 0


def test_a_waiter_that_stopped_looking_leaves_the_queue(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    assert gate.enter("a", 1, 60_000, 2_000) == 0
    assert gate.enter("gone", 1, 60_000, 50) > 0  # its process dies
    assert gate.enter("b", 1, 60_000, 2_000) > 0
    gate.leave("a")
    time.sleep(0.1)
    assert gate.enter("b", 1, 60_000, 2_000) == 0  # not stuck behind the dead waiter
    assert gate.queued() == 0


def test_a_hold_is_kept_looked_at_and_ended_once(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    _reserve(redis_client, "r1", 30)
    assert gate.enter("turn1", 1, 60_000, 2_000) == 0
    due = gate.keep("r1", 10_000, 30, 4, "BAL", "turn1")
    assert due is not None
    assert abs(due / 1000 - time.time() - 10) < 2
    info = gate.hold("r1", False, 60_000)
    assert info is not None
    assert (info.cost, info.gen, info.balance) == (30, 4, "BAL")
    assert info.expires_ms == due
    assert gate.enter("other", 1, 60_000, 2_000) > 0  # the hold has the turn
    claimed = gate.hold("r1", True, 60_000)
    assert claimed == info
    assert gate.hold("r1", True, 60_000) is None  # ended: nobody gets it twice
    assert gate.hold("r1", False, 60_000) is None
    assert gate.enter("other", 1, 60_000, 2_000) == 0  # its turn came back with it


def test_an_expired_hold_is_unknown_and_its_turn_is_free(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    state = _reserve(redis_client, "r2", 30)
    assert gate.enter("turn2", 1, 60_000, 2_000) == 0
    assert gate.keep("r2", 50, 30, 0, "", "turn2") is not None
    time.sleep(0.1)
    assert gate.hold("r2", False, 60_000) is None
    assert gate.enter("next", 1, 60_000, 2_000) == 0
    snap = state.state()  # the expired lease is swept: credits back, cache distrusted
    assert snap.reserved == 0
    assert snap.balance is None


def test_keeping_a_reservation_that_is_gone(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    assert gate.keep("nope", 10_000, 5, 0, "", "") is None
    with pytest.raises(ValueError, match="hold_id"):
        gate.hold("bad:id", False, 1000)


def test_every_key_is_in_the_account_slot(redis_client: redis.Redis) -> None:
    gate = _gate(redis_client)
    _reserve(redis_client, "r3")
    gate.enter("a", 1, 60_000, 2_000)
    gate.enter("b", 1, 60_000, 2_000)
    gate.keep("r3", 10_000, 10, 0, "", "")
    keys = redis_client.keys("t:*")
    assert any(b"hold:" in k for k in keys)
    assert any(b":queue" in k for k in keys)
    assert len({key_slot(k) for k in keys}) == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio is asyncio's
async def test_async_twins(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    sync = redis.Redis.from_url(redis_url)
    try:
        sync.flushdb()
        gate = RedisGate(None, client, "t:", FP)
        _reserve(sync, "r4")
        assert await gate.aenter("a", 1, 60_000, 2_000) == 0
        assert await gate.aenter("b", 1, 60_000, 2_000) > 0
        await gate.aleave("a")
        assert await gate.aenter("b", 1, 60_000, 2_000) == 0
        assert await gate.akeep("r4", 10_000, 10, 0, "", "b") is not None
        assert (await gate.ahold("r4", True, 60_000)) is not None
        assert (await gate.ahold("r4", True, 60_000)) is None
    finally:
        await client.aclose()
        sync.close()
