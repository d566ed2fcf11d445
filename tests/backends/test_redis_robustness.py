"""The Redis backend when things go wrong: Redis forgets (a restart, a flush, an evicted
key), callers are cancelled mid-script (asyncio's own cancellation included), durations
at the edge of what a script can print, renewals racing with holds, idle keys, and no
``sniffio``. Against the session's real redis-server."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis

from creditguard import AdmissionTimeout, AuthenticationError, CreditGuard
from creditguard.backends.redis.gate import RedisGate
from creditguard.backends.redis.leases import check_eviction
from creditguard.backends.redis.scripts import RedisAccountState
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor


def fresh_prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def backends(redis_url: str) -> Iterator[list[RedisBackend]]:
    """Backends a test makes (one per simulated process), closed after it."""
    made: list[RedisBackend] = []
    yield made
    for backend in made:
        backend.close()


def _backend(made: list[RedisBackend], url: str, prefix: str, **kw: object) -> RedisBackend:
    backend = RedisBackend(url, prefix=prefix, **kw)  # type: ignore[arg-type]
    made.append(backend)
    return backend


def _keys(client: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode() for k in client.keys(prefix + "*"))


# -- sniffio -----------------------------------------------------------------------------


def test_the_redis_backend_needs_no_sniffio(redis_url: str) -> None:
    """``pip install 'creditguard[redis]'`` brings no sniffio: importing and using the
    backend from asyncio must not need it."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["sniffio"] = None  # import sniffio now raises ImportError
        import asyncio
        from creditguard import CreditGuard
        from creditguard.redis import RedisBackend
        from creditguard.testing import FakeLensmor

        fake = FakeLensmor(subscription_balance=100, gift_balance=0)
        backend = RedisBackend({redis_url!r}, prefix={fresh_prefix("sniffio")!r})
        guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)

        @guard.requires_credits(30)
        async def unlock() -> None:
            fake.charge(30)

        async def main() -> None:
            await unlock()
            print((await guard.abalance()).total_balance)
            await backend.aclose()

        asyncio.run(main())
        assert "sniffio" not in sys.modules or sys.modules["sniffio"] is None
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["70"]


# -- durations (item 10) -----------------------------------------------------------------


@pytest.mark.parametrize("lease", [sys.maxsize, 1e10, float("inf"), float("nan")])
def test_a_lease_past_max_seconds_is_refused(redis_url: str, lease: float) -> None:
    with pytest.raises(ValueError, match="lease"):
        RedisBackend(redis_url, lease=lease)


def test_the_longest_lease_and_hold_expire_in_the_future(
    redis_url: str, redis_client: redis.Redis, backends: list[RedisBackend]
) -> None:
    from creditguard.core.checks import MAX_SECONDS

    prefix = fresh_prefix("longest")
    backend = _backend(backends, redis_url, prefix, lease=MAX_SECONDS)
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    with pytest.raises(ValueError, match="expires_in"):
        guard.hold(10, expires_in=sys.maxsize)
    now_ms = int(redis_client.time()[0]) * 1000
    hold = guard.hold(10, expires_in=MAX_SECONDS)
    with guard.spend(20):
        lease_key = f"{prefix}{{{guard._account.fingerprint}}}:lease"
        scores = [score for _, score in redis_client.zrange(lease_key, 0, -1, withscores=True)]
        assert len(scores) == 2
        assert all(score >= now_ms + MAX_SECONDS * 1000 for score in scores)
    assert guard.snapshot().holds == 1
    hold.release()
    assert guard.snapshot().holds == 0


