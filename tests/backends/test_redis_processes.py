"""RedisBackend across processes, event loops and outages, against a real redis-server.

* worker processes (``spawn``) race for one account's last credits while the sandbox they
  spend on is served over loopback HTTP by this process;
* a worker killed (SIGKILL) while it holds a reservation: its lease runs out, the credits
  come back and the cached balance is distrusted;
* Redis stopped and started again under a running guard (every ``on_unavailable`` policy,
  ``fallback="memory"``, and a Redis that comes back with its data), and the backend's
  connections given back when it is closed;
* what reaches Redis never contains the API key;
* asyncio and trio sharing one account;
* every key of an account in one cluster slot.

No test skips when Redis cannot start: the ``redis_url`` fixture (or ``RedisServer``)
raises and the test fails. The worker processes' code is in ``tests/redis_workers.py``.
"""

from __future__ import annotations

import base64
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import anyio
import anyio.to_thread
import httpx
import pytest
import redis
from redis.crc import key_slot

from creditguard import (
    AdmissionTimeout,
    AuthenticationError,
    BalanceUnavailable,
    CreditGuard,
    GateTimeout,
    InsufficientCredits,
    current_spend,
)
from creditguard.lensmor.reader import BALANCE_PATH
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor, serve
from creditguard.testing._redis_server import RedisServer
from tests.backends import redis_workers

