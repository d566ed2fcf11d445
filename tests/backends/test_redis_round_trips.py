"""What a warm decorated call costs over Redis, and what its end tells Redis later.

A decorated call's end (``defer``: the spend finished, a later read settles it) makes no
round trip of its own: it travels with this process's next admission on the account,
or the lease renewer sends it within ``FLUSH_AFTER``, or the backend's ``close()`` does.
Until Redis knows, the spend counts there as in flight: nothing is admitted on its
credits, no read settles it, and its lease still covers a process that dies (that test,
with a killed worker, is in ``test_redis_processes.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio.connection
import redis.connection

from creditguard import AdmissionTimeout, CreditGuard, InsufficientCredits
from creditguard.backends.redis import leases
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor


def fresh_prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}:"


class Trips:
    count = 0


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Trips:
    """Every request redis-py sends from this process (any thread, sync or asyncio): one
    round trip each."""
    trips = Trips()
    sync_send = redis.connection.AbstractConnection.send_packed_command
    async_send = redis.asyncio.connection.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        trips.count += 1
        sync_send(self, command, check_health)

    async def asend(self: Any, command: Any, check_health: bool = True) -> None:
        trips.count += 1
        await async_send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
    monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "send_packed_command", asend)
    return trips


@pytest.fixture
def no_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """The renewer never tells Redis of finished spends on its own in the test."""
    monkeypatch.setattr(leases, "FLUSH_AFTER", 3600.0, raising=False)


def records(client: redis.Redis, backend: RedisBackend, guard: CreditGuard) -> list[str]:
    """The account's reservation records in Redis ("cost:gen:after"; after 0: in flight)."""
    key = f"{backend.prefix}{{{guard.account}}}:res"
    return sorted(v.decode() for v in client.hgetall(key).values())


def in_flight(recs: list[str]) -> int:
    return sum(1 for r in recs if r.endswith(":0"))


def make(redis_url: str, name: str, **kwargs: Any) -> tuple[FakeLensmor, RedisBackend, CreditGuard]:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    backend = RedisBackend(redis_url, prefix=fresh_prefix(name))
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, ttl=60, **kwargs)
    return fake, backend, guard


def paid_call(guard: CreditGuard, fake: FakeLensmor, cost: int) -> Callable[[], None]:
    @guard.requires_credits(cost)
    def paid() -> None:
        fake.charge(cost)

    return paid


@pytest.mark.usefixtures("no_flush")
def test_a_warm_decorated_call_makes_one_round_trip(
    redis_url: str, redis_client: redis.Redis, round_trips: Trips
) -> None:
    fake, backend, guard = make(redis_url, "one-trip")
    paid = paid_call(guard, fake, 1)
    try:
        for _ in range(5):  # warm: the balance read, the scripts loaded, connections open
            paid()
        calls, start = 50, round_trips.count
        for _ in range(calls):
            paid()
        made = round_trips.count - start
        # One admission script per call (the renewer may renew leases once meanwhile).
        assert calls <= made <= calls + 1
        # Each admission told Redis that the call before it finished: only the last is
        # still in flight there, and nothing was settled without a read.
        recs = records(redis_client, backend, guard)
        assert len(recs) == 5 + calls
        assert in_flight(recs) == 1
        # A balance asked for in this process includes every call that returned here:
        # Redis learns of the last one first, and the read settles them all.
        assert guard.balance().total_balance == 1000 - 5 - calls
        assert records(redis_client, backend, guard) == []
        assert guard.snapshot().reserved == 0
    finally:
        guard.close()
        backend.close()


@pytest.mark.usefixtures("no_flush")
def test_a_warm_async_decorated_call_makes_one_round_trip(
    redis_url: str, redis_client: redis.Redis, round_trips: Trips
) -> None:
    fake, backend, guard = make(redis_url, "one-trip-async")

    @guard.requires_credits(1)
    async def paid() -> None:
        fake.charge(1)

    counted: list[int] = []

    async def main() -> None:
        try:
            for _ in range(5):
                await paid()
            calls, start = 50, round_trips.count
            for _ in range(calls):
                await paid()
            counted.append(round_trips.count - start)
            counted.append(in_flight(records(redis_client, backend, guard)))
        finally:
            await backend.aclose()  # tells Redis of the last one

    anyio.run(main, backend="asyncio")
    assert 50 <= counted[0] <= 51
    assert counted[1] == 1
    assert in_flight(records(redis_client, backend, guard)) == 0
    guard.close()


def test_the_renewer_tells_redis_when_no_admission_comes(
    redis_url: str, redis_client: redis.Redis
) -> None:
    fake, backend, guard = make(redis_url, "flusher")
    other = RedisBackend(redis_url, prefix=backend.prefix)
    seen = CreditGuard(fake.api_key, transport=fake.transport, backend=other, ttl=60)
    try:
        paid_call(guard, fake, 7)()
        deadline = time.monotonic() + 5
        while in_flight(records(redis_client, backend, guard)):
            assert time.monotonic() < deadline, "Redis never learnt that the call finished"
            time.sleep(0.005)
        # Another process's balance settles it, with a read that includes its charge.
        assert seen.balance().total_balance == 993
        assert records(redis_client, backend, guard) == []
    finally:
        seen.close()
        other.close()
        guard.close()
        backend.close()