def test_the_renewer_never_dies(
    redis_url: str, backends: list[RedisBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _backend(backends, redis_url, fresh_prefix("renewer"), lease=0.3)
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    restore = RedisAccountState.restore
    calls: list[int] = []
    survived = threading.Event()

    def failing_once(self: RedisAccountState, held: list[tuple[str, int]]) -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("something unexpected")
        survived.set()
        return restore(self, held)

    monkeypatch.setattr(RedisAccountState, "restore", failing_once)
    with guard.spend(10):
        assert survived.wait(30), "the renewer died of an exception"
    renewer = backend._renewer
    assert renewer is None or renewer.is_alive()


# -- renewals never shorten (item 12) ----------------------------------------------------


def test_a_renewal_never_cuts_a_hold_short(
    redis_url: str, redis_client: redis.Redis, backends: list[RedisBackend]
) -> None:
    """The renewer's list of reservations may be taken just before one becomes a hold:
    its renewal must not bring the hold's expiry back to one lease."""
    prefix = fresh_prefix("hold-renew")
    backend = _backend(backends, redis_url, prefix, lease=60)
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    hold = guard.hold(10, expires_in=600)
    state = RedisAccountState(redis_client, None, prefix, guard._account.fingerprint, 60_000)
    before = redis_client.zscore(state.keys[2], hold.id)
    assert before is not None
    assert state.renew([hold.id]) == 1  # what a renewal from a stale list does
    assert state.restore([(hold.id, 10)]) == []
    assert redis_client.zscore(state.keys[2], hold.id) == before
    [open_hold] = guard.snapshot().open_holds
    assert open_hold.expires_at == pytest.approx(before / 1000)
    hold.release()


def test_a_turn_renewal_never_cuts_a_holds_turn_short(redis_client: redis.Redis) -> None:
    gate = RedisGate(redis_client, None, fresh_prefix("turns"), "acct")
    assert gate.enter("held", 1, 600_000, 5_000) == 0
    key = gate.gate_keys[0]
    before = redis_client.zscore(key, "held")
    gate.renew_turns(["held"], 100)
    assert redis_client.zscore(key, "held") == before


# -- Redis forgets (items 6 and 7) -------------------------------------------------------


def _two_processes(
    redis_url: str, backends: list[RedisBackend]
) -> tuple[FakeLensmor, CreditGuard, CreditGuard, str]:
    """Guards of two processes on one account of 100 (the second may not wait)."""
    prefix = fresh_prefix("forgets")
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    first = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=_backend(backends, redis_url, prefix),
        ttl=60,
    )
    second = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=_backend(backends, redis_url, prefix),
        ttl=60,
        admission_timeout=0,
    )
    return fake, first, second, prefix


def test_a_flush_does_not_forget_the_reservations_in_flight(
    redis_url: str, redis_client: redis.Redis, backends: list[RedisBackend]
) -> None:
    fake, first, second, _ = _two_processes(redis_url, backends)
    with first.spend(60) as spend:
        redis_client.flushdb()  # a restart without persistence forgets as much
        backend = first._clients.backend
        assert isinstance(backend, RedisBackend)
        backend.renew_once()  # what its renewer does every third of a lease
        assert second.snapshot().reserved == 60
        with pytest.raises(AdmissionTimeout), second.spend(60):
            pytest.fail("admitted 60 while 60 are in flight on 100")
        fake.charge(60)
    assert spend.balance_after is not None  # the first process's read: it settles the block
    assert spend.balance_after.total_balance == 40
    snap = second.snapshot()
    assert (snap.reserved, snap.in_flight) == (0, 0)
    assert second.balance().total_balance == 40


def test_a_flush_does_not_forget_the_turns_at_the_gate(
    redis_url: str, redis_client: redis.Redis, backends: list[RedisBackend]
) -> None:
    from creditguard import GateTimeout

    prefix = fresh_prefix("turns-flushed")
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guards = [
        CreditGuard(
            fake.api_key,
            transport=fake.transport,
            backend=_backend(backends, redis_url, prefix),
            max_concurrent=1,
            gate_timeout=0.2,
        )
        for _ in range(2)
    ]
    with guards[0].spend(10):
        redis_client.flushdb()
        backend = guards[0]._clients.backend
        assert isinstance(backend, RedisBackend)
        backend.renew_once()
        with pytest.raises(GateTimeout), guards[1].spend(10):
            pytest.fail("two paid calls at once through a gate of one")
    with guards[1].spend(10):  # given back as usual
        pass
    backend.renew_once()  # nothing in flight here any more: no turn is taken again
    assert redis_client.zcard(f"{prefix}{{{guards[0]._account.fingerprint}}}:gate") == 0