SPAWN = multiprocessing.get_context("spawn")
JOIN_TIMEOUT = 30.0  # seconds a process gets to exit
RESULT_TIMEOUT = 120.0  # seconds for a worker's first word (its startup included)
PREFIX = "creditguard:"  # RedisBackend's default key prefix
KEY_PARTS = ("state", "res", "lease", "flight")
TEST_TIME_LIMIT = 120  # seconds any one test of this module may run (a few in practice)


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fail a test that runs over ``TEST_TIME_LIMIT`` rather than hang the run: SIGALRM
    interrupts even a blocking socket call in the main thread, and the test's fixtures
    (servers, processes) are then torn down as after any failure."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"the test ran over {TEST_TIME_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def poll(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``check()`` holds, looking every 20 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout} s"
        time.sleep(0.02)


def reap(procs: list[Any]) -> None:
    """Join every process (bounded); kill and join those still running."""
    for proc in procs:
        proc.join(JOIN_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(JOIN_TIMEOUT)


def keys_of(account: str, prefix: str = PREFIX) -> dict[str, str]:
    """The Redis keys of ``account`` by part (the layout of creditguard.backends.redis.scripts)."""
    return {part: f"{prefix}{{{account}}}:{part}" for part in KEY_PARTS}


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def dump(client: redis.Redis) -> dict[str, object]:
    """Every key of the database (SCAN) with its whole value, read by its type."""
    out: dict[str, object] = {}
    for key in client.scan_iter(count=100):
        kind = text(client.type(key))
        value: object
        if kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            value = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        else:
            value = f"<{kind}>"
        out[text(key)] = value
    return out


def account_state(client: redis.Redis, account: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in client.hgetall(keys_of(account)["state"]).items()}


def run_async(backend: RedisBackend, func: Callable[[], Awaitable[None]], lib: str) -> None:
    """Run ``func`` in a new event loop of ``lib`` and close the loop's Redis client in it."""

    async def main() -> None:
        try:
            await func()
        finally:
            await backend.aclose()

    anyio.run(main, backend=lib)


# -- 1. worker processes race for the last credits ---------------------------------------


def test_worker_processes_admit_exactly_what_the_balance_covers(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # 4 processes (two with threads, one with asyncio tasks, one with trio tasks), each
    # making 200 decorated calls of 10 credits, 4 at a time, on a balance of 120 calls.
    procs_n, calls, width, cost, k = 4, 200, 4, 10, 120
    modes = ["threads", "threads", "asyncio", "trio"]
    key = "sk_test_processes_race_1"
    fake = FakeLensmor(subscription_balance=k * cost, gift_balance=0, api_key=key)
    fake.latency = 0.005
    with serve(fake.app) as url:
        barrier = SPAWN.Barrier(procs_n)
        results = SPAWN.Queue()
        workers = [
            SPAWN.Process(
                target=redis_workers.race,
                args=(redis_url, url, key, calls, cost, width, mode, barrier, results),
            )
            for mode in modes
        ]
        for w in workers:
            w.start()
        try:
            seen = [results.get(timeout=RESULT_TIMEOUT) for _ in workers]
        finally:
            reap(workers)
        reads = fake.balance_requests
        # Afterwards, a guard of this process reads the balance: that read settles the
        # workers' last decorated calls, which they left held in Redis.
        backend = RedisBackend(redis_url)
        guard = CreditGuard(key, base_url=url, allow_insecure_http=True, backend=backend)
        try:
            after = guard.balance()
        finally:
            guard.close()
            backend.close()
    assert [w.exitcode for w in workers] == [0] * procs_n
    assert [e for r in seen for e in r["errors"]] == []
    total = procs_n * calls
    admitted = sum(r["ran"] for r in seen)
    refused = sum(r["refused"] for r in seen)
    overspent = sum(r["upstream_refused"] for r in seen)
    print(
        f"\n{total} calls in {procs_n} processes: admitted={admitted} refused={refused}"
        f" overspent={overspent} upstream reads={reads} ({reads / total:.4f} per call)"
        f" slowest call={max(r['slowest'] for r in seen):.2f}s"
        f" admitted by mode={[(r['mode'], r['ran']) for r in seen]}"
    )
    assert admitted == k
    assert refused == total - k
    assert overspent == 0  # the sandbox never refused a charge the guard admitted
    assert fake.charges == k
    assert fake.balance.total_balance == 0  # charged exactly k * cost, never below zero
    # Reads shared across processes: fewer than one per admitted call, and at most one
    # per ten calls (3 to 22 in 800 calls, measured on 2 cores).
    assert reads < k
    assert reads <= total // 10
    assert after.total_balance == 0
    state = account_state(redis_client, guard.account)
    assert (state["reserved"], state["inflight"], state["cached_total"]) == ("0", "0", "0")


@pytest.mark.parametrize(
    ("policy", "balance", "k"),
    [
        ({"allowance": 37 * 10, "subject": "tenant-1"}, 100_000, 37),  # the allowance
        ({"keep": 500}, 500 + 43 * 10, 43),  # the floor
    ],
    ids=["allowance", "keep"],
)
def test_worker_processes_never_pass_an_allowance_or_the_floor(
    redis_url: str, redis_client: redis.Redis, policy: dict[str, Any], balance: int, k: int
) -> None:
    # 4 processes (threads, threads, asyncio, trio), 60 calls of 10 credits each, 4 at a
    # time: exactly k are admitted, whether the allowance or the floor stops them.
    procs_n, calls, width, cost = 4, 60, 4, 10
    modes = ["threads", "threads", "asyncio", "trio"]
    key = f"sk_test_processes_policy_{len(policy)}{k}"
    fake = FakeLensmor(subscription_balance=balance, gift_balance=0, api_key=key)
    fake.latency = 0.002
    with serve(fake.app) as url:
        barrier = SPAWN.Barrier(procs_n)
        results = SPAWN.Queue()
        workers = [
            SPAWN.Process(
                target=redis_workers.race,
                args=(redis_url, url, key, calls, cost, width, mode, barrier, results),
                kwargs={"policy": policy},
            )
            for mode in modes
        ]
        for w in workers:
            w.start()
        try:
            seen = [results.get(timeout=RESULT_TIMEOUT) for _ in workers]
        finally:
            reap(workers)
    assert [w.exitcode for w in workers] == [0] * procs_n
    assert [e for r in seen for e in r["errors"]] == []
    admitted = sum(r["ran"] for r in seen)
    print(f"\n{procs_n * calls} calls with {policy}: admitted={admitted} (limit {k})")
    assert admitted == k
    assert sum(r["refused"] for r in seen) == procs_n * calls - k
    assert sum(r["upstream_refused"] for r in seen) == 0
    assert fake.balance.total_balance == balance - k * cost
    if "keep" in policy:
        assert fake.balance.total_balance == policy["keep"]


# -- 2. a worker killed while it holds a reservation -------------------------------------


def test_a_killed_workers_reservation_comes_back_after_its_lease(
    redis_url: str, redis_client: redis.Redis
) -> None:
    key, lease, held = "sk_test_processes_kill_2", 1.0, 80
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, api_key=key)
    with serve(fake.app) as url:
        backend = RedisBackend(redis_url)
        guard = CreditGuard(
            key,
            base_url=url,
            allow_insecure_http=True,
            backend=backend,
            ttl=60,  # nothing expires by age in this test: only the lease
            admission_timeout=0,
        )
        lease_key = keys_of(guard.account)["lease"]
        parent_conn, child_conn = SPAWN.Pipe()
        worker = SPAWN.Process(
            target=redis_workers.hold_a_spend,
            args=(redis_url, url, key, held, lease, child_conn),
        )
        worker.start()
        try:
            assert parent_conn.poll(RESULT_TIMEOUT), "the worker never admitted its spend"
            assert parent_conn.recv() == ("admitted", 100)
            reads = fake.balance_requests
            assert reads == 1

            # In flight: another guard on the account sees the credits reserved. The
            # account could pay 50 if the worker's call charged nothing: busy, not refused.
            with pytest.raises(AdmissionTimeout) as busy, guard.spend(50):
                pytest.fail("admitted while the worker holds 80 of 100 credits")
            assert (busy.value.available, busy.value.reserved) == (20, held)

            # The worker's renewer keeps the lease alive past its first expiry.
            leases = redis_client.zrange(lease_key, 0, -1, withscores=True)
            [(rid, first_expiry)] = cast(list[tuple[bytes, float]], leases)

            def renewed_past_first_expiry() -> bool:
                seconds, micros = redis_client.time()
                now_ms = seconds * 1000 + micros // 1000
                score = redis_client.zscore(lease_key, rid)
                return now_ms > first_expiry + 100 and score is not None and score > now_ms

            poll(renewed_past_first_expiry, what="the lease renewed past its first expiry")
            with pytest.raises(AdmissionTimeout), guard.spend(50):
                pytest.fail("admitted while a live worker holds its reservation")
            assert fake.balance_requests == reads  # refusals on the cached balance

            worker.kill()
            worker.join(JOIN_TIMEOUT)
            assert worker.exitcode == -signal.SIGKILL
            killed_at = time.monotonic()

            admitted: list[int] = []

            def whole_balance_admitted() -> bool:
                try:
                    with guard.spend(100) as spend:
                        assert spend.balance_before is not None
                        admitted.append(spend.balance_before.total_balance)
                except AdmissionTimeout:
                    return False
                return True

            poll(whole_balance_admitted, what="the credits back after the lease")
            waited = time.monotonic() - killed_at
            guard.balance()  # the read that settles that block (it charged nothing)
        finally:
            reap([worker])
            guard.close()
            backend.close()
    assert admitted == [100]  # the dead worker never charged: all of it is back
    assert waited < 5 * lease + 2
    # The expired lease distrusted the cached balance (its TTL was a minute): read anew.
    assert fake.balance_requests > reads
    assert redis_client.zcard(lease_key) == 0


def test_a_killed_workers_unreported_finish_strands_nothing(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A decorated call's end is told to Redis later (with the process's next admission,
    or by its renewer): a worker killed before it told Redis leaves a spend that Redis
    counts as in flight. Nothing is admitted on its credits meanwhile; its lease runs out
    and they come back, with the cached balance distrusted, so a read decides on what the
    call really spent."""
    key, lease, cost = "sk_test_processes_kill_unreported", 1.0, 80
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, api_key=key)
    with serve(fake.app) as url:
        backend = RedisBackend(redis_url)
        guard = CreditGuard(
            key,
            base_url=url,
            allow_insecure_http=True,
            backend=backend,
            ttl=60,  # nothing expires by age in this test: only the lease
            admission_timeout=0,
        )
        res_key, lease_key = keys_of(guard.account)["res"], keys_of(guard.account)["lease"]
        parent_conn, child_conn = SPAWN.Pipe()
        worker = SPAWN.Process(
            target=redis_workers.finish_unreported,
            args=(redis_url, url, key, cost, lease, child_conn),
        )
        worker.start()
        try:
            assert parent_conn.poll(RESULT_TIMEOUT), "the worker's call never returned"
            assert parent_conn.recv() == ("returned", None)
            assert fake.balance.total_balance == 20  # it charged its 80
            reads = fake.balance_requests
            # Redis was never told that it finished: in flight, its credits reserved.
            [record] = [text(v) for v in redis_client.hvals(res_key)]
            assert record.endswith(":0")
            with pytest.raises(AdmissionTimeout) as busy, guard.spend(50):
                pytest.fail("admitted on credits a finished call spent")
            assert (busy.value.available, busy.value.reserved) == (20, cost)

            worker.kill()
            worker.join(JOIN_TIMEOUT)
            assert worker.exitcode == -signal.SIGKILL
            killed_at = time.monotonic()

            decided: list[object] = []

            def decided_on_a_read() -> bool:
                try:
                    with guard.spend(50):
                        pytest.fail("admitted on credits the dead worker's call spent")
                except AdmissionTimeout:
                    return False
                except InsufficientCredits as exc:
                    decided.append(exc.available)
                return True

            poll(decided_on_a_read, what="the reservation back after the lease")
            waited = time.monotonic() - killed_at
            with guard.spend(20) as spend:  # what is really left is admitted
                assert spend.balance_before is not None
                assert spend.balance_before.total_balance == 20
            assert spend.balance_after is not None  # the read that settles it
        finally:
            reap([worker])
            guard.close()
            backend.close()
    assert decided == [20]
    assert waited < 5 * lease + 2
    assert fake.balance_requests > reads  # the expired lease distrusted the cache
    assert redis_client.zcard(lease_key) == 0
    assert redis_client.hlen(res_key) == 0


# -- 3. Redis stopped and started again under a running guard ----------------------------


def _paid_calls(
    guard: CreditGuard, fake: FakeLensmor, cost: int
) -> tuple[Callable[[], int | None], Callable[[], Awaitable[None]], list[int | None]]:
    """A sync and an async decorated call of ``cost``; each records the total balance
    its admission was decided on (``None``: unchecked) in the returned list."""
    seen: list[int | None] = []

    def before() -> int | None:
        spend = current_spend()
        assert spend is not None
        return None if spend.balance_before is None else spend.balance_before.total_balance

    @guard.requires_credits(cost)
    def paid() -> int | None:
        seen.append(before())
        fake.charge(cost)
        return seen[-1]

    @guard.requires_credits(cost)
    async def apaid() -> None:
        seen.append(before())
        fake.charge(cost)

    return paid, apaid, seen


@pytest.fixture
def restartable() -> Iterator[RedisServer]:
    """A redis-server of this test alone, to stop and start again on the same port."""
    with RedisServer() as server:
        yield server


def test_redis_restarted_deny(restartable: RedisServer) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0, api_key="sk_test_restart_deny")
    backend = RedisBackend(restartable.url)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, ttl=60)
    paid, apaid, _ = _paid_calls(guard, fake, 10)
    try:
        paid()
        run_async(backend, apaid, "asyncio")
        port = restartable.port
        restartable.stop()

        with pytest.raises(BalanceUnavailable, match=r"^Redis is unavailable"):
            paid()
        for lib in ("asyncio", "trio"):
            with pytest.raises(BalanceUnavailable, match=r"^Redis is unavailable"):
                run_async(backend, apaid, lib)
        with pytest.raises(BalanceUnavailable, match="Redis"), guard.spend(10):
            pytest.fail("admitted without Redis under on_unavailable='deny'")
        with pytest.raises(BalanceUnavailable, match="Redis"):
            guard.balance()
        assert fake.charges == 2  # nothing ran during the outage

        restartable.start()
        assert restartable.port == port
        # The same guard and backend: the client reconnects, the scripts load again.
        paid()
        for lib in ("asyncio", "trio"):
            run_async(backend, apaid, lib)
        with guard.spend(10) as spend:
            fake.charge(10)
        assert spend.balance_after is not None
        assert spend.balance_after.total_balance == fake.balance.total_balance == 1000 - 60
        assert fake.charges == 6
    finally:
        guard.close()
        backend.close()


def test_redis_restarted_allow(restartable: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0, api_key="sk_test_restart_allow")
    backend = RedisBackend(restartable.url)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, backend=backend, ttl=60, on_unavailable="allow"
    )
    paid, apaid, seen = _paid_calls(guard, fake, 10)
    try:
        paid()
        restartable.stop()
        with caplog.at_level(logging.WARNING, logger="creditguard"):
            paid()
            run_async(backend, apaid, "asyncio")
            run_async(backend, apaid, "trio")
        assert seen == [1000, None, None, None]  # run unchecked
        assert "unchecked" in caplog.text
        assert "Redis is unavailable" in caplog.text
        restartable.start()
        paid()
        run_async(backend, apaid, "trio")
        # Checked again: the restarted Redis knows nothing, so a fresh read (after the
        # outage's 30 unchecked credits); the next call admitted on that cached read.
        assert seen[4:] == [960, 960]
        assert fake.charges == 6
    finally:
        guard.close()
        backend.close()


def test_redis_restarted_fallback_memory(
    restartable: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, api_key="sk_test_restart_mem")
    backend = RedisBackend(restartable.url, fallback="memory")
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, ttl=60)
    paid, apaid, seen = _paid_calls(guard, fake, 30)
    client = redis.Redis.from_url(restartable.url)
    state_key = keys_of(guard.account)["state"]
    try:
        assert guard.balance().total_balance == 100
        restartable.stop()
        with caplog.at_level(logging.WARNING, logger="creditguard"):
            paid()
            run_async(backend, apaid, "asyncio")
            paid()
            # Still checked, against this process's own state: 10 left.
            with pytest.raises(InsufficientCredits) as refused:
                paid()
        assert refused.value.available == 10
        assert seen == [100, 100, 100]  # all admitted on the read the fallback made
        assert fake.charges == 3
        assert "fallback='memory'" in caplog.text
        assert "Redis is unavailable" in caplog.text

        restartable.start()
        # Redis is tried again a moment after the outage: the fallback's reads stop
        # and the balance is read into Redis.
        poll(lambda: guard.balance() is not None and client.exists(state_key) == 1)
        assert guard.balance().total_balance == 10

        @guard.requires_credits(10)
        def small() -> int | None:
            spend = current_spend()
            assert spend is not None
            assert spend.balance_before is not None
            fake.charge(10)
            return spend.balance_before.total_balance

        assert small() == 10  # admitted through Redis
        assert account_state(client, guard.account)["inflight"] == "1"
        with pytest.raises(InsufficientCredits):
            small()
        assert fake.balance.total_balance == 0
    finally:
        client.close()
        guard.close()
        backend.close()


@pytest.mark.parametrize("policy", ["allow", "fallback"])
def test_spends_outside_redis_are_not_forgotten_when_it_comes_back(
    restartable: RedisServer, policy: str
) -> None:
    """Redis comes back *with its data* (a failover, a restart from a snapshot, a network
    partition): the balance it had cached does not include what this process spent while
    it could not reach it (unchecked under ``on_unavailable="allow"``, or admitted on its
    own state under ``fallback="memory"``), so it must not be trusted any more."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, api_key="sk_test_restart_data")
    if policy == "allow":
        backend = RedisBackend(restartable.url)
        guard = CreditGuard(
            fake.api_key,
            transport=fake.transport,
            backend=backend,
            ttl=60,
            on_unavailable="allow",
        )
    else:
        backend = RedisBackend(restartable.url, fallback="memory")
        guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, ttl=60)
    paid, _, seen = _paid_calls(guard, fake, 30)
    client = redis.Redis.from_url(restartable.url)
    try:
        assert guard.balance().total_balance == 100  # cached in Redis for a minute
        client.save()  # the restarted server loads this snapshot
        restartable.stop()
        for _ in range(3):
            paid()
        assert fake.balance.total_balance == 10
        restartable.start()
        assert account_state(client, guard.account)["cached_total"] == "100"
        # Past the fallback's short grace period (about a second), Redis is asked again.
        poll(lambda: _redis_answers(guard), what="Redis in use again")
        ran = len(seen)
        with pytest.raises(InsufficientCredits):
            paid()
        assert len(seen) == ran, (
            f"admitted on the balance Redis cached before the outage ({seen[-1]}), which"
            " does not include the 90 credits spent meanwhile: the paid call ran and was"
            " refused upstream"
        )
    finally:
        client.close()
        guard.close()
        backend.close()


def _redis_answers(guard: CreditGuard) -> bool:
    """Whether the guard's account answers from Redis again (not from ``fallback="memory"``
    a moment after a failure)."""
    account: Any = guard._account
    return account._degraded() is None


def test_closing_the_backend_closes_its_connections(restartable: RedisServer) -> None:
    """``close()`` and ``aclose()`` give back the connections the backend opened (to its
    own clients: the sync one, and the running loop's asyncio one), not only at GC."""
    admin = redis.Redis.from_url(restartable.url)

    def open_elsewhere() -> list[dict[str, Any]]:
        mine = admin.client_id()
        return [c for c in admin.client_list() if int(c["id"]) != mine]

    fake = FakeLensmor(api_key="sk_test_close_conns")
    sync_backend = RedisBackend(restartable.url)
    loop_backend = RedisBackend(restartable.url)
    guards = [
        CreditGuard(fake.api_key, transport=fake.transport, backend=b, ttl=60)
        for b in (sync_backend, loop_backend)
    ]
    try:
        guards[0].balance(refresh=True)

        opened: list[int] = []

        async def in_asyncio() -> None:
            await guards[1].abalance(refresh=True)  # this loop's asyncio client
            guards[1].balance(refresh=True)  # and the backend's sync client
            opened.append(len(open_elsewhere()))
            await loop_backend.aclose()  # in the loop whose client it closes

        anyio.run(in_asyncio)
        sync_backend.close()
        assert opened == [3]  # one connection for each client used
        try:
            poll(lambda: open_elsewhere() == [], timeout=2, what="connections closed")
        except AssertionError:
            left = [(c["id"], c["cmd"]) for c in open_elsewhere()]
            raise AssertionError(f"still open after close()/aclose(): {left}") from None
    finally:
        for guard in guards:
            guard.close()
        sync_backend.close()
        loop_backend.close()
        admin.close()


# -- 4. the API key never reaches Redis --------------------------------------------------

SECRET_KEYS = {
    "sync": "sk_live_NEVERinREDIS_sync_q8Z3wK",
    "asyncio": "sk_live_NEVERinREDIS_aio_m4T7pX",
    "trio": "sk_live_NEVERinREDIS_trio_v2R9cH",
    "view": "sk_live_NEVERinREDIS_view_b6N1yJ",
    "rejected": "sk_live_NEVERinREDIS_rejected_f5L0dG",
}


def _sync_activity(guard: CreditGuard, fake: FakeLensmor) -> None:
    http = httpx.Client(
        transport=fake.transport,
        base_url="http://sandbox.test",
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )

    @guard.requires_credits(10)
    def paid() -> None:
        fake.charge(10)

    with http:
        for _ in range(3):
            paid()
        with guard.spend(20) as block:
            fake.charge(20)
        assert block.balance_after is not None  # settles it: the next block is alone
        with guard.spend(2000) as spend:  # settled from the unlock's own report
            spend.report(http.post("/external/events/ev-sync/unlock"))
        assert spend.charged == 2000
        with pytest.raises(InsufficientCredits), guard.spend(10**6):
            pytest.fail("admitted beyond the balance")
        guard.balance(refresh=True)


async def _async_activity(guard: CreditGuard, fake: FakeLensmor, event: str) -> None:
    http = httpx.AsyncClient(
        transport=fake.transport,
        base_url="http://sandbox.test",
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )

    @guard.requires_credits(10)
    async def paid() -> None:
        fake.charge(10)

    async with http:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(paid)
        async with guard.spend(20) as block:
            fake.charge(20)
        assert await block.abalance_after() is not None  # the next block is alone
        async with guard.spend(2000) as spend:
            spend.report(await http.post(f"/external/events/{event}/unlock"))
        assert spend.charged == 2000
        with pytest.raises(InsufficientCredits):
            async with guard.spend(10**6):
                pytest.fail("admitted beyond the balance")
        await guard.abalance(refresh=True)


def _gate_times_out(guard: CreditGuard) -> None:
    with pytest.raises(GateTimeout), guard.spend(1):
        pytest.fail("two turns at a gate of one")


def test_no_redis_key_or_value_contains_the_api_key(
    redis_url: str, redis_client: redis.Redis
) -> None:
    fakes = {name: FakeLensmor(api_key=key) for name, key in SECRET_KEYS.items()}
    backend = RedisBackend(redis_url)
    guards = {
        name: CreditGuard(fakes[name].api_key, transport=fakes[name].transport, backend=backend)
        for name in ("sync", "asyncio", "trio")
    }
    # A view for another key (sharing the trio guard's configuration and transport, whose
    # sandbox accepts that key for a moment), and a key the sandbox refuses.
    fakes["trio"].api_key = SECRET_KEYS["view"]
    view = guards["trio"].for_key(SECRET_KEYS["view"])
    view_balance = view.balance().total_balance
    fakes["trio"].api_key = SECRET_KEYS["trio"]
    rejected = guards["sync"].for_key(SECRET_KEYS["rejected"])
    accounts = [g.account for g in guards.values()] + [view.account, rejected.account]
    try:
        _sync_activity(guards["sync"], fakes["sync"])
        run_async(
            backend, lambda: _async_activity(guards["asyncio"], fakes["asyncio"], "ev-a"), "asyncio"
        )
        run_async(backend, lambda: _async_activity(guards["trio"], fakes["trio"], "ev-t"), "trio")
        with pytest.raises(AuthenticationError), rejected.spend(10):
            pytest.fail("admitted with a key the sandbox refuses")
        with pytest.raises(AuthenticationError):
            rejected.balance(refresh=True)
        # Dumped with a reservation held (its id in the reservations and the leases), a
        # hold open, a gate turn taken and a caller queued for one.
        gated = CreditGuard(
            fakes["sync"].api_key,
            transport=fakes["sync"].transport,
            backend=backend,
            max_concurrent=1,
            gate_timeout=0.05,
        )
        hold = guards["sync"].hold(15)
        with gated.spend(10):
            fakes["sync"].charge(10)
            queued = threading.Thread(target=_gate_times_out, args=(gated,))
            queued.start()
            queued.join()
            contents = dump(redis_client)
        hold.release()
        gated.close()
    finally:
        for guard in guards.values():
            guard.close()
        backend.close()
    assert view_balance == 30050
    assert len(contents) > 5
    everything = repr(contents)
    for account in accounts[:4]:  # every account that read a balance is there, by hash
        assert account in everything
    assert any(":res" in k for k in contents)
    assert any(":lease" in k for k in contents)
    assert any(":hold:" in k for k in contents)
    assert any(k.endswith(":gate") for k in contents)
    for key in SECRET_KEYS.values():
        for form in (key, key.encode().hex(), base64.b64encode(key.encode()).decode()):
            assert form not in everything
    for fragment in ("NEVERinREDIS", "sk_live", "Bearer", "Authorization"):
        assert fragment not in everything
    for key in contents:
        assert "NEVERinREDIS" not in key


# -- 5. asyncio and trio on one account --------------------------------------------------


async def _loop_spends(
    guard: CreditGuard,
    url: str,
    key: str,
    tasks: int,
    calls: int,
    cost: int,
    start: threading.Barrier,
) -> dict[str, Any]:
    tally: dict[str, Any] = {"ran": 0, "refused": 0, "upstream_refused": 0, "errors": []}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:

        async def charge() -> None:
            tally["ran"] += 1
            response = await http.post(redis_workers.CHARGE_PATH, params={"credits": cost})
            if response.status_code == 402:
                tally["upstream_refused"] += 1
            response.raise_for_status()

        paid = guard.requires_credits(cost)(charge)

        async def run(i: int) -> None:
            for j in range(calls):
                try:
                    if (i + j) % 2:
                        await paid()  # decorated: settles at a later read
                    else:
                        async with guard.spend(cost):  # settles before the block exits
                            await charge()
                except InsufficientCredits:
                    tally["refused"] += 1
                except Exception as exc:
                    tally["errors"].append(repr(exc))

        await anyio.to_thread.run_sync(start.wait, 30)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(tasks):
                    tg.start_soon(run, i)
    return tally


def test_asyncio_and_trio_share_one_account(redis_url: str, redis_client: redis.Redis) -> None:
    k, cost, tasks, calls = 50, 10, 6, 15
    key = "sk_test_loops_share_5"
    fake = FakeLensmor(subscription_balance=k * cost, gift_balance=0, api_key=key)
    fake.latency = 0.005
    results: dict[str, Any] = {}
    with serve(fake.app) as url:
        backend = RedisBackend(redis_url)
        # One guard, used from an asyncio loop and a trio loop at once (two threads).
        guard = CreditGuard(key, base_url=url, allow_insecure_http=True, backend=backend, ttl=60)
        start = threading.Barrier(2)
        trio_done = threading.Event()

        async def in_asyncio() -> None:
            try:
                results["asyncio"] = await _loop_spends(guard, url, key, tasks, calls, cost, start)
            finally:
                # Close this loop's Redis client once trio no longer needs the backend.
                await anyio.to_thread.run_sync(trio_done.wait, 60)
                await backend.aclose()

        async def in_trio() -> None:
            try:
                results["trio"] = await _loop_spends(guard, url, key, tasks, calls, cost, start)
            finally:
                trio_done.set()

        def loop(lib: str, main: Callable[[], Awaitable[None]]) -> None:
            try:
                anyio.run(main, backend=lib)
            except BaseException as exc:
                results[lib + " failed"] = repr(exc)
                trio_done.set()

        threads = [
            threading.Thread(target=loop, args=("asyncio", in_asyncio)),
            threading.Thread(target=loop, args=("trio", in_trio)),
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(90)
            assert not any(thread.is_alive() for thread in threads)
            assert set(results) == {"asyncio", "trio"}, results
            after = guard.balance()  # settles the decorated calls still held
        finally:
            guard.close()
            backend.close()
    tallies = list(results.values())
    assert [e for t in tallies for e in t["errors"]] == []
    total = 2 * tasks * calls
    assert sum(t["ran"] for t in tallies) == k
    assert sum(t["refused"] for t in tallies) == total - k
    assert sum(t["upstream_refused"] for t in tallies) == 0
    assert fake.charges == k
    assert fake.balance.total_balance == after.total_balance == 0
    state = account_state(redis_client, guard.account)
    assert (state["reserved"], state["inflight"]) == ("0", "0")
    assert state["cached_total"] == "0"
    account_keys = keys_of(guard.account)
    assert redis_client.hlen(account_keys["res"]) == 0
    assert redis_client.zcard(account_keys["lease"]) == 0


# -- 6. every key of an account in one cluster slot --------------------------------------


class _GatedReads(httpx.BaseTransport):
    """The sandbox's transport, with balance reads held at a gate while it is armed."""

    def __init__(self, fake: FakeLensmor) -> None:
        self.fake = fake
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.armed and request.url.path == BALANCE_PATH:
            self.entered.set()
            self.release.wait(10)
        return self.fake.transport.handle_request(request)


def _keys_with_a_read_in_flight(
    redis_url: str, client: redis.Redis, prefix: str, key: str
) -> tuple[str, set[str]]:
    """Make every key of one account exist at once (a reservation held, a balance read in
    flight); its fingerprint and the keys SCAN finds."""
    fake = FakeLensmor(api_key=key)
    gate = _GatedReads(fake)
    backend = RedisBackend(redis_url, prefix=prefix)
    guard = CreditGuard(key, transport=gate, backend=backend, ttl=60)
    try:
        with guard.spend(10):
            gate.armed = True
            reader = threading.Thread(target=guard.balance, kwargs={"refresh": True})
            reader.start()
            try:
                assert gate.entered.wait(10), "the balance read never started"
                keys = {text(k) for k in client.scan_iter(count=100)}
            finally:
                gate.release.set()
                reader.join(10)
            assert not reader.is_alive()
    finally:
        guard.close()
        backend.close()
    return guard.account, keys


@pytest.mark.parametrize("prefix", [PREFIX, "myapp:cg:", "tenant{7}:", "cg{}:"])
def test_every_key_of_an_account_is_in_one_cluster_slot(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    try:
        RedisBackend(redis_url, prefix=prefix).close()
    except ValueError:
        return  # a prefix that would split an account across slots may be refused
    found: dict[str, set[str]] = {}
    for key in ("sk_test_slot_one_6", "sk_test_slot_two_6"):
        account, keys = _keys_with_a_read_in_flight(redis_url, redis_client, prefix, key)
        found[account] = {k for k in keys if account in k}
    for account, keys in found.items():
        assert keys == set(keys_of(account, prefix).values())  # all four, all there
        slots = {key_slot(k.encode()) for k in keys}
        assert len(slots) == 1, f"prefix {prefix!r}: the keys of one account span {slots}"
