"""RedisBackend on a real Redis Cluster (three masters started by the session's
``redis_cluster`` fixture), and the checks of its arguments that need no Redis at all.

* accounts land in different slots (and nodes), each account's keys in one slot;
* the scripts are loaded on every primary, and loaded again after a node restarts;
* a slot moved to another node (``MOVED``) is followed, by the sync client and by an
  asyncio ``RedisCluster`` passed in, with what was in flight kept;
* two processes racing on one account never overspend;
* contradictory arguments are refused before any network call, and a password in a URL
  never shows in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

from creditguard import Allowance, AllowanceExceeded, BalanceUnavailable, CreditGuard
from creditguard.backends.redis.scripts import SHAS
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor, serve
from creditguard.testing._redis_topologies import ClusterNodes
from tests.backends import redis_workers

SPAWN = multiprocessing.get_context("spawn")
RESULT_TIMEOUT = 120.0


def poll(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``check()`` holds (a check that raises ``BalanceUnavailable`` counts as
    not yet), looking every 20 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except BalanceUnavailable:
            pass
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout} s"
        time.sleep(0.02)


@pytest.fixture
def cluster_backend(redis_cluster: ClusterNodes) -> Iterator[RedisBackend]:
    backend = RedisBackend(redis_cluster.url, cluster=True, prefix=f"c{time.time_ns()}:")
    yield backend
    backend.close()


def _node_clients(nodes: ClusterNodes) -> list[redis.Redis]:
    return [redis.Redis(port=port) for port in nodes.ports]


def _keys_by_node(nodes: ClusterNodes, prefix: str) -> list[list[str]]:
    found = []
    for client in _node_clients(nodes):
        with client:
            found.append(sorted(k.decode() for k in client.scan_iter(match=prefix + "*")))
    return found


def _tag(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


def test_accounts_land_in_different_slots_each_accounts_keys_in_one(
    redis_cluster: ClusterNodes, cluster_backend: RedisBackend
) -> None:
    fakes = [FakeLensmor(api_key=f"sk_test_cluster_slots_{i}") for i in range(8)]
    for fake in fakes:
        with CreditGuard(fake.api_key, transport=fake.transport, backend=cluster_backend) as g:
            with g.spend(10):
                pass
            g.hold(5, expires_in=60).release()

    async def spend_async(fake: FakeLensmor) -> None:
        guard = CreditGuard(fake.api_key, transport=fake.transport, backend=cluster_backend)
        async with guard, guard.spend(10):
            pass
        await cluster_backend.aclose()

    asyncio.run(spend_async(fakes[0]))
    by_node = _keys_by_node(redis_cluster, cluster_backend.prefix)
    slots: dict[str, set[int]] = {}
    nodes: dict[str, set[int]] = {}
    for index, keys in enumerate(by_node):
        for key in keys:
            slots.setdefault(_tag(key), set()).add(key_slot(key.encode()))
            nodes.setdefault(_tag(key), set()).add(index)
    assert len(slots) == len(fakes)  # every account has keys
    assert all(len(s) == 1 for s in slots.values()), slots  # each in one slot...
    assert all(len(n) == 1 for n in nodes.values()), nodes  # ...on one node
    assert len({next(iter(s)) for s in slots.values()}) == len(fakes)  # different slots
    assert len({next(iter(n)) for n in nodes.values()}) >= 2  # spread over the nodes


def test_scripts_are_loaded_on_every_node_and_again_after_a_restart(
    redis_cluster: ClusterNodes, cluster_backend: RedisBackend
) -> None:
    fake = FakeLensmor(api_key="sk_test_cluster_scripts")
    with CreditGuard(fake.api_key, transport=fake.transport, backend=cluster_backend) as g:
        # A hold's admission runs "admit", its settle "finish" (both in this thread: a
        # block's end would be told to Redis later, maybe by the renewer's thread).
        g.hold(10).settle()
        for client in _node_clients(redis_cluster):
            with client:
                assert client.script_exists(SHAS["admit"], SHAS["finish"]) == [True, True]
        slot = key_slot(f"{cluster_backend.prefix}{{{g.account}}}:state".encode())
        owner = redis_cluster.owner(slot)
        redis_cluster.restart_node(owner)  # its keys and scripts are gone
        with redis.Redis(port=redis_cluster.ports[owner]) as client:
            assert client.script_exists(SHAS["admit"]) == [False]

        def spends() -> bool:
            with g.spend(10):
                pass
            return True

        # The first call may find the restarted node's connection broken (and fail
        # closed); the next ones run its scripts, loaded again after NOSCRIPT.
        poll(spends, what="a spend on the restarted node")
        with redis.Redis(port=redis_cluster.ports[owner]) as client:
            assert client.script_exists(SHAS["admit"]) == [True]
        g.balance()  # the read that settles the blocks
        assert g.snapshot().reserved == 0
    assert fake.charges == 0  # spends with no paid call in them


def test_a_moved_slot_is_followed(
    redis_cluster: ClusterNodes, cluster_backend: RedisBackend
) -> None:
    fake = FakeLensmor(api_key="sk_test_cluster_moved")

    async def main() -> None:
        client = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster.url)
        backend = RedisBackend(
            redis_cluster.url, cluster=True, async_client=client, prefix=cluster_backend.prefix
        )
        try:
            async with CreditGuard(fake.api_key, transport=fake.transport, backend=backend) as g:
                async with g.spend(10) as first:
                    pass
                assert await first.abalance_after() is not None  # settled
                redis_cluster.move_slot(slot, (redis_cluster.owner(slot) + 1) % 3)
                async with g.spend(10):  # MOVED, followed by the asyncio client
                    assert (await g.asnapshot()).reserved == 10
        finally:
            await client.aclose()
            backend.close()

    with CreditGuard(fake.api_key, transport=fake.transport, backend=cluster_backend) as g:
        slot = key_slot(f"{cluster_backend.prefix}{{{g.account}}}:state".encode())
        spend = g.spend(25)
        spend.__enter__()
        before = redis_cluster.owner(slot)
        assert redis_cluster.move_slot(slot, (before + 1) % 3) == before
        # The sync client still maps the slot to the old node: MOVED, followed, and the
        # reservation in flight moved with the keys.
        assert g.snapshot().reserved == 25
        spend.__exit__(None, None, None)
        assert spend.balance_after is not None  # the read that settles it
        assert g.snapshot().reserved == 0
        asyncio.run(main())
        moved_to = redis_cluster.owner(slot)
        keys = _keys_by_node(redis_cluster, cluster_backend.prefix)[moved_to]
        assert f"{cluster_backend.prefix}{{{g.account}}}:state" in keys
        with g.spend(10) as spend:  # and the sync client once more, after the second move
            pass
        assert spend.balance_after is not None
        assert g.snapshot().reserved == 0


def test_two_processes_racing_on_one_account_never_overspend(
    redis_cluster: ClusterNodes,
) -> None:
    # 2 processes (threads and asyncio), 120 calls each of 10 credits, 4 at a time, on a
    # balance of 90 calls.
    calls, width, cost, k = 120, 4, 10, 90
    key = "sk_test_cluster_race"
    prefix = f"race{time.time_ns()}:"
    fake = FakeLensmor(subscription_balance=k * cost, gift_balance=0, api_key=key)
    fake.latency = 0.005
    options = {"cluster": True, "prefix": prefix}
    with serve(fake.app) as url:
        barrier = SPAWN.Barrier(2)
        results = SPAWN.Queue()
        workers = [
            SPAWN.Process(
                target=redis_workers.race,
                args=(redis_cluster.url, url, key, calls, cost, width, mode, barrier, results),
                kwargs={"options": options},
            )
            for mode in ("threads", "asyncio")
        ]
        for w in workers:
            w.start()
        try:
            seen = [results.get(timeout=RESULT_TIMEOUT) for _ in workers]
        finally:
            for w in workers:
                w.join(30)
                if w.is_alive():
                    w.kill()
                    w.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    assert [e for r in seen for e in r["errors"]] == []
    assert sum(r["upstream_refused"] for r in seen) == 0  # never overspent
    assert sum(r["ran"] for r in seen) == k
    assert fake.charges == k
    assert fake.balance.total_balance == 0


# -- arguments, checked before any network call ------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (
            {"cluster": True, "sentinels": [("127.0.0.1", 26379)], "service_name": "m"},
            ValueError,
            "two different deployments",
        ),
        ({"sentinels": [("127.0.0.1", 26379)]}, ValueError, "needs service_name"),
        ({"service_name": "mymaster", "url": "redis://127.0.0.1:1/0"}, ValueError, "sentinels"),
        (
            {"sentinels": [("127.0.0.1", 26379)], "service_name": "m", "url": "redis://h:1"},
            ValueError,
            "pass no url",
        ),
        ({"sentinels": "127.0.0.1:26379", "service_name": "m"}, TypeError, "(host, port)"),
        ({"sentinels": [], "service_name": "m"}, ValueError, "at least one"),
        ({"sentinels": [("127.0.0.1", 0)], "service_name": "m"}, ValueError, "port"),
        ({"sentinels": [("127.0.0.1", 26379)], "service_name": ""}, ValueError, "service_name"),
        ({"url": "redis://127.0.0.1:1/0", "cluster": "yes"}, TypeError, "cluster must be"),
        ({"url": "unix:///tmp/r.sock", "cluster": True}, ValueError, "cluster=True needs"),
        ({"client": redis.Redis(port=1), "cluster": True}, TypeError, "RedisCluster"),
    ],
)
def test_bad_combinations_are_refused_before_any_network_call(
    kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    # Nothing listens on port 1 nor 26379 here: an error that needed the network would be
    # a ConnectionError, not these.
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        RedisBackend(**kwargs)  # type: ignore[arg-type]


def test_a_password_in_the_url_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-pa55word"
    with pytest.raises(ValueError, match="cluster=True needs") as refused:
        RedisBackend(f"http://user:{secret}@127.0.0.1:1/0", cluster=True)
    assert secret not in str(refused.value)
    fake = FakeLensmor()
    caplog.set_level(logging.DEBUG)
    for cluster in (False, True):
        backend = RedisBackend(f"redis://user:{secret}@127.0.0.1:1/0", cluster=cluster)
        assert secret not in repr(backend)
        g = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
        with g, pytest.raises(BalanceUnavailable) as failed:
            g.balance()
        backend.close()
        shown = f"{failed.value} {failed.value.__cause__!r} {caplog.text}"
        assert "Redis is unavailable" in str(failed.value)
        assert secret not in shown


def test_allowance_windows_live_in_their_accounts_slot(
    redis_cluster: ClusterNodes, cluster_backend: RedisBackend
) -> None:
    fakes = [FakeLensmor(api_key=f"sk_test_cluster_allowance_{i}") for i in range(4)]
    for fake in fakes:
        guard = CreditGuard(
            fake.api_key,
            transport=fake.transport,
            backend=cluster_backend,
            allowance=Allowance(25),
            keep=10,
        )
        with guard:
            for user in ("alice", "bob@example.com"):
                with guard.spend(10, subject=user):
                    pass
                with guard.spend(10, subject=user):
                    pass
                with pytest.raises(AllowanceExceeded), guard.spend(10, subject=user):
                    pass
                assert guard.usage(user).spent == 20
    by_node = _keys_by_node(redis_cluster, cluster_backend.prefix)
    windows = [key for keys in by_node for key in keys if ":w:" in key]
    assert len(windows) == 2 * len(fakes)
    slots: dict[str, set[int]] = {}
    for keys in by_node:
        for key in keys:
            slots.setdefault(_tag(key), set()).add(key_slot(key.encode()))
    assert all(len(s) == 1 for s in slots.values()), slots
    assert not any("alice" in key or "example.com" in key for key in windows)