def test_the_renewer_restores_on_its_own(
    redis_url: str,
    redis_client: redis.Redis,
    backends: list[RedisBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from creditguard.backends.redis.leases import LeaseKeeper

    restored = threading.Event()
    original = LeaseKeeper._restored

    def spy(self: LeaseKeeper, state: RedisAccountState, ids: list[str]) -> None:
        original(self, state, ids)
        restored.set()

    monkeypatch.setattr(LeaseKeeper, "_restored", spy)
    prefix = fresh_prefix("renewer-restores")
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, backend=_backend(backends, redis_url, prefix)
    )
    with guard.spend(60):
        redis_client.flushdb()
        assert restored.wait(30), "the renewer never recorded the lost reservation again"
        snap = guard.snapshot()
        assert (snap.reserved, snap.in_flight, snap.balance) == (60, 1, None)


@pytest.mark.parametrize("lost", ["state", "res", "lease"])
def test_losing_any_one_key_of_an_account_keeps_the_books(
    redis_url: str, redis_client: redis.Redis, backends: list[RedisBackend], lost: str
) -> None:
    """An evicting Redis (or anyone) may drop one key of an account: the counters, the
    reservation records or their leases. Nothing is admitted beyond the balance, and
    nothing stays reserved for ever."""
    fake, first, second, prefix = _two_processes(redis_url, backends)
    with first.spend(60) as spend:
        redis_client.delete(f"{prefix}{{{first._account.fingerprint}}}:{lost}")
        backend = first._clients.backend
        assert isinstance(backend, RedisBackend)
        backend.renew_once()
        with pytest.raises(AdmissionTimeout), second.spend(60):
            pytest.fail("admitted 60 while 60 are in flight on 100")
        fake.charge(60)
    assert second.balance(refresh=True).total_balance == 40
    # The block settles at a read that started after Redis learnt that it returned (told
    # by its own process): the first process's read of its balance after.
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == 40
    snap = second.snapshot()
    assert (snap.reserved, snap.in_flight, snap.settling) == (0, 0, 0)
    with second.spend(40):  # nothing stranded
        fake.charge(40)


def test_an_evicting_redis_is_warned_about(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    policy = redis_client.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        redis_client.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING, logger="creditguard"):
            backend = RedisBackend(redis_url, prefix=fresh_prefix("evicting"))
            fake = FakeLensmor()
            CreditGuard(fake.api_key, transport=fake.transport, backend=backend).balance()
            assert backend.eviction_checked.is_set()
            backend.close()
        assert "allkeys-lru" in caplog.text
        caplog.clear()
        redis_client.config_set("maxmemory-policy", "noeviction")
        with caplog.at_level(logging.WARNING, logger="creditguard"):
            backend = RedisBackend(redis_url, prefix=fresh_prefix("evicting"))
            fake = FakeLensmor()
            CreditGuard(fake.api_key, transport=fake.transport, backend=backend).balance()
            assert backend.eviction_checked.is_set()
            backend.close()
        assert "maxmemory-policy" not in caplog.text
    finally:
        redis_client.config_set("maxmemory-policy", policy)


def test_a_redis_that_does_not_say_its_policy_is_fine(caplog: pytest.LogCaptureFixture) -> None:
    class Managed:
        def config_get(self, name: str) -> object:
            raise redis.ResponseError("unknown command 'CONFIG'")

    with caplog.at_level(logging.DEBUG, logger="creditguard"):
        assert check_eviction(Managed()) is None  # type: ignore[arg-type]
    [record] = caplog.records
    assert record.levelno == logging.DEBUG


# -- cancellation (item 8) ---------------------------------------------------------------


def _pause_before(
    monkeypatch: pytest.MonkeyPatch, cls: type, name: str, admin: redis.Redis
) -> None:
    """Pause Redis (600 ms) just before the first call of ``cls.name`` and its async twin:
    that script reaches Redis, and runs when Redis wakes up, after its caller gave up."""
    sync_op, async_op = getattr(cls, name), getattr(cls, "a" + name)
    paused: list[int] = []

    def pause() -> None:
        if not paused:
            paused.append(1)
            admin.execute_command("CLIENT", "PAUSE", 600)

    def paused_sync(self: object, *args: object) -> object:
        pause()
        return sync_op(self, *args)

    async def paused_async(self: object, *args: object) -> object:
        pause()
        return await async_op(self, *args)

    monkeypatch.setattr(cls, name, paused_sync)
    monkeypatch.setattr(cls, "a" + name, paused_async)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["url", "client"])
