"""RedisBackend's own contract: configuration, its lease renewer's lifetime, and one
guarded call per kind of caller (sync, asyncio, trio) sharing one account in Redis. The
behaviour of the guard over Redis is the core suites' (``new_backend``); many processes
are in ``test_redis_processes.py``."""

from __future__ import annotations

import gc
import socket
import threading
import uuid
import warnings
from typing import Any

import anyio
import pytest

from creditguard import BalanceUnavailable, CreditGuard
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor


def fresh_prefix(name: str) -> str:
    """A key prefix no other test (or repetition of this one) uses: the session's Redis
    keeps its data between tests."""
    return f"{name}-{uuid.uuid4().hex[:12]}:"


def test_the_url_comes_from_the_environment(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDITGUARD_REDIS_URL", redis_url)
    backend = RedisBackend(prefix=fresh_prefix("env-test"))
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    assert guard.balance().total_balance == fake.balance.total_balance
    backend.close()


def test_without_a_url_or_client_it_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDITGUARD_REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="CREDITGUARD_REDIS_URL"):
        RedisBackend()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"lease": 0}, ValueError),
        ({"lease": True}, ValueError),
        ({"lease": "60"}, ValueError),
        ({"fallback": "disk"}, ValueError),
        ({"prefix": 1}, TypeError),
    ],
)
def test_bad_arguments_are_refused(redis_url: str, kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        RedisBackend(redis_url, **kwargs)  # type: ignore[arg-type]


def test_repr_shows_no_url(redis_url: str) -> None:
    backend = RedisBackend(redis_url.replace("redis://", "redis://:s3cret-pass@"))
    assert "s3cret" not in repr(backend)
    assert "127.0.0.1" not in repr(backend)
    backend.close()


def test_the_lease_renewer_runs_only_while_calls_are_in_flight_and_stops_at_close(
    redis_url: str,
) -> None:
    backend = RedisBackend(redis_url, prefix=fresh_prefix("renewer-test"), lease=0.3)
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    before = {t.name for t in threading.enumerate()}
    assert "creditguard-redis-leases" not in before
    with guard.spend(10):
        assert any(t.name == "creditguard-redis-leases" for t in threading.enumerate())
        fake.charge(10)
    backend.close()
    assert not any(t.name == "creditguard-redis-leases" for t in threading.enumerate())


def test_sync_asyncio_and_trio_callers_share_one_account(redis_url: str) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    backend = RedisBackend(redis_url, prefix=fresh_prefix("kinds-test"))
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, ttl=60)

    @guard.requires_credits(30)
    async def unlock() -> None:
        fake.charge(30)

    @guard.requires_credits(30)
    def unlock_sync() -> None:
        fake.charge(30)

    async def main() -> None:
        await unlock()
        await backend.aclose()

    unlock_sync()
    anyio.run(main, backend="asyncio")
    anyio.run(main, backend="trio")
    assert fake.balance.total_balance == 10
    assert guard.balance().total_balance == 10
    assert guard._account.snapshot()[1:] == (0, 0)
    assert fake.balance_requests == 2  # the first read, and the one that settled the three
    backend.close()


def test_finished_spends_waiting_in_redis_are_bounded(redis_url: str) -> None:
    """Spends that returned wait in Redis for a read; past MAX_SETTLING of one process
    since its last read, the cached balance is distrusted, so the next call reads and that
    read settles them all (the scripts that settle them stay small)."""
    from creditguard.core.settling import MAX_SETTLING

    fake = FakeLensmor()
    backend = RedisBackend(redis_url, prefix=fresh_prefix("bounded-test"))
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, ttl=60)

    @guard.requires_credits(1)
    def call() -> None:
        fake.charge(1)

    for _ in range(MAX_SETTLING - 1):
        call()
    cached, reserved, _ = guard._account.snapshot()
    assert cached is not None
    assert reserved == MAX_SETTLING - 1
    call()  # the MAX_SETTLING-th: the cached balance is distrusted
    assert guard._account.snapshot()[0] is None
    assert fake.balance_requests == 1
    call()  # reads, and the read settles every spend before it
    assert fake.balance_requests == 2
    assert guard._account.snapshot()[1] == 1  # only this call waits for a read now
    assert guard.balance().total_balance == fake.balance.total_balance
    assert guard._account.snapshot()[1] == 0
    backend.close()


def test_admissions_on_a_balance_already_here_are_answered_without_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first admission on a balance brings it; the next ones on the same balance are
    answered with its generation alone, and still see it as ``balance_before``."""
    from creditguard import current_spend
    from creditguard.backends.redis.scripts import RedisAccountState

    answers: list[str] = []  # what each admission was answered: its kind, or "gen"
    run = RedisAccountState._run

    def spy(self: RedisAccountState, name: str, args: Any) -> Any:
        answer = run(self, name, args)
        if name == "admit":
            answers.append("gen" if isinstance(answer, int) else answer[0].decode())
        return answer

    monkeypatch.setattr(RedisAccountState, "_run", spy)
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    backend = RedisBackend(redis_url, prefix=fresh_prefix("known-test"))
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, ttl=60)
    seen: list[int | None] = []

    @guard.requires_credits(10)
    def call() -> None:
        spend = current_spend()
        assert spend is not None
        seen.append(None if spend.balance_before is None else spend.balance_before.total_balance)
        fake.charge(10)

    call()
    call()
    call()
    assert seen == [100, 100, 100]
    assert answers == ["read", "ok", "gen", "gen"]
    assert guard.balance(refresh=True).total_balance == 70  # a new read: a new balance
    call()
    call()
    assert seen[3:] == [70, 70]
    assert answers[4:] == ["ok", "gen"]
    backend.close()


def test_an_event_loops_redis_client_closes_with_the_loop(redis_url: str) -> None:
    """The asyncio client made for a loop is closed when that loop shuts down: no socket
    is left for the garbage collector (a ResourceWarning) after ``anyio.run`` returns."""
    fake = FakeLensmor()
    backend = RedisBackend(redis_url, prefix=f"loop-{uuid.uuid4().hex[:10]}:")
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)

    async def main() -> None:
        async with guard.spend(10):
            pass

    try:
        for _ in range(2):  # two loops, one after the other
            anyio.run(main, backend="asyncio")
            assert backend._loop_clients.held == {}  # closed and forgotten with its loop
        assert guard.balance().total_balance > 0
    finally:
        guard.close()
        backend.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def _nothing_listens() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_the_gate_follows_the_policy_when_redis_is_unreachable(policy: str) -> None:
    fake = FakeLensmor()
    backend = RedisBackend(_nothing_listens())
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        backend=backend,
        max_concurrent=1,
        on_unavailable=policy,  # type: ignore[arg-type]
    )
    ran = []
    try:
        if policy == "deny":
            with pytest.raises(BalanceUnavailable, match="Redis"), guard.spend(10):
                ran.append(1)
        else:
            with guard.spend(10):  # no turn and no balance: run unchecked, logged
                ran.append(1)
    finally:
        guard.close()
        backend.close()
    assert ran == ([] if policy == "deny" else [1])
