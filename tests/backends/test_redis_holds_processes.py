"""Holds and the gate across real processes sharing one redis-server and one sandbox served
over loopback HTTP: a hold taken in one process is settled by id in another; a process
killed while holding gives its credits back when the hold expires; ``max_concurrent=1``
across four processes sends the key's paid calls one at a time (the sandbox answers ``409``
to overlapping ones, so without the gate some of them fail)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from creditguard import CreditGuard, InsufficientCredits, UnknownHold
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor, serve
from tests.backends import redis_workers
from tests.backends.test_redis_processes import JOIN_TIMEOUT, RESULT_TIMEOUT, SPAWN, poll, reap


def _guard(key: str, url: str, backend: RedisBackend, **kwargs: object) -> CreditGuard:
    return CreditGuard(
        key,
        base_url=url,
        allow_insecure_http=True,
        backend=backend,
        ttl=60,
        admission_timeout=0,
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def _holder(
    redis_url: str, key: str, balance: int, cost: int, expires_in: float
) -> Iterator[tuple[FakeLensmor, CreditGuard, Any, Any, str, int]]:
    """A sandbox of ``balance`` served over loopback HTTP, a guard of this process on it,
    and a worker process that took a hold of ``cost``: (sandbox, guard, worker, its pipe,
    the hold's id, the balance it was admitted on)."""
    fake = FakeLensmor(subscription_balance=balance, gift_balance=0, api_key=key)
    with serve(fake.app) as url:
        backend = RedisBackend(redis_url)
        guard = _guard(key, url, backend)
        parent, child = SPAWN.Pipe()
        worker = SPAWN.Process(
            target=redis_workers.take_a_hold, args=(redis_url, url, key, cost, expires_in, child)
        )
        worker.start()
        try:
            assert parent.poll(RESULT_TIMEOUT), "the worker never took its hold"
            kind, hold_id, before = parent.recv()
            assert kind == "held"
            yield fake, guard, worker, parent, hold_id, before
        finally:
            reap([worker])
            guard.close()
            backend.close()


def test_a_hold_taken_in_one_process_is_settled_in_another(
    redis_url: str, redis_client: redis.Redis
) -> None:
    with _holder(redis_url, "sk_test_holds_across_1", 100, 60, 600.0) as held:
        fake, guard, worker, parent, hold_id, before = held
        assert before == 100
        parent.send("exit")  # the worker goes away; its hold stays open
        assert parent.poll(RESULT_TIMEOUT)
        assert parent.recv()[0] == "exiting"
        worker.join(JOIN_TIMEOUT)
        assert worker.exitcode == 0

        with pytest.raises(InsufficientCredits) as refused, guard.spend(50):
            pytest.fail("admitted while another process holds 60 of 100 credits")
        assert refused.value.reserved == 60
        hold = guard.hold_by_id(hold_id)
        assert (hold.cost, hold.balance_before) == (60, fake.balance)
        fake.charge(45)  # the work the hold paid for, charged late
        after = hold.settle()
        assert after is not None
        assert after.total_balance == 55
        with pytest.raises(UnknownHold):
            guard.hold_by_id(hold_id)
        with guard.spend(55):
            pass


def test_a_process_killed_while_holding_gives_its_credits_back_at_expiry(
    redis_url: str, redis_client: redis.Redis
) -> None:
    with _holder(redis_url, "sk_test_holds_killed_2", 100, 80, 1.0) as held:
        fake, guard, worker, _, hold_id, _ = held
        worker.kill()
        worker.join(JOIN_TIMEOUT)
        assert worker.exitcode == -signal.SIGKILL
        killed = time.monotonic()
        reads = fake.balance_requests

        def whole_balance() -> bool:
            try:
                with guard.spend(100):
                    return True
            except InsufficientCredits:
                return False

        poll(whole_balance, what="the credits back when the hold expired")
        assert time.monotonic() - killed < 5
        assert fake.balance_requests > reads  # the expiry distrusted the cache
        with pytest.raises(UnknownHold):
            guard.hold_by_id(hold_id)


def _searches(redis_url: str, max_concurrent: int | None, key: str) -> tuple[list[int], int]:
    procs, calls, width = 4, 12, 3
    fake = FakeLensmor(subscription_balance=100_000, gift_balance=0, api_key=key)
    fake.latency = 0.005
    with serve(fake.app) as url:
        barrier = SPAWN.Barrier(procs)
        results = SPAWN.Queue()
        workers = [
            SPAWN.Process(
                target=redis_workers.gated_searches,
                args=(redis_url, url, key, calls, width, max_concurrent, barrier, results),
            )
            for _ in range(procs)
        ]
        for w in workers:
            w.start()
        try:
            seen = [results.get(timeout=RESULT_TIMEOUT) for _ in workers]
        finally:
            reap(workers)
    assert [e for r in seen for e in r["errors"]] == []
    return [s for r in seen for s in r["statuses"]], fake.charges


def test_max_concurrent_1_across_four_processes_sends_no_overlapping_paid_calls(
    redis_url: str,
) -> None:
    statuses, charges = _searches(redis_url, 1, "sk_test_gate_across_3")
    print(f"\nwith the gate: {len(statuses)} searches, {statuses.count(409)} answered 409")
    assert statuses == [201] * 48
    assert charges == 48


def test_without_the_gate_four_processes_overlap_and_get_409(redis_url: str) -> None:
    statuses, charges = _searches(redis_url, None, "sk_test_gate_across_4")
    print(f"\nwithout the gate: {len(statuses)} searches, {statuses.count(409)} answered 409")
    assert statuses.count(409) > 0
    assert charges == statuses.count(201)