@pytest.mark.parametrize("gate", [False, True], ids=["admission", "gate"])
async def test_a_cancelled_caller_leaves_nothing_in_redis(
    redis_url: str,
    redis_client: redis.Redis,
    backends: list[RedisBackend],
    anyio_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    gate: bool,
    how: str,
) -> None:
    """Redis paused past the caller's timeout just as the admission (or the turn at the
    gate) is asked for: the script still runs when Redis wakes up. Cut by
    ``asyncio.wait_for`` (asyncio's own cancellation, which anyio's shield does not hold)
    or by trio's ``move_on_after``, what it did is accounted for: no reservation and no
    turn is left for a lease. (``how``: a backend from a URL, whose asyncio client runs
    on the loop, or from a sync client, run in a worker thread.)"""
    prefix = fresh_prefix("cancelled")
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    if how == "url":
        backend = _backend(backends, redis_url, prefix)
    else:
        backend = RedisBackend(client=redis.Redis.from_url(redis_url), prefix=prefix)
        backends.append(backend)
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=backend,
        ttl=60,
        max_concurrent=1 if gate else None,
        gate_timeout=5,
    )
    assert (await guard.abalance()).total_balance == 100
    ran: list[int] = []

    async def call() -> None:
        async with guard.spend(60):
            await anyio.lowlevel.checkpoint()  # where a cancellation is delivered
            ran.append(1)

    admin = redis.Redis.from_url(redis_url)
    with monkeypatch.context() as patch:
        if gate:
            _pause_before(patch, RedisGate, "enter_admit", admin)
        else:
            _pause_before(patch, RedisAccountState, "admit", admin)
        try:
            if anyio_backend == "asyncio":
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(call(), 0.3)
            else:
                import trio

                with trio.move_on_after(0.3):
                    await call()
        finally:
            admin.close()
    assert ran == []
    snap = await guard.asnapshot()  # (after the pause: Redis ran the script first)
    assert (snap.reserved, snap.in_flight, snap.gate_waiting) == (0, 0, 0)
    gate_key = f"{prefix}{{{guard._account.fingerprint}}}:gate"
    assert redis_client.zcard(gate_key) == 0
    with anyio.fail_after(30):  # the next call is not kept waiting by a stranded turn
        await call()
    assert ran == [1]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's own cancellation
@pytest.mark.parametrize("gate", [False, True], ids=["admission", "gate"])
async def test_an_answer_lost_to_asyncio_cancellation_is_undone(
    redis_url: str,
    redis_client: redis.Redis,
    backends: list[RedisBackend],
    monkeypatch: pytest.MonkeyPatch,
    gate: bool,
) -> None:
    """The script ran on the loop's asyncio client, and its answer is slow to come back:
    ``asyncio.wait_for`` cancels the caller meanwhile. The answer is awaited all the
    same and what the script did is undone."""
    prefix = fresh_prefix("lost-answer")
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=_backend(backends, redis_url, prefix),
        ttl=60,
        max_concurrent=1 if gate else None,
    )
    assert (await guard.abalance()).total_balance == 100
    cls, name = (RedisGate, "aenter_admit") if gate else (RedisAccountState, "aadmit")
    script = getattr(cls, name)
    answered = asyncio.Event()

    async def slow_answer(self: object, *args: object) -> object:
        result = await script(self, *args)  # the script ran
        await asyncio.sleep(0.6)  # its answer is on its way
        answered.set()
        return result

    ran: list[int] = []
    with monkeypatch.context() as patch:
        patch.setattr(cls, name, slow_answer)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(guard_call(guard, ran), 0.3)
    assert answered.is_set()  # the cancelled caller waited for the answer
    assert ran == []
    snap = await guard.asnapshot()
    assert (snap.reserved, snap.in_flight) == (0, 0)
    assert redis_client.zcard(f"{prefix}{{{guard._account.fingerprint}}}:gate") == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's own cancellation