@pytest.mark.usefixtures("no_flush")
def test_close_tells_redis_of_the_spends_that_finished(
    redis_url: str, redis_client: redis.Redis
) -> None:
    fake, backend, guard = make(redis_url, "close-flush")
    paid = paid_call(guard, fake, 3)
    paid()
    paid()
    assert in_flight(records(redis_client, backend, guard)) == 1  # the last call's end
    guard.close()
    backend.close()
    recs = records(redis_client, backend, guard)
    assert len(recs) == 2
    assert in_flight(recs) == 0  # finished: a read settles them


@pytest.mark.usefixtures("no_flush")
def test_a_finished_call_redis_does_not_know_of_stays_counted(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Exactness: until Redis learns that a call finished (and a read that includes it
    settles it), its credits are reserved for every process; once told, a read settles
    it and the balance it left decides."""
    fake = FakeLensmor(subscription_balance=10, gift_balance=0)
    prefix = fresh_prefix("counted")
    backends = [RedisBackend(redis_url, prefix=prefix) for _ in range(3)]
    mine, cached, fresh = backends
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=mine, ttl=60)
    # Other processes: one on the cached balance, one that reads for every admission.
    on_cache = CreditGuard(
        fake.api_key, transport=fake.transport, backend=cached, ttl=60, admission_timeout=0
    )
    reading = CreditGuard(
        fake.api_key, transport=fake.transport, backend=fresh, ttl=0, admission_timeout=0
    )
    guards = [guard, on_cache, reading]
    try:
        paid_call(guard, fake, 10)()  # spends all 10; Redis is not told yet
        assert in_flight(records(redis_client, mine, guard)) == 1
        # On the cached 10, the call's 10 are reserved: busy, never admitted.
        with pytest.raises(AdmissionTimeout) as busy, on_cache.spend(1):
            pytest.fail("admitted on credits a finished call spent")
        assert (busy.value.available, busy.value.reserved) == (0, 10)
        # A read made now includes the charge but settles nothing (Redis does not know
        # the call finished): the account cannot pay, whatever the call in flight does.
        with pytest.raises(InsufficientCredits) as refused, reading.spend(1):
            pytest.fail("admitted on credits a finished call spent")
        assert refused.value.available == 0
        assert in_flight(records(redis_client, mine, guard)) == 1
        assert on_cache.snapshot().reserved == 10

        mine.close()  # tells Redis the call finished
        assert in_flight(records(redis_client, mine, guard)) == 0
        assert on_cache.balance().total_balance == 0  # a read that settles it
        assert records(redis_client, mine, guard) == []
        assert on_cache.snapshot().reserved == 0
    finally:
        for g in guards:
            g.close()
        for b in backends:
            b.close()


@pytest.mark.usefixtures("no_flush")
def test_an_uncontended_gated_call_makes_two_round_trips(
    redis_url: str, redis_client: redis.Redis, round_trips: Trips
) -> None:
    """With ``max_concurrent``, a warm decorated call nobody competes with makes two round
    trips: one script refuses what the account cannot pay, takes the turn and admits the
    call; one gives the turn back. No balance read of its own, no ``committed`` look."""
    fake, backend, guard = make(redis_url, "gated", max_concurrent=1)
    paid = paid_call(guard, fake, 1)
    try:
        for _ in range(5):  # warm: the balance read, the scripts loaded, connections open
            paid()
        calls, start = 50, round_trips.count
        reads = fake.balance_requests
        for _ in range(calls):
            paid()
        made = round_trips.count - start
        assert 2 * calls <= made <= 2 * calls + 1  # (the renewer may renew once)
        assert fake.balance_requests == reads  # no balance read of their own
        assert guard.balance().total_balance == 1000 - 5 - calls
        assert redis_client.zcard(f"{backend.prefix}{{{guard.account}}}:gate") == 0
    finally:
        guard.close()
        backend.close()


@pytest.mark.usefixtures("no_flush")
def test_a_gated_call_the_account_cannot_pay_is_refused_in_one_round_trip(
    redis_url: str, redis_client: redis.Redis, round_trips: Trips
) -> None:
    """On a fresh cached balance, the gate's one script refuses a call the account cannot
    pay before it queues (it never waits for a turn)."""
    fake, backend, guard = make(redis_url, "gated-refused", max_concurrent=1)
    try:
        guard.balance()
        paid_call(guard, fake, 1)()  # warm
        start = round_trips.count
        with pytest.raises(InsufficientCredits) as refused:
            paid_call(guard, fake, 5000)()
        assert round_trips.count - start == 1
        assert refused.value.available == 1000
        assert redis_client.zcard(f"{backend.prefix}{{{guard.account}}}:queue") == 0
    finally:
        guard.close()
        backend.close()
