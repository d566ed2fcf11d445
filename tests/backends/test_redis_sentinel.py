"""RedisBackend through Redis Sentinel, across a real failover.

A primary, its replica and three ``redis-sentinel`` (``down-after-milliseconds`` 500,
``failover-timeout`` 2000); two worker processes spend on one account of the sandbox,
two threads each, until it cannot pay. The primary is killed (SIGKILL) mid-run: calls
fail closed (``BalanceUnavailable``) until the sentinels promote the replica, then the
guards carry on against it with what was in flight accounted for (the reservations the
replica received, renewed or recorded again by each process's lease renewer; those whose
settling failed during the outage expire after their short lease), and the account is
spent to 0 without one charge the sandbox refused.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator

import pytest
import redis
from redis.sentinel import Sentinel

from creditguard import BalanceUnavailable, CreditGuard
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor, serve
from creditguard.testing._redis_topologies import SentinelGroup, wait_until
from tests.backends import redis_workers

SPAWN = multiprocessing.get_context("spawn")
RESULT_TIMEOUT = 120.0


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    with SentinelGroup(down_after_ms=500, failover_timeout_ms=2000) as group:
        yield group


def _spends(backend: RedisBackend, fake: FakeLensmor) -> None:
    with CreditGuard(fake.api_key, transport=fake.transport, backend=backend) as g:
        with g.spend(10) as spend:
            pass
        assert spend.balance_after is not None  # the read that settles the block
        assert g.snapshot().reserved == 0
        assert g.balance().total_balance == fake.balance.total_balance


def _works(backend: RedisBackend, fake: FakeLensmor) -> bool:
    try:
        _spends(backend, fake)
    except BalanceUnavailable:  # its pooled connection to the dead primary, at first
        return False
    return True


@pytest.mark.slow
def test_guards_in_two_processes_carry_on_through_a_failover(
    sentinel_group: SentinelGroup,
) -> None:
    # A client from Sentinel.master_for passed in follows the primary too.
    client = Sentinel(sentinel_group.sentinels).master_for(sentinel_group.service)
    given = RedisBackend(client=client, prefix="given:")
    other = FakeLensmor(api_key="sk_test_sentinel_client")
    _spends(given, other)
    cost, k, width, lease = 10, 300, 2, 2.0
    key = "sk_test_sentinel_failover"
    fake = FakeLensmor(subscription_balance=k * cost, gift_balance=0, api_key=key)
    fake.latency = 0.01
    with serve(fake.app) as url:
        barrier = SPAWN.Barrier(3)
        results = SPAWN.Queue()
        args = (sentinel_group.sentinels, sentinel_group.service, url, key, cost, width, lease)
        workers = [
            SPAWN.Process(
                target=redis_workers.spend_through_failover, args=(*args, barrier, results)
            )
            for _ in range(2)
        ]
        for w in workers:
            w.start()
        try:
            barrier.wait(RESULT_TIMEOUT)
            # Mid-run: a third of the account spent, calls in flight in both processes.
            wait_until(lambda: fake.charges >= k // 3, "a third of the account spent")
            charged_before = fake.charges
            killed_at = time.time()
            sentinel_group.kill_primary()
            failover = sentinel_group.wait_failover()
            seen = [results.get(timeout=RESULT_TIMEOUT) for _ in workers]
        finally:
            for w in workers:
                w.join(30)
                if w.is_alive():
                    w.kill()
                    w.join(30)
        # What the new primary holds once a guard of this process has read the balance
        # (which settles the workers' last calls): nothing in flight, nothing reserved.
        backend = RedisBackend(sentinels=sentinel_group.sentinels, service_name="mymaster")
        guard = CreditGuard(key, base_url=url, allow_insecure_http=True, backend=backend)
        try:
            after = guard.balance(refresh=True)
            wait_until(lambda: guard.snapshot().reserved == 0, "stranded leases expired")
            snapshot = guard.snapshot()
        finally:
            guard.close()
            backend.close()
    wait_until(lambda: _works(given, other), "the client passed in on the new primary")
    given.close()
    client.close()
    assert [w.exitcode for w in workers] == [0, 0]
    assert [e for r in seen for e in r["errors"]] == []
    closed = sorted(t for r in seen for t in r["closed"])
    admitted_after = [t for r in seen for t in r["admitted"] if t > killed_at]
    fail_closed = (max(closed) - killed_at) if closed else 0.0
    print(
        f"\nfailover in {failover:.2f} s (sentinels agree); calls failed closed for"
        f" {fail_closed:.2f} s after the kill ({len(closed)} failed calls, retried every"
        f" 20 ms); charges before the kill={charged_before}, after={fake.charges};"
        f" busy={sum(r['busy'] for r in seen)}"
    )
    assert closed, "no call failed closed: the primary was not killed mid-run"
    assert admitted_after, "the guards did not carry on after the failover"
    assert fail_closed < 15.0
    assert sum(r["upstream_refused"] for r in seen) == 0  # never overspent
    assert sum(r["refused"] for r in seen) == 2 * width  # each thread ends on a refusal
    assert fake.charges == k  # every credit spent, no more
    assert fake.balance.total_balance == 0
    assert after.total_balance == 0
    assert (snapshot.reserved, snapshot.in_flight) == (0, 0)
    with redis.Redis(port=sentinel_group.replica.port) as promoted:
        assert promoted.info("replication")["role"] == "master"