async def test_a_turn_and_admission_lost_to_asyncio_cancellation_are_undone(
    redis_url: str,
    redis_client: redis.Redis,
    backends: list[RedisBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decorated call at the gate is admitted by the script that grants its turn: when
    that answer is lost to a cancellation, both the reservation and the turn are given
    back."""
    prefix = fresh_prefix("lost-turn-admission")
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=_backend(backends, redis_url, prefix),
        ttl=60,
        max_concurrent=1,
    )
    assert (await guard.abalance()).total_balance == 100
    script = RedisGate.aenter_admit
    admitted: list[object] = []

    async def slow_answer(self: RedisGate, *args: Any) -> object:
        result = await script(self, *args)  # the script ran
        admitted.append(result)
        await asyncio.sleep(0.6)  # its answer is on its way
        return result

    ran: list[int] = []

    @guard.requires_credits(60)
    async def paid() -> None:
        ran.append(1)

    with monkeypatch.context() as patch:
        patch.setattr(RedisGate, "aenter_admit", slow_answer)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(paid(), 0.3)
    assert len(admitted) == 1
    assert getattr(admitted[0], "gen", None) is not None
    assert ran == []
    snap = await guard.asnapshot()
    assert (snap.reserved, snap.in_flight) == (0, 0)
    assert redis_client.zcard(f"{prefix}{{{guard._account.fingerprint}}}:gate") == 0
    await paid()
    assert ran == [1]


async def guard_call(guard: CreditGuard, ran: list[int]) -> None:
    async with guard.spend(60):
        await anyio.lowlevel.checkpoint()
        ran.append(1)


# -- a read is always finished (item 9, Redis side) --------------------------------------


def test_a_read_that_cannot_be_recorded_still_finishes(
    redis_url: str, backends: list[RedisBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    import creditguard.backends.redis.account
    import creditguard.backends.redis.fallback
    import creditguard.backends.redis.reads

    backend = _backend(backends, redis_url, fresh_prefix("record"))
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)

    def broken(balance: object) -> tuple[str, int]:
        raise ValueError("cannot encode")

    monkeypatch.setattr(creditguard.backends.redis.reads, "encode_balance", broken)
    assert guard.balance().total_balance == 100
    wrapper = guard._account
    assert isinstance(wrapper, creditguard.backends.redis.fallback.FallbackAccount)
    account = wrapper.primary
    assert isinstance(account, creditguard.backends.redis.account.RedisAccount)
    assert account.flights == []
    assert account.reads.stale == []  # its read lock in Redis was given up
    monkeypatch.undo()
    assert guard.balance(refresh=True).total_balance == 100


# -- idle keys (item 11) -----------------------------------------------------------------


def test_every_key_of_an_account_expires_when_idle(
    redis_url: str, redis_client: redis.Redis, backends: list[RedisBackend]
) -> None:
    prefix = fresh_prefix("idle")
    backend = _backend(backends, redis_url, prefix)
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, max_concurrent=2)
    with guard.spend(10):
        fake.charge(10)
    guard.balance(refresh=True)
    keys = _keys(redis_client, prefix)
    assert keys
    for key in keys:
        assert redis_client.pttl(key) > 0, f"{key} never expires"
    hold = guard.hold(20, expires_in=7_200)  # two hours: longer than the idle time
    now_ms = int(redis_client.time()[0]) * 1000
    for key in _keys(redis_client, prefix):
        assert redis_client.pttl(key) > 0, f"{key} never expires"
    for name in ("state", "res", "lease"):
        key = f"{prefix}{{{guard._account.fingerprint}}}:{name}"
        assert redis_client.pexpiretime(key) > now_ms + 7_200_000  # outlives the hold
    hold.release()


def test_a_rejected_key_leaves_nothing_in_redis(
    redis_url: str, redis_client: redis.Redis, backends: list[RedisBackend]
) -> None:
    prefix = fresh_prefix("rejected")
    backend = _backend(backends, redis_url, prefix)
    fake = FakeLensmor()
    guard = CreditGuard("sk_not_a_key_lensmor_knows", transport=fake.transport, backend=backend)
    with pytest.raises(AuthenticationError), guard.spend(10):
        pytest.fail("ran with a rejected key")
    with pytest.raises(AuthenticationError):
        guard.balance()
    assert _keys(redis_client, prefix) == []


# -- survey across processes -------------------------------------------------------------


def test_a_snapshot_sees_every_process(
    redis_url: str, backends: list[RedisBackend], redis_client: redis.Redis
) -> None:
    _, first, second, _ = _two_processes(redis_url, backends)
    hold = first.hold(30, expires_in=600)
    with second.spend(20):
        for guard in (first, second):
            snap = guard.snapshot()
            assert snap.backend == "redis"
            assert snap.balance is not None
            assert snap.balance.total_balance == 100
            assert (snap.reserved, snap.in_flight, snap.held, snap.holds) == (20, 1, 30, 1)
            [open_hold] = snap.open_holds
            assert (open_hold.id, open_hold.cost) == (hold.id, 30)
        # the second process cannot pay 51 beside the first's hold: a true refusal
        from creditguard import InsufficientCredits

        with pytest.raises(InsufficientCredits) as refused, second.spend(51):
            pytest.fail("admitted beyond the balance less the holds and its own spend")
        assert refused.value.available == 50  # 100 - 30 held - its own 20
    hold.release()
    assert first.snapshot().holds == 0


def test_a_snapshot_on_the_fallback_is_this_processs(backends: list[RedisBackend]) -> None:
    """Redis unreachable with ``fallback="memory"``: the snapshot (and the gate's look at
    the open holds) answer from this process's memory."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = _backend(backends, f"redis://127.0.0.1:{port}/0", "down:", fallback="memory")
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, max_concurrent=2)
    hold = guard.hold(30, expires_in=600)
    with guard.spend(20):
        snap = guard.snapshot()
        assert snap.backend == "memory"
        assert (snap.reserved, snap.in_flight, snap.held, snap.holds) == (20, 1, 30, 1)
        from creditguard import InsufficientCredits

        with pytest.raises(InsufficientCredits), guard.spend(51):
            pytest.fail("admitted beyond the balance less the holds and its own spend")
    hold.release()
    assert guard.snapshot().holds == 0


def test_no_script_is_given_a_duration_it_would_print_wrongly(redis_client: redis.Redis) -> None:
    """Every duration a script adds to the server's time is bounded where Lua's doubles
    and ``'%d'`` are exact (``MAX_MS``): past it, a ``ValueError`` before any script."""
    from creditguard.backends.redis.scripts import MAX_MS

    with pytest.raises(ValueError, match="lease_ms"):
        RedisAccountState(redis_client, None, "p:", "acct", sys.maxsize * 1000)
    acct = RedisAccountState(redis_client, None, fresh_prefix("bounds"), "acct", MAX_MS)
    with pytest.raises(ValueError, match="budget_ms"):
        acct.read_begin("t", MAX_MS + 1)
    with pytest.raises(ValueError, match="ms"):
        acct.block(sys.maxsize)
    gate = RedisGate(redis_client, None, fresh_prefix("bounds"), "acct")
    with pytest.raises(ValueError, match="lease_ms"):
        gate.enter("t", 1, sys.maxsize, 1_000)
    with pytest.raises(ValueError, match="lease_ms"):
        gate.renew_turns(["t"], sys.maxsize)
    with pytest.raises(ValueError, match="expires_ms"):
        gate.keep("h", sys.maxsize, 1, 0, "", "")
    # the longest allowed: an expiry in the future, written exactly
    now_ms = int(redis_client.time()[0]) * 1000
    acct.reserve_unchecked("r", 1)
    score = redis_client.zscore(acct.keys[2], "r")
    assert score is not None
    assert score >= now_ms + MAX_MS
