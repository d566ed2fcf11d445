"""The Redis account state (creditguard.backends.redis.scripts) against a real redis-server.

Every rule of the in-memory ``Account`` that the scripts mirror, the leases, the key
layout (one cluster slot per account, no API key text anywhere), processes racing for
the last credits, the async twins, and a random walk over the operations with a model of
the upstream balance.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from creditguard.backends.redis.gate import RedisGate
from creditguard.backends.redis.scripts import (
    DEFAULT_PREFIX,
    SCRIPTS,
    SHAS,
    Admitted,
    Busy,
    ReadBegun,
    ReadNeeded,
    RedisAccountState,
    Refused,
    WaitNeeded,
    decode_balance,
    encode_balance,
)
from creditguard.core.checks import _fingerprint
from creditguard.core.models import CreditBalance
from creditguard.testing._redis_server import RedisServer
from tests.strategies import FUZZ

API_KEY = "sk_live_THIS-KEY-TEXT-MUST-NEVER-REACH-REDIS"
BASE_URL = "https://api.lensmor.com"
FP = _fingerprint(BASE_URL, API_KEY)
TTL = 60_000  # ms: the cache stays fresh for the whole test
BUDGET = 60_000  # ms: a read's flight outlives the test
_ids = itertools.count()


def new_id(prefix: str = "r") -> str:
    return f"{prefix}{next(_ids)}"


def balance(total: int) -> CreditBalance:
    return CreditBalance(
        total_amount=total + 100,
        total_balance=total,
        subscription_amount=100,
        subscription_balance=total,
        gift_amount=0,
        gift_balance=0,
    )


def bjson(total: int) -> str:
    return encode_balance(balance(total))[0]


def store(acct: RedisAccountState, total: int) -> int:
    """Read a balance of ``total`` (leading the flight) and store it; its start seq."""
    token = new_id("tok")
    begun = acct.read_begin(token, BUDGET)
    assert begun.lead
    acct.read_done(token, begun.start_seq, bjson(total), total)
    return begun.start_seq


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def raw_hash(client: redis.Redis, key: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in client.hgetall(key).items()}


def records(client: redis.Redis, acct: RedisAccountState) -> dict[str, tuple[int, int, int]]:
    """The reservations: id -> (cost, gen, after)."""
    out = {}
    for rid, rec in raw_hash(client, acct.keys[1]).items():
        cost, gen, after = (int(x) for x in rec.split(":"))
        out[rid] = (cost, gen, after)
    return out


def dump(client: redis.Redis) -> dict[str, object]:
    """Every key of the database with its value."""
    out: dict[str, object] = {}
    for key in client.scan_iter():
        kind = text(client.type(key))
        if kind == "hash":
            out[text(key)] = client.hgetall(key)
        elif kind == "zset":
            out[text(key)] = client.zrange(key, 0, -1, withscores=True)
        else:
            out[text(key)] = client.get(key)
    return out


def tag(client: redis.Redis, acct: RedisAccountState) -> str:
    """The tag of the cached balance (``cache_id:cache_gen``), as admissions name it."""
    raw = raw_hash(client, acct.keys[0])
    return f"{raw['cache_id']}:{raw['cache_gen']}"


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def poll(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds, polling; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def acct(redis_client: redis.Redis) -> RedisAccountState:
    return RedisAccountState(redis_client, None, DEFAULT_PREFIX, FP)


def ok(result: object) -> Admitted:
    assert isinstance(result, Admitted), result
    return result


# -- keys --------------------------------------------------------------------------------


def test_keys_share_one_cluster_slot(acct: RedisAccountState, redis_client: redis.Redis) -> None:
    assert acct.keys == tuple(
        f"creditguard:{{{FP}}}:{n}" for n in ("state", "res", "lease", "flight")
    )
    store(acct, 10)
    acct.read_begin("t", BUDGET)
    ok(acct.admit("a", 1, TTL, True, True))
    assert set(dump(redis_client)) == set(acct.keys)
    assert len({key_slot(k.encode()) for k in acct.keys}) == 1
    other = RedisAccountState(redis_client, None, "p:", _fingerprint(BASE_URL, "k2"))
    assert len({key_slot(k.encode()) for k in other.keys}) == 1


def test_no_key_text_in_redis(redis_client: redis.Redis) -> None:
    accounts = [
        RedisAccountState(redis_client, None, DEFAULT_PREFIX, _fingerprint(BASE_URL, key))
        for key in (API_KEY, API_KEY + "-2")
    ]
    for acct in accounts:
        store(acct, 20)
        ok(acct.admit("a", 3, TTL, True, True))
        ok(acct.admit("b", 4, TTL, True, True))
        acct.finish("a")
        acct.read_begin("tok", BUDGET)
        acct.block(1000)
        acct.settle_alone("b", 0, bjson(1), 1)
    text = repr(dump(redis_client))
    assert FP in text
    for secret in (API_KEY, "THIS-KEY-TEXT", API_KEY.encode().hex()):
        assert secret not in text


def test_fingerprint_checked(redis_client: redis.Redis) -> None:
    for bad in ("", "a{b", "a}b"):
        with pytest.raises(ValueError, match="fingerprint"):
            RedisAccountState(redis_client, None, DEFAULT_PREFIX, bad)
    with pytest.raises(ValueError, match="lease_ms"):
        RedisAccountState(redis_client, None, DEFAULT_PREFIX, FP, 0)
    no_sync = RedisAccountState(None, None, DEFAULT_PREFIX, FP)
    with pytest.raises(RuntimeError, match="no sync client"):
        no_sync.state()


def test_balance_json_round_trip() -> None:
    for b in (
        balance(7),
        CreditBalance.from_api(
            {**balance(3).to_api(), "addonAmount": 5, "addonBalance": 1, "addonExpireAt": None}
        ),
    ):
        text, total = encode_balance(b)
        assert total == b.total_balance
        assert decode_balance(text) == b
        assert decode_balance(text).to_api() == b.to_api()


# -- admission ---------------------------------------------------------------------------


def test_admit_needs_a_read_without_a_balance(acct: RedisAccountState) -> None:
    assert acct.admit("a", 1, TTL, True, True) == ("read", 0)
    assert acct.admit("a", 0, TTL, True, True) == ReadNeeded("read", 0)  # free calls too
    acct.invalidate()
    assert acct.admit("a", 1, TTL, True, True) == ("read", 1)
    assert acct.state().inflight == 0


def test_admit_records_the_reservation(acct: RedisAccountState, redis_client: redis.Redis) -> None:
    store(acct, 10)
    before = server_ms(redis_client)
    result = ok(acct.admit("a", 4, TTL, True, True))
    assert result == ("ok", bjson(10), 1, tag(redis_client, acct))
    assert decode_balance(result.balance) == balance(10)
    assert records(redis_client, acct) == {"a": (4, 1, 0)}
    expiry = redis_client.zscore(acct.keys[2], "a")
    assert expiry is not None
    assert before + acct.lease_ms <= expiry <= server_ms(redis_client) + acct.lease_ms
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.settling) == (4, 1, 0)
    ok(acct.admit("b", 6, TTL, True, True))  # exactly what is left
    assert acct.state().reserved == 10
    with pytest.raises(redis.ResponseError, match="already in use"):
        acct.admit("b", 0, TTL, True, True)


def test_admit_answers_a_known_balance_with_its_generation(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    store(acct, 10)
    first = ok(acct.admit("a", 1, TTL, True, True))
    assert first == ("ok", bjson(10), 1, tag(redis_client, acct))
    assert first.tag.endswith(":1")
    # the caller names it: the answer leaves it out
    assert acct.admit("b", 1, TTL, True, True, known=first.tag) == ("ok", None, 1, first.tag)
    # another tag, or none: sent again
    assert acct.admit("c", 1, TTL, True, True, known="other:1") == first
    # a new read is a new balance, with a new tag, whatever the caller knew
    store(acct, 9)
    second = ok(acct.admit("d", 1, TTL, True, True, known=first.tag))
    assert second == ("ok", bjson(9), 2, tag(redis_client, acct))
    assert second.tag != first.tag
    # a balance a call reported is named by its reservation id
    for rid in "abcd":
        acct.release(rid)
    gen = ok(acct.admit("e", 2, TTL, True, True, known=second.tag)).gen
    assert acct.settle_alone("e", gen, bjson(7), 7)
    third = ok(acct.admit("f", 1, TTL, True, True, known=second.tag))
    assert third == ("ok", bjson(7), 3, "e:3")
    # refusals and reads do not depend on it
    assert acct.admit("g", 8, TTL, True, True, known="e:3") == ("refuse", 7, 1, bjson(7))
    acct.invalidate()
    assert acct.admit("g", 1, TTL, True, True, known="e:3") == ("read", acct.state().floor)
    assert "cache_id" not in raw_hash(redis_client, acct.keys[0])


def test_a_known_balance_is_sent_again_once_redis_lost_it(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    store(acct, 10)
    known = ok(acct.admit("a", 1, TTL, True, True)).tag
    redis_client.flushdb()  # a restart without persistence: the generations start over
    store(acct, 3)
    again = ok(acct.admit("a", 1, TTL, True, True, known=known))
    assert (again.balance, again.gen) == (bjson(3), 1)
    assert again.tag != known


def test_a_balance_changed_without_a_name_is_sent_again(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    """A writer that does not name the balances it stores (an older version of these
    scripts, during a rolling deploy) still moves the generation: the tag changes."""
    store(acct, 10)
    known = ok(acct.admit("a", 1, TTL, True, True)).tag
    redis_client.hset(acct.keys[0], mapping={"cached": bjson(8), "cached_total": 8})
    redis_client.hincrby(acct.keys[0], "cache_gen", 1)
    again = ok(acct.admit("b", 1, TTL, True, True, known=known))
    assert (again.balance, again.gen) == (bjson(8), 2)
    assert again.tag != known
    redis_client.hdel(acct.keys[0], "cache_id")  # unnamed: never answered without it
    unnamed = ok(acct.admit("c", 1, TTL, True, True, known=again.tag))
    assert unnamed == ("ok", bjson(8), 2, "")
    assert ok(acct.admit("d", 1, TTL, True, True, known=":2")) == ("ok", bjson(8), 2, "")


def test_ids_and_tokens_have_no_whitespace(acct: RedisAccountState) -> None:
    store(acct, 10)
    for bad in ("", "a b", "a\tb", " a", "a\n", 1):
        with pytest.raises(ValueError, match="without whitespace"):
            acct.admit(bad, 1, TTL, True, True)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="without whitespace"):
            acct.read_begin(bad, BUDGET)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="without whitespace"):
            acct.finish(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without whitespace"):
        acct.admit("a", 1, TTL, True, True, known="k k")
    with pytest.raises(ValueError, match="without whitespace"):
        acct.admit("a", 1, TTL, True, True, own_ids=["o o"])
    with pytest.raises(TypeError, match="own_ids"):
        acct.admit("a", 1, TTL, True, True, own_ids="ab")
    assert acct.state().inflight == 0


def test_a_free_call_is_admitted_whatever_is_reserved(acct: RedisAccountState) -> None:
    store(acct, 5)
    ok(acct.admit("a", 5, TTL, True, True))
    assert ok(acct.admit("free", 0, TTL, False, False)).gen == 1
    assert acct.state().inflight == 2


def test_admit_on_a_stale_balance_needs_a_read(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    start = store(acct, 10)
    assert acct.admit("a", 1, 0, True, True) == ("read", 0)  # ttl 0: always stale
    # ... unless the caller just waited for a read that started at or after it
    ok(acct.admit("a", 1, 0, True, True, waited_for=start))
    assert acct.admit("b", 1, 0, True, True, waited_for=start + 1) == ("read", 0)
    time.sleep(0.01)
    assert acct.admit("b", 1, 5, True, True) == ("read", 0)  # older than 5 ms
    assert acct.state().age_ms is not None
    ok(acct.admit("b", 1, TTL, True, True))


def test_admit_distrusts_a_balance_read_before_floor(acct: RedisAccountState) -> None:
    store(acct, 10)
    ok(acct.admit("a", 1, TTL, True, True))
    after = acct.finish("a")
    assert acct.release("a")  # released without a read: no older read may be trusted
    snap = acct.state()
    assert snap.balance is not None
    assert snap.cached_seq < snap.floor == after
    assert acct.admit("b", 1, TTL, True, True) == ("read", after)


def test_admit_settles_finished_spends_first(acct: RedisAccountState) -> None:
    store(acct, 10)
    ok(acct.admit("a", 4, TTL, True, True))
    ok(acct.admit("b", 4, TTL, True, True))
    first = acct.finish("a")
    second = acct.finish("b")
    assert second == first + 1
    assert acct.admit("c", 4, TTL, True, True) == ("read", second)  # the newest of them
    # without settle: only calls in flight stand in the way: wait, or busy
    assert acct.admit("c", 4, TTL, False, True) == ("wait", 0, 0)
    assert acct.admit("c", 4, TTL, False, False) == Busy("busy", 2, 8)
    ok(acct.admit("c", 2, TTL, True, True))  # it fits: no read needed
    snap = acct.state()
    assert (snap.settling, snap.settling_after) == (2, second)


def test_admit_waits_when_only_calls_in_flight_stand_in_the_way(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    store(acct, 10)
    ok(acct.admit("a", 6, TTL, True, True))  # admitted on gen 1
    store(acct, 8)  # a read that may include a's charge
    ok(acct.admit("b", 1, TTL, True, True))  # admitted on gen 2
    snap = acct.state()
    assert (snap.cache_gen, snap.reserved) == (2, 7)
    # 2 > 8 - 7, but the account could pay if the calls in flight charged nothing
    assert acct.admit("c", 2, TTL, True, True) == WaitNeeded("wait", 0, 0)
    # may not wait: busy, with what is available beside the calls in flight
    assert acct.admit("c", 2, TTL, True, False) == Busy("busy", 1, 7)
    # the caller's own enclosing spend cannot settle while it waits: it counts as spent
    assert acct.admit("c", 2, TTL, True, True, own_ids=["a"]) == ("wait", 0, 6)
    assert acct.admit("c", 3, TTL, True, True, own_ids=["a"]) == ("refuse", 2, 7, bjson(8))
    assert acct.admit("c", 2, TTL, True, True, own_ids=["b", "gone"]) == ("wait", 0, 1)
    assert "c" not in records(redis_client, acct)
    assert acct.state().reserved == 7


def test_unchecked_reservations_are_calls_in_flight(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    acct.reserve_unchecked("u", 3)
    assert records(redis_client, acct) == {"u": (3, -1, 0)}
    store(acct, 4)
    ok(acct.admit("a", 1, TTL, True, True))
    assert acct.admit("b", 1, TTL, True, True) == ("wait", 0, 0)
    with pytest.raises(redis.ResponseError, match="already in use"):
        acct.reserve_unchecked("u", 1)


def test_admit_refuses_what_the_account_cannot_pay_beside_its_holds(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    store(acct, 10)
    ok(acct.admit("a", 7, TTL, True, True))
    assert acct.admit("b", 4, TTL, True, True) == ("wait", 0, 0)
    assert acct.admit("b", 4, TTL, True, False) == ("busy", 3, 7)
    assert acct.admit("b", 11, TTL, True, True) == Refused("refuse", 10, 7, bjson(10))
    # a hold is a commitment: what it holds is spent for a refusal
    gate = RedisGate(redis_client, None, DEFAULT_PREFIX, FP)
    assert gate.keep("a", 600_000, 7, 1, "", "") is not None
    assert acct.committed() == 7
    assert acct.admit("b", 4, TTL, True, True) == ("refuse", 3, 7, bjson(10))
    ok(acct.admit("b", 3, TTL, True, True))  # it fits beside them all
    assert acct.release("b")
    store(acct, 2)  # charges went elsewhere: reserved over the balance
    assert acct.admit("b", 4, TTL, True, False) == ("refuse", 0, 7, bjson(2))
    # claimed, it is a call in flight again
    assert gate.hold("a", True, 60_000) is not None
    assert acct.committed() == 0
    assert acct.admit("b", 2, TTL, True, False) == ("busy", 0, 7)


# -- reads -------------------------------------------------------------------------------


def test_one_flight_at_a_time(acct: RedisAccountState, redis_client: redis.Redis) -> None:
    acct.bump()
    assert acct.read_begin("t1", BUDGET) == ReadBegun(True, 1)
    acct.bump()
    assert acct.read_begin("t2", BUDGET) == (False, 1)  # where the read in progress started
    assert acct.state().flight
    acct.read_done("t2", 2, bjson(5), 5)  # not the leader: the flight stays
    assert redis_client.get(acct.keys[3]) == b"t1"
    acct.read_done("t1", 1, bjson(6), 6)  # older than the cached read: not stored
    snap = acct.state()
    assert (snap.flight, snap.balance, snap.cached_seq) == (False, bjson(5), 2)
    assert acct.read_begin("t3", BUDGET) == (True, 2)
    acct.read_failed("other")
    assert acct.state().flight
    acct.read_failed("t3")
    assert not acct.state().flight
    assert acct.state().balance == bjson(5)


def test_a_flight_expires_after_its_budget(acct: RedisAccountState) -> None:
    assert acct.read_begin("t1", 100).lead
    assert not acct.read_begin("t2", 100).lead
    poll(lambda: acct.read_begin("t2", BUDGET).lead)
    assert not acct.read_begin("t1", BUDGET).lead


def test_read_done_stores_only_trusted_reads(acct: RedisAccountState) -> None:
    acct.invalidate()
    acct.invalidate()  # floor 2
    acct.read_done("t", 1, bjson(9), 9)  # started before floor: not stored
    assert acct.state().balance is None
    acct.read_done("t", 2, bjson(8), 8)
    snap = acct.state()
    assert (snap.balance, snap.cached_seq, snap.cache_gen) == (bjson(8), 2, 3)
    assert snap.age_ms is not None
    assert 0 <= snap.age_ms < 5_000
    acct.bump()
    acct.read_done("t", 3, bjson(7), 7)
    acct.read_done("t", 2, bjson(6), 6)  # older than the cached one
    acct.read_done("t", 3, bjson(5), 5)  # as new: stored
    snap = acct.state()
    assert (snap.balance, snap.cached_seq, snap.cache_gen) == (bjson(5), 3, 5)


def test_read_done_releases_spends_that_finished_before_it(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    store(acct, 10)
    for rid in "abc":
        ok(acct.admit(rid, 2, TTL, True, True))
    fa = acct.finish("a")
    fb = acct.finish("b")
    assert acct.read_done("t", fa, bjson(8), 8) == 1  # includes a only
    assert set(records(redis_client, acct)) == {"b", "c"}
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.floor, snap.settling) == (4, 2, fa, 1)
    acct.invalidate()  # floor moves past b's read...
    assert acct.read_done("t", fb, bjson(6), 6) == 1  # ...which still settles b
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.balance) == (2, 1, None)
    assert acct.read_done("t", 99, bjson(6), 6) == 0  # c has not finished


# -- settling ----------------------------------------------------------------------------


def test_finish(acct: RedisAccountState, redis_client: redis.Redis) -> None:
    store(acct, 10)
    ok(acct.admit("a", 3, TTL, True, True))
    seq = acct.state().seq
    assert acct.finish("a") == seq + 1
    assert records(redis_client, acct)["a"] == (3, 1, seq + 1)
    assert acct.finish("gone") == 0
    assert acct.state().seq == seq + 1  # nothing changed for a reservation that is gone


def test_release(acct: RedisAccountState) -> None:
    store(acct, 10)
    ok(acct.admit("a", 3, TTL, True, True))
    ok(acct.admit("b", 4, TTL, True, True))
    before = acct.state()
    assert acct.release("a")
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.seq, snap.floor) == (4, 1, before.seq, before.floor)
    assert snap.balance == bjson(10)
    assert acct.release("b", invalidate=True)
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.balance) == (0, 0, None)
    assert snap.seq == snap.floor == before.seq + 1
    assert snap.cache_gen == before.cache_gen + 1
    assert not acct.release("b")
    acct.release("b", invalidate=True)  # still invalidates
    assert acct.state().floor == before.seq + 2


def test_settle_alone(acct: RedisAccountState, redis_client: redis.Redis) -> None:
    store(acct, 10)
    at = raw_hash(redis_client, acct.keys[0])["cached_at"]
    gen = ok(acct.admit("a", 3, TTL, True, True)).gen
    seq = acct.state().seq
    assert acct.settle_alone("a", gen, bjson(7), 7)
    snap = acct.state()
    assert (snap.balance, snap.seq, snap.floor, snap.cached_seq) == (
        bjson(7),
        seq + 1,
        seq + 1,
        seq + 1,
    )
    assert (snap.reserved, snap.inflight, snap.cache_gen) == (0, 0, gen + 1)
    assert raw_hash(redis_client, acct.keys[0])["cached_at"] == at  # its age is the read's
    ok(acct.admit("b", 7, TTL, True, True))


def _two_in_flight(acct: RedisAccountState) -> None:
    ok(acct.admit("x", 1, TTL, True, True))


def _finished(acct: RedisAccountState) -> None:
    acct.finish("a")  # it waits for a read already


def _flight(acct: RedisAccountState) -> None:
    acct.read_begin("t", BUDGET)


def _newer_read(acct: RedisAccountState) -> None:
    store(acct, 10)  # "a" was admitted before it came back: the read may include it


def _untrusted(acct: RedisAccountState) -> None:
    ok(acct.admit("x", 1, TTL, True, True))
    acct.finish("x")
    acct.release("x")  # floor past the cached read


@pytest.mark.parametrize(
    ("spoil", "gen_offset"),
    [
        (_two_in_flight, 0),
        (_finished, 0),
        (_flight, 0),
        (_newer_read, 0),
        (_untrusted, 0),
        (lambda acct: None, 1),  # expected_gen is not the reservation's
        (lambda acct: acct.invalidate(), 1),
    ],
)
def test_settle_alone_changes_nothing_unless_provably_newest(
    acct: RedisAccountState,
    redis_client: redis.Redis,
    spoil: Callable[[RedisAccountState], None],
    gen_offset: int,
) -> None:
    store(acct, 10)
    gen = ok(acct.admit("a", 3, TTL, True, True)).gen
    spoil(acct)
    before = dump(redis_client)
    assert not acct.settle_alone("a", gen + gen_offset, bjson(7), 7)
    assert dump(redis_client) == before
    assert not acct.settle_alone("gone", gen, bjson(7), 7)


def test_invalidate_and_bump(acct: RedisAccountState) -> None:
    store(acct, 10)
    assert acct.bump() == 1
    snap = acct.state()
    assert (snap.seq, snap.floor, snap.balance) == (1, 0, bjson(10))
    acct.invalidate()
    snap = acct.state()
    assert (snap.seq, snap.floor, snap.balance, snap.cache_gen) == (2, 2, None, 2)
    assert acct.bump() == 3


# -- leases ------------------------------------------------------------------------------


def test_renew(acct: RedisAccountState, redis_client: redis.Redis) -> None:
    store(acct, 10)
    ok(acct.admit("a", 1, TTL, True, True))
    first = redis_client.zscore(acct.keys[2], "a")
    assert first is not None
    time.sleep(0.005)
    assert acct.renew(["a", "gone"]) == 1
    renewed = redis_client.zscore(acct.keys[2], "a")
    assert renewed is not None
    assert renewed > first
    assert redis_client.zscore(acct.keys[2], "gone") is None
    assert acct.renew([]) == 0


def _expired(redis_client: redis.Redis, lease_ms: int = 300) -> RedisAccountState:
    """An account with a cached balance of 10 and two spends in flight, "a" (6) and "b"
    (4, finished), whose leases have both expired (nothing has looked since)."""
    acct = RedisAccountState(redis_client, None, DEFAULT_PREFIX, FP, lease_ms)
    store(acct, 10)
    ok(acct.admit("a", 6, TTL, True, True))
    ok(acct.admit("b", 4, TTL, True, True))
    assert acct.finish("b") == 1
    assert raw_hash(redis_client, acct.keys[0])["reserved"] == "10"  # (no sweep here)
    poll(lambda: redis_client.zcount(acct.keys[2], "-inf", f"({server_ms(redis_client)}") == 2)
    return acct


# Every operation but finish, with what it answers once the leases are swept.
_SWEEPING: dict[str, Callable[[RedisAccountState], object]] = {
    "admit": lambda acct: acct.admit("c", 1, TTL, True, True) == ("read", 2),
    "reserve_unchecked": lambda acct: acct.reserve_unchecked("u", 1) is None,
    "read_begin": lambda acct: acct.read_begin("t", BUDGET) == (True, 2),
    "read_done": lambda acct: acct.read_done("t", 1, bjson(3), 3) == 0,  # started before
    "read_failed": lambda acct: acct.read_failed("t") is None,
    "state": lambda acct: acct.state().reserved == 0,
    "release": lambda acct: acct.release("a") is False,
    "settle_alone": lambda acct: acct.settle_alone("a", 1, bjson(3), 3) is False,
    "invalidate": lambda acct: acct.invalidate() is None,
    "bump": lambda acct: acct.bump() == 3,
    "renew": lambda acct: acct.renew(["a", "b"]) == 0,
    "block": lambda acct: acct.block(10) is None,
    "blocked": lambda acct: acct.blocked() is None,
}


@pytest.mark.parametrize("op", sorted(_SWEEPING))
def test_an_expired_lease_returns_its_credits_and_invalidates(
    redis_client: redis.Redis, op: str
) -> None:
    acct = _expired(redis_client)
    assert _SWEEPING[op](acct)
    # every op (but finish) sweeps first: the raw state already shows it
    raw = raw_hash(redis_client, acct.keys[0])
    left = records(redis_client, acct)
    assert set(left) <= {"u"}  # (an unchecked reservation made after the sweep)
    assert (int(raw["reserved"]), int(raw["inflight"])) == (len(left), len(left))
    assert int(raw["seq"]) >= int(raw["floor"]) >= 2
    assert "cached" not in raw
    assert "cached_total" not in raw
    assert "cache_id" not in raw
    assert redis_client.zcard(acct.keys[2]) == len(left)
    acct.read_failed("t")  # (the flight read_begin took)
    store(acct, 10)  # the credits are back
    ok(acct.admit("c", 10 - len(left), TTL, True, True))


def test_finish_leaves_expired_leases_to_the_next_operation(redis_client: redis.Redis) -> None:
    acct = _expired(redis_client)
    # finish decides nothing: it marks the spend, expired or not...
    assert acct.finish("a") == 2
    assert records(redis_client, acct) == {"a": (6, 1, 2), "b": (4, 1, 1)}
    assert raw_hash(redis_client, acct.keys[0])["reserved"] == "10"
    assert "cached" in raw_hash(redis_client, acct.keys[0])
    # ...and the next operation removes both and distrusts the cached balance
    assert acct.admit("c", 1, TTL, True, True) == ("read", 3)
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.settling, snap.balance) == (0, 0, 0, None)
    assert snap.seq == snap.floor == 3
    assert redis_client.zcard(acct.keys[2]) == 0
    # a finish after the sweep finds nothing
    assert acct.finish("a") == 0


def test_only_expired_leases_are_swept(redis_client: redis.Redis) -> None:
    acct = RedisAccountState(redis_client, None, DEFAULT_PREFIX, FP, 60_000)
    store(acct, 10)
    ok(acct.admit("a", 6, TTL, True, True))
    ok(acct.admit("b", 4, TTL, True, True))
    # b's lease expires (as a process that stopped renewing it); a's does not
    redis_client.zadd(acct.keys[2], {"b": server_ms(redis_client) - 1})
    redis_client.zadd(acct.keys[2], {"stray": server_ms(redis_client) - 1})  # no record
    # (the stray lease is a lost record: the books are repaired, and distrusted, first)
    assert acct.admit("c", 1, TTL, True, True) == ("read", 2)
    assert records(redis_client, acct) == {"a": (6, 1, 0)}
    assert redis_client.zrange(acct.keys[2], 0, -1) == [b"a"]
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.balance, snap.floor) == (6, 1, None, 2)
    # nothing more is due: operations leave the state as it is
    before = dump(redis_client)
    acct.state()
    acct.blocked()
    acct.read_failed("t")
    assert dump(redis_client) == before


def test_admission_writes_only_what_it_changes(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    store(acct, 10)
    acct.block(60_000)
    before = raw_hash(redis_client, acct.keys[0])
    ok(acct.admit("a", 4, TTL, True, True))
    after = raw_hash(redis_client, acct.keys[0])
    assert {k for k in after if after[k] != before.get(k)} == {"reserved", "inflight"}
    assert set(before) <= set(after)
    assert (after["reserved"], after["inflight"]) == ("4", "1")
    seq = int(after.get("seq", 0))
    assert acct.finish("a") == seq + 1
    finished = raw_hash(redis_client, acct.keys[0])
    assert {k for k in finished if finished[k] != after.get(k)} == {"seq"}


def test_a_read_releases_any_number_of_finished_spends(
    acct: RedisAccountState, redis_client: redis.Redis
) -> None:
    n = 2_500  # more than one batch of the script's deletions
    store(acct, n + 5)
    for i in range(n):
        ok(acct.admit(f"s{i}", 1, TTL, True, True))
        acct.finish(f"s{i}")
    ok(acct.admit("last", 2, TTL, True, True))  # in flight: stays
    seq = acct.state().seq
    assert acct.read_done("t", seq, bjson(5), 5) == n
    assert records(redis_client, acct) == {"last": (2, 1, 0)}
    assert redis_client.zrange(acct.keys[2], 0, -1) == [b"last"]
    snap = acct.state()
    assert (snap.reserved, snap.inflight, snap.floor, snap.balance) == (2, 1, seq, bjson(5))


def test_a_renewed_lease_does_not_expire(redis_client: redis.Redis) -> None:
    acct = RedisAccountState(redis_client, None, DEFAULT_PREFIX, FP, 500)
    store(acct, 10)
    ok(acct.admit("a", 6, TTL, True, True))
    ok(acct.admit("b", 4, TTL, True, True))
    # keep renewing a while b expires
    deadline = time.monotonic() + 10
    while "b" in records(redis_client, acct):
        assert time.monotonic() < deadline
        assert acct.renew(["a"]) == 1
        time.sleep(0.02)
    assert acct.state().reserved == 6


# -- the rate-limit block ----------------------------------------------------------------


def test_block(acct: RedisAccountState, redis_client: redis.Redis) -> None:
    assert acct.blocked() is None
    acct.block(5_000)
    left = acct.blocked()
    assert left is not None
    assert 0 < left <= 5_000
    acct.block(10)  # never shortens
    left = acct.blocked()
    assert left is not None
    assert left > 1_000
    other = RedisAccountState(redis_client, None, DEFAULT_PREFIX, _fingerprint(BASE_URL, "x"))
    assert other.blocked() is None
    other.block(50)
    poll(lambda: other.blocked() is None)


# -- an outage ---------------------------------------------------------------------------


def test_scripts_are_loaded_again_after_a_restart() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        acct = RedisAccountState(client, None, DEFAULT_PREFIX, FP)
        store(acct, 5)
        ok(acct.admit("a", 5, TTL, True, True))
        port = server.port
        server.restart()
        assert server.port == port
        used = ("read_begin", "read_done", "admit")
        assert client.script_exists(*(SHAS[n] for n in used)) == [False] * 3
        assert (
            SHAS["admit"]
            == hashlib.sha1(SCRIPTS["admit"].encode(), usedforsecurity=False).hexdigest()
        )
        assert acct.admit("a", 5, TTL, True, True) == ("read", 0)  # state lost, fail closed
        store(acct, 5)
        ok(acct.admit("a", 5, TTL, True, True))
        client.close()


# -- processes ---------------------------------------------------------------------------


def _race(url: str, fingerprint: str, tries: int, barrier: Any, results: Any) -> None:
    client = redis.Redis.from_url(url)
    acct = RedisAccountState(client, None, DEFAULT_PREFIX, fingerprint)
    barrier.wait(60)
    admitted = 0
    for i in range(tries):
        result = acct.admit(f"{os.getpid()}-{i}", 1, TTL, True, False)
        if isinstance(result, Admitted):
            admitted += 1
        else:
            assert isinstance(result, Busy), result
    results.put(admitted)
    client.close()


def test_processes_never_admit_more_than_the_balance(
    redis_url: str, redis_client: redis.Redis
) -> None:
    k, procs = 60, 4
    acct = RedisAccountState(redis_client, None, DEFAULT_PREFIX, FP)
    store(acct, k)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_race, args=(redis_url, FP, k, barrier, results)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        counts = [results.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
    assert [w.exitcode for w in workers] == [0] * procs
    assert sum(counts) == k
    snap = acct.state()
    assert (snap.reserved, snap.inflight) == (k, k)
    assert acct.admit("late", 1, TTL, True, False) == ("busy", 0, k)
    assert acct.admit("late", k + 1, TTL, True, True) == ("refuse", k, k, bjson(k))


# -- async twins -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio runs on asyncio only
async def test_async_twins(redis_url: str, redis_client: redis.Redis) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        acct = RedisAccountState(None, client, DEFAULT_PREFIX, FP)
        sync = RedisAccountState(redis_client, None, DEFAULT_PREFIX, FP)
        assert await acct.aadmit("a", 1, TTL, True, True) == ("read", 0)
        begun = await acct.aread_begin("t", BUDGET)
        assert begun == (True, 0)
        assert await acct.aread_begin("u", BUDGET) == (False, 0)
        assert await acct.aread_done("t", begun.start_seq, bjson(10), 10) == 0
        assert not (await acct.astate()).flight
        gen = ok(await acct.aadmit("a", 3, TTL, True, True)).gen
        ok(await acct.aadmit("b", 4, TTL, True, True))
        assert await acct.aadmit("c", 4, TTL, True, False) == ("busy", 3, 7)
        assert await acct.aadmit("c", 11, TTL, True, False) == ("refuse", 10, 7, bjson(10))
        assert await acct.acommitted() == 0
        survey = await acct.asurvey()
        assert survey == (bjson(10), 7, 2, 0, 0, 0, 0, ())
        await acct.areserve_unchecked("u", 1)
        assert await acct.aadmit("c", 4, TTL, True, True) == ("wait", 0, 0)
        assert await acct.arelease("u")
        assert await acct.arenew(["a", "b", "gone"]) == 2
        assert not await acct.asettle_alone("a", gen, bjson(7), 7)  # b is in flight too
        after = await acct.afinish("b")
        assert after == 1
        assert await acct.aread_done("x", after, bjson(6), 6) == 1
        assert not await acct.asettle_alone("a", gen, bjson(3), 3)  # the read may include a
        assert await acct.aadmit("c", 4, TTL, True, True) == ("wait", 0, 0)
        assert (await acct.aread_begin("t2", BUDGET)).lead
        await acct.aread_failed("t2")
        snap = await acct.astate()
        assert dataclasses.replace(snap, age_ms=0) == dataclasses.replace(sync.state(), age_ms=0)
        assert (snap.reserved, snap.inflight, snap.balance, snap.flight) == (3, 1, bjson(6), False)
        assert await acct.abump() == snap.seq + 1
        await acct.ainvalidate()
        assert (await acct.astate()).floor == snap.seq + 2
        assert await acct.ablocked() is None
        await acct.ablock(5_000)
        left = await acct.ablocked()
        assert left is not None
        assert 0 < left <= 5_000
        assert await acct.afinish("a") == snap.seq + 3
        assert await acct.arelease("a", invalidate=True)
        assert (await acct.astate()).reserved == 0
        with pytest.raises(RuntimeError, match="no async client"):
            await sync.astate()
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_settle_alone(redis_url: str, redis_client: redis.Redis) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        acct = RedisAccountState(None, client, DEFAULT_PREFIX, FP)
        begun = await acct.aread_begin("t", BUDGET)
        await acct.aread_done("t", begun.start_seq, bjson(10), 10)
        gen = ok(await acct.aadmit("a", 3, TTL, True, True)).gen
        assert await acct.asettle_alone("a", gen, bjson(7), 7)
        snap = await acct.astate()  # decoded from str answers as well as bytes
        assert (snap.balance, snap.reserved, snap.cached_seq) == (bjson(7), 0, 1)
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_calls_load_the_scripts_again(
    redis_url: str, redis_client: redis.Redis
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        acct = RedisAccountState(None, client, DEFAULT_PREFIX, FP)
        begun = await acct.aread_begin("t", BUDGET)
        await acct.aread_done("t", begun.start_seq, bjson(10), 10)
        first = ok(await acct.aadmit("a", 1, TTL, True, True))
        assert first == ("ok", bjson(10), 1, "t:1")
        redis_client.script_flush()  # as a failover to a server that never saw them
        known = await acct.aadmit("b", 1, TTL, True, True, known="t:1")
        assert known == ("ok", None, 1, "t:1")
        redis_client.script_flush()
        assert await acct.afinish("b") == 1
        assert (await acct.astate()).reserved == 2
    finally:
        await client.aclose()


# -- a random walk, with a model of the upstream balance ---------------------------------


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


# the operations of a walk, the common ones more often
_OPS = (
    *("admit",) * 4,
    *("charge",) * 2,
    *("finish",) * 2,
    "report",
    "deliver",
    "fail",
    "unrun",
    *("read",) * 2,
    "answer",
    *("done",) * 2,
    "read_fail",
    "invalidate",
    "bump",
)


class _Walk:
    """A model of the upstream account and of the callers: an action charges the upstream
    balance (at most its cost, at any instant from its admission to its return), a read
    answers with the upstream balance at any instant from its start to its end."""

    def __init__(self, client: redis.Redis, data: st.DataObject) -> None:
        self.client = client
        self.data = data
        self.acct = RedisAccountState(client, None, DEFAULT_PREFIX, f"acct_walk{next(_ids)}")
        self.upstream = data.draw(st.integers(0, 20), label="balance")
        self.cost: dict[str, int] = {}  # every reservation made: id -> cost
        self.charged: dict[str, int] = {}  # id -> what its action charged upstream
        self.gen: dict[str, int] = {}
        self.running: list[str] = []  # admitted, action not returned
        self.reported: dict[str, int] = {}  # returned, its report not yet handled: id -> total
        self.reads: dict[str, list[int | None]] = {}  # in progress: token -> [start, answer]
        self.stats: dict[str, int] = {}
        store(self.acct, self.upstream)

    def draw(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self.data.draw(strategy)

    def charge(self, rid: str, amount: int | None = None) -> None:
        """The action ``rid`` spends ``amount`` (all it may still spend by default)."""
        left = self.cost[rid] - self.charged[rid]
        amount = left if amount is None else amount
        assert amount <= self.upstream, "overspent: the account could not pay"
        self.upstream -= amount
        self.charged[rid] += amount

    def step(self, op: str) -> None:
        acct = self.acct
        if op == "admit":
            rid, cost = new_id(), self.draw(st.integers(0, 6))
            result = acct.admit(rid, cost, TTL, self.draw(st.booleans()), self.draw(st.booleans()))
            self.stats[result.kind] = self.stats.get(result.kind, 0) + 1
            if isinstance(result, Admitted):
                self.cost[rid], self.charged[rid], self.gen[rid] = cost, 0, result.gen
                self.running.append(rid)
                if cost:  # what is reserved never exceeds the balance admitted on
                    assert acct.state().reserved <= json.loads(result.balance)["totalBalance"]
        elif op in ("charge", "finish", "report", "fail", "unrun") and self.running:
            rid = self.draw(st.sampled_from(self.running))
            if op == "charge":
                self.charge(rid, self.draw(st.integers(0, self.cost[rid] - self.charged[rid])))
                return
            self.running.remove(rid)
            if op == "fail":  # the action raised: it may or may not have spent
                if self.draw(st.booleans()):
                    self.charge(rid)
                assert acct.release(rid, invalidate=True)
            elif op == "unrun" and not self.charged[rid]:  # it never ran
                assert acct.release(rid)
            elif op == "report":  # the call returns what the balance is after it
                self.charge(rid)
                self.reported[rid] = self.upstream  # its caller sees it later ("deliver")
            else:
                self.charge(rid)
                assert acct.finish(rid) > 0
        elif op == "deliver" and self.reported:
            rid = self.draw(st.sampled_from(sorted(self.reported)))
            after = self.reported.pop(rid)
            if not acct.settle_alone(rid, self.gen[rid], bjson(after), after):
                assert acct.finish(rid) > 0
        elif op == "read":
            token = new_id("tok")
            begun = acct.read_begin(token, BUDGET)
            # a caller that does not lead may read on its own, from the seq it sees now
            start = begun.start_seq if begun.lead else acct.state().seq
            self.reads[token] = [start, None]
        elif op in ("answer", "done", "read_fail") and self.reads:
            token = self.draw(st.sampled_from(sorted(self.reads)))
            read = self.reads[token]
            if op == "answer":
                if read[1] is None:
                    read[1] = self.upstream  # the service answers now
                return
            del self.reads[token]
            if op == "read_fail":
                acct.read_failed(token)
                return
            started, answered = read
            assert started is not None
            total = self.upstream if answered is None else answered
            acct.read_done(token, started, bjson(total), total)
        elif op == "invalidate":
            acct.invalidate()
        elif op == "bump":
            acct.bump()

    def check(self) -> None:
        recs = records(self.client, self.acct)
        snap = self.acct.state()
        # reserved is the sum of the live reservations' costs
        assert snap.reserved == sum(cost for cost, _, _ in recs.values())
        assert snap.inflight == len(recs)
        assert snap.settling == sum(1 for _, _, after in recs.values() if after)
        assert {*self.running, *self.reported} <= set(recs)  # not settled before it returns
        for rid, (cost, _, _) in recs.items():
            assert self.cost[rid] == cost
        # The invariant that makes admission safe: a trusted balance includes every charge
        # of the spends already released (the live ones may or may not be in it). So
        # balance - reserved never exceeds what the account can still pay for.
        if snap.balance is not None and snap.cached_seq >= snap.floor:
            total = json.loads(snap.balance)["totalBalance"]
            assert total <= self.upstream + sum(self.charged[rid] for rid in recs)


@FUZZ
@given(data=st.data())
def test_random_walk_never_overspends(redis_url: str, data: st.DataObject) -> None:
    walk = _Walk(_client(redis_url), data)
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        walk.step(data.draw(st.sampled_from(_OPS)))
        walk.check()
