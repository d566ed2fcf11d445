"""The guard's contract, one behaviour at a time (sync and async, asyncio and trio)."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest

import creditguard
from creditguard import (
    AdmissionTimeout,
    AuthenticationError,
    BalanceUnavailable,
    CreditBalance,
    CreditGuard,
    CreditGuardError,
    GuardEvent,
    InsecureTransportError,
    InsufficientCredits,
    RetryPolicy,
    Spend,
    current_spend,
    requires_credits,
)
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend

NO_RETRY = RetryPolicy(attempts=1, deadline=1.0)


@pytest.fixture
def guard(fake: FakeLensmor, new_backend: NewBackend) -> Iterator[CreditGuard]:
    """The conftest's ``guard``, on the backend the test runs on."""
    with CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend()) as g:
        yield g


class Boom(Exception):
    pass


def state(guard: CreditGuard) -> tuple[CreditBalance | None, int, int]:
    return guard._account.snapshot()


# -- construction ------------------------------------------------------------------


def test_key_from_environment(
    monkeypatch: pytest.MonkeyPatch, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
    guard = CreditGuard(transport=fake.transport, backend=new_backend())
    assert guard.balance().total_balance == 30050


def test_no_key_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, new_backend: NewBackend
) -> None:
    monkeypatch.delenv("LENSMOR_API_KEY", raising=False)
    with pytest.raises(CreditGuardError, match="LENSMOR_API_KEY"):
        CreditGuard(backend=new_backend())
    monkeypatch.setenv("LENSMOR_API_KEY", "")
    with pytest.raises(CreditGuardError, match="LENSMOR_API_KEY"):
        CreditGuard(backend=new_backend())


def test_base_url_from_environment(
    monkeypatch: pytest.MonkeyPatch, new_backend: NewBackend
) -> None:
    monkeypatch.delenv("LENSMOR_BASE_URL", raising=False)
    assert CreditGuard("k", backend=new_backend()).base_url == "https://platform.lensmor.com"
    monkeypatch.setenv("LENSMOR_BASE_URL", "https://staging.example.test/")
    assert CreditGuard("k", backend=new_backend()).base_url == "https://staging.example.test"
    assert (
        CreditGuard("k", base_url="https://x.test", backend=new_backend()).base_url
        == "https://x.test"
    )


@pytest.mark.parametrize(
    "url", ["http://platform.lensmor.com", "http://10.0.0.5:8080", "http://evil.localhost:80"]
)
def test_plain_http_to_remote_host_refused(url: str, new_backend: NewBackend) -> None:
    with pytest.raises(InsecureTransportError, match="allow_insecure_http"):
        CreditGuard("k", base_url=url, backend=new_backend())
    CreditGuard("k", base_url=url, allow_insecure_http=True, backend=new_backend())


@pytest.mark.parametrize("url", ["http://127.0.0.1:8787", "http://localhost:1", "http://[::1]:80"])
def test_plain_http_to_loopback_allowed(url: str, new_backend: NewBackend) -> None:
    CreditGuard("k", base_url=url, backend=new_backend())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ttl": -1}, ValueError),
        ({"ttl": "5"}, ValueError),
        ({"on_unavailable": "maybe"}, ValueError),
        ({"transport": object()}, TypeError),
        ({"base_url": "ftp://x"}, CreditGuardError),
    ],
)
def test_bad_configuration(
    kwargs: dict[str, Any], error: type[Exception], new_backend: NewBackend
) -> None:
    with pytest.raises(error):
        CreditGuard("k", **kwargs, backend=new_backend())


@pytest.mark.parametrize("key", ["has space", "tab\tkey", "ключ", "line\nbreak"])
def test_malformed_key_rejected_without_echo(key: str, new_backend: NewBackend) -> None:
    with pytest.raises(CreditGuardError) as info:
        CreditGuard(key, backend=new_backend())
    assert key not in str(info.value)


@pytest.mark.usefixtures("new_backend")
def test_public_names() -> None:
    for name in [
        "CreditBalance",
        "CreditGuard",
        "Spend",
        "requires_credits",
        "CreditGuardError",
        "InsufficientCredits",
        "AuthenticationError",
        "BalanceUnavailable",
        "RateLimited",
        "InvalidResponse",
    ]:
        assert name in creditguard.__all__
        assert hasattr(creditguard, name)
    assert issubclass(creditguard.RateLimited, BalanceUnavailable)
    assert issubclass(creditguard.InvalidResponse, BalanceUnavailable)
    assert issubclass(AuthenticationError, CreditGuardError)
    assert not issubclass(AuthenticationError, BalanceUnavailable)


# -- the decorator -------------------------------------------------------------------


def test_decorator_keeps_identity(guard: CreditGuard) -> None:
    def unlock(contact_id: str, *, fields: int = 1) -> dict[str, str]:
        """Unlock one contact."""
        return {"id": contact_id}

    async def aunlock(event_ids: list[str]) -> list[str]:
        """Unlock events."""
        return event_ids

    wrapped = guard.requires_credits(10)(unlock)
    awrapped = guard.requires_credits(lambda event_ids: len(event_ids))(aunlock)
    assert wrapped.__name__ == "unlock"
    assert wrapped.__doc__ == "Unlock one contact."
    assert inspect.signature(wrapped) == inspect.signature(unlock)
    assert not inspect.iscoroutinefunction(wrapped)
    assert inspect.iscoroutinefunction(awrapped)
    assert awrapped.__name__ == "aunlock"
    assert inspect.signature(awrapped) == inspect.signature(aunlock)


@pytest.mark.parametrize("cost", [-1, 1.5, "10", None, True])
def test_bad_static_cost_fails_at_decoration(
    cost: Any, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    with pytest.raises((TypeError, ValueError)):
        guard.requires_credits(cost)
    with pytest.raises((TypeError, ValueError)):
        guard.spend(cost)
    assert fake.balance_requests == 0


@pytest.mark.parametrize("computed", [-5, 2.0, "3", None, False])
def test_bad_computed_cost_fails_before_any_request(
    computed: Any, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    ran = []

    @guard.requires_credits(lambda n: computed)
    def paid(n: int) -> None:
        ran.append(n)

    with pytest.raises((TypeError, ValueError)):
        paid(1)
    assert ran == []
    assert fake.balance_requests == 0


def test_cost_function_error_propagates(fake: FakeLensmor, new_backend: NewBackend) -> None:
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())

    @guard.requires_credits(lambda ids: 5 * len(ids))
    def paid(ids: Any) -> None:
        raise AssertionError("must not run")

    with pytest.raises(TypeError):
        paid(42)  # len(42): the cost cannot be computed, so nothing runs
    assert fake.balance_requests == 0


def test_sync_spend_flow(guard: CreditGuard, fake: FakeLensmor) -> None:
    @guard.requires_credits(lambda ids: 5 * len(ids))
    def unlock(ids: list[str]) -> int:
        fake.charge(5 * len(ids))
        return len(ids)

    assert unlock(["a", "b"]) == 2
    assert fake.balance_requests == 1  # admission read; the call did not wait for more
    assert state(guard)[1:] == (10, 1)  # held until a read includes the spend
    # Asking for the balance makes that read, which settles the spend...
    assert guard.balance().total_balance == 30040
    assert fake.balance_requests == 2
    assert state(guard)[1:] == (0, 0)
    # ...and is then served from the cache, with no further request.
    assert guard.balance().total_balance == 30040
    assert fake.balance_requests == 2


@pytest.mark.anyio
async def test_async_spend_flow(guard: CreditGuard, fake: FakeLensmor) -> None:
    @guard.requires_credits(10)
    async def unlock(contact_id: str) -> str:
        await anyio.lowlevel.checkpoint()
        fake.charge(10)
        return contact_id

    assert await unlock("c1") == "c1"
    assert (await guard.abalance()).total_balance == 30040
    assert guard.balance().total_balance == 30040
    assert fake.balance_requests == 2

    async with guard.spend(25) as spend:
        fake.charge(25)
    assert spend.cost == 25
    assert spend.balance_before is not None
    assert spend.balance_before.total_balance == 30040
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == 30015
    assert state(guard)[1:] == (0, 0)


def test_spend_sync_block(guard: CreditGuard, fake: FakeLensmor) -> None:
    with guard.spend(30000) as spend:
        fake.charge(30000)
    assert spend.balance_after is not None
    assert spend.balance_after.subscription_balance == 0
    assert spend.balance_after.gift_balance == 50
    with pytest.raises(RuntimeError, match="once"), spend:
        pass


def test_insufficient_credits_does_not_run(fake: FakeLensmor, new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=5, gift_balance=3)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    ran = []

    @guard.requires_credits(9)
    def paid() -> None:
        ran.append(1)

    with pytest.raises(InsufficientCredits) as info:
        paid()
    assert ran == []
    assert info.value.required == 9
    assert info.value.available == 8
    assert info.value.balance is not None
    assert info.value.balance.total_balance == 8
    assert state(guard)[1:] == (0, 0)


@pytest.mark.anyio
async def test_calls_in_flight_make_a_call_busy_never_refused(
    fake: FakeLensmor, new_backend: NewBackend
) -> None:
    """30,000 of 30,050 credits are reserved by a call in flight, which may yet charge
    nothing: a call of 51 is not refused for credits (AdmissionTimeout, busy), one the
    account cannot pay even if it charges nothing is (InsufficientCredits)."""
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, ttl=60, admission_timeout=0, backend=new_backend()
    )
    inside = anyio.Event()
    leave = anyio.Event()

    async def hold() -> None:
        async with guard.spend(30000):
            inside.set()
            await leave.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await inside.wait()
        with pytest.raises(AdmissionTimeout) as busy:
            async with guard.spend(51):
                pytest.fail("must not run")
        assert (busy.value.required, busy.value.available, busy.value.reserved) == (51, 50, 30000)
        assert not isinstance(busy.value, InsufficientCredits)
        with pytest.raises(InsufficientCredits) as info:
            async with guard.spend(30051):
                pytest.fail("must not run")
        assert info.value.available == 30050
        assert info.value.balance is not None
        assert info.value.balance.total_balance == 30050
        async with guard.spend(50):
            pass
        leave.set()


def test_zero_cost_is_allowed(guard: CreditGuard) -> None:
    with guard.spend(0) as spend:
        pass
    assert spend.balance_after is not None


# -- failures inside the action ----------------------------------------------------------


def test_action_exception_propagates_unchanged(guard: CreditGuard, fake: FakeLensmor) -> None:
    error = Boom("the paid call failed")

    @guard.requires_credits(10)
    def paid() -> None:
        raise error

    with pytest.raises(Boom) as info:
        paid()
    assert info.value is error
    cached, reserved, inflight = state(guard)
    assert cached is None  # invalidated
    assert (reserved, inflight) == (0, 0)


@pytest.mark.anyio
async def test_async_action_exception_propagates(guard: CreditGuard) -> None:
    @guard.requires_credits(10)
    async def paid() -> None:
        raise Boom

    with pytest.raises(Boom):
        await paid()
    assert state(guard) == (None, 0, 0)


def test_refresh_failure_keeps_the_result(
    fake: FakeLensmor, caplog: pytest.LogCaptureFixture, new_backend: NewBackend
) -> None:
    """A block exits with no read; reading its ``balance_after`` fails: ``None``, logged,
    and the block's credits stay reserved until a later read includes them."""
    events: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        retry=NO_RETRY,
        on_event=events.append,
        backend=new_backend(),
    )

    with guard.spend(10) as paid:
        fake.charge(10)
    fake.fail_next(503)  # the read balance_after asks for fails
    with caplog.at_level(logging.WARNING, logger="creditguard"):
        assert paid.balance_after is None
    assert "balance read after it failed" in caplog.text
    cached, reserved, inflight = state(guard)
    assert cached is not None
    assert cached.total_balance == 30050  # unchanged: the charge is still reserved
    assert (reserved, inflight) == (10, 1)
    assert [e.kind for e in events] == ["admitted", "spent"]  # the read emits nothing
    with guard.spend(0) as spend:
        pass
    fake.fail_next(503)
    assert spend.balance_after is None
    assert guard.balance().total_balance == 30040  # a later read settles them
    assert state(guard)[1:] == (0, 0)
    assert paid.balance_after is None  # remembered: no second try


@pytest.mark.anyio
async def test_async_refresh_failure_keeps_the_result(
    fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, retry=NO_RETRY, backend=new_backend()
    )
    async with guard.spend(10) as spend:
        fake.charge(10)
    fake.fail_next(500)
    assert spend.balance_before is not None
    assert await spend.abalance_after() is None
    assert state(guard)[1:] == (10, 1)  # held until a read succeeds
    assert (await guard.abalance()).total_balance == 30040
    assert state(guard)[1:] == (0, 0)


# -- unavailable service -------------------------------------------------------------


@pytest.mark.anyio
async def test_fail_closed_by_default(fake: FakeLensmor, new_backend: NewBackend) -> None:
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, retry=NO_RETRY, backend=new_backend()
    )
    fake.fail_next(503, times=2)
    with pytest.raises(BalanceUnavailable), guard.spend(1):
        raise AssertionError("must not run")
    with pytest.raises(BalanceUnavailable):
        async with guard.spend(1):
            raise AssertionError("must not run")
    assert state(guard)[1:] == (0, 0)


@pytest.mark.anyio
async def test_fail_open_runs_unchecked_and_warns(
    fake: FakeLensmor, caplog: pytest.LogCaptureFixture, new_backend: NewBackend
) -> None:
    events: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        retry=NO_RETRY,
        on_unavailable="allow",
        on_event=events.append,
        backend=new_backend(),
    )
    fake.fail_next(503)
    with caplog.at_level(logging.WARNING, logger="creditguard"):
        async with guard.spend(5) as spend:
            fake.charge(5)
    assert "unchecked" in caplog.text
    assert spend.balance_before is None
    after = await spend.abalance_after()  # the read that settles it
    assert after is not None
    assert after.total_balance == 30045
    assert events[0].kind == "unchecked"
    assert state(guard)[1:] == (0, 0)
    guard.invalidate()
    fake.fail_next("not-json")
    with guard.spend(5) as spend:
        pass
    assert spend.balance_before is None
    assert state(guard)[1:] == (5, 1)  # reserved like any call, until a read includes it
    assert spend.balance_after is not None
    assert state(guard)[1:] == (0, 0)


@pytest.mark.anyio
async def test_fail_open_never_covers_a_bad_key(fake: FakeLensmor, new_backend: NewBackend) -> None:
    guard = CreditGuard(
        "wrong-key", transport=fake.transport, on_unavailable="allow", backend=new_backend()
    )
    with pytest.raises(AuthenticationError), guard.spend(1):
        raise AssertionError("must not run")
    with pytest.raises(AuthenticationError):
        async with guard.spend(1):
            raise AssertionError("must not run")


# -- events and logging --------------------------------------------------------------


def test_events(fake: FakeLensmor, new_backend: NewBackend) -> None:
    events: list[GuardEvent] = []
    fake = FakeLensmor(subscription_balance=10, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=events.append, backend=new_backend()
    )
    with guard.spend(4):
        fake.charge(4)
    with pytest.raises(InsufficientCredits), guard.spend(7):
        pass
    with pytest.raises(Boom), guard.spend(1):
        raise Boom
    kinds = [e.kind for e in events]
    assert kinds == ["admitted", "spent", "denied", "admitted", "failed"]
    spent = events[1]
    assert spent.cost == 4
    assert spent.account == guard.account
    assert spent.balance_before is not None
    assert spent.balance_before.total_balance == 10
    assert spent.balance_after is None  # a block settles later: no read at exit
    assert events[2].available == 6  # the refusal read settled the first block
    assert isinstance(events[2].error, InsufficientCredits)


def test_broken_event_hook_does_not_break_the_call(
    fake: FakeLensmor, caplog: pytest.LogCaptureFixture, new_backend: NewBackend
) -> None:
    def hook(event: GuardEvent) -> None:
        raise RuntimeError("observer bug")

    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=hook, backend=new_backend()
    )
    with caplog.at_level(logging.ERROR, logger="creditguard"), guard.spend(1):
        pass
    assert "on_event hook raised" in caplog.text


# -- many keys ------------------------------------------------------------------------


def test_keys_do_not_share_state(new_backend: NewBackend) -> None:
    a = FakeLensmor(subscription_balance=100, gift_balance=0, api_key="key-a")
    guard = CreditGuard("key-a", transport=a.transport, backend=new_backend())
    other = guard.for_key("key-b")
    assert other.account != guard.account
    assert guard.balance().total_balance == 100
    with pytest.raises(AuthenticationError):
        other.balance()  # key-b is unknown to this fake: its own read, its own answer
    assert guard.for_key("key-a").account == guard.account


def test_same_backend_shares_reservations(fake: FakeLensmor, new_backend: NewBackend) -> None:
    backend = creditguard.MemoryBackend()
    g1 = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    g2 = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    assert g1._account is g2._account
    g3 = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    assert g3._account is not g1._account


@pytest.mark.usefixtures("new_backend")
def test_memory_bounded_across_many_keys(fake: FakeLensmor) -> None:
    backend = creditguard.MemoryBackend(max_accounts=100)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
    for i in range(1000):
        guard.for_key(f"key-{i}")
    assert len(backend) <= 101
    held = guard.for_key("held")  # an account in use outlives eviction
    for i in range(1000, 1200):
        guard.for_key(f"key-{i}")
    assert guard.for_key("held")._account is held._account


# -- the module-level decorator ------------------------------------------------------------


def test_module_level_decorator(
    monkeypatch: pytest.MonkeyPatch, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())

    @requires_credits(3, guard=guard)
    def paid() -> int:
        return 1

    assert paid() == 1
    monkeypatch.setattr("creditguard.guard.guard._default", None)
    monkeypatch.delenv("LENSMOR_API_KEY", raising=False)

    @requires_credits(3)  # no guard yet, and no key: decoration must still work
    def later() -> int:
        return 2

    with pytest.raises(CreditGuardError, match="LENSMOR_API_KEY"):
        later()
    monkeypatch.setattr("creditguard.guard.guard._default", guard)
    assert later() == 2


def test_spend_repr_and_types(guard: CreditGuard) -> None:
    spend = guard.spend(3)
    assert isinstance(spend, Spend)
    assert "cost=3" in repr(spend)


def test_debug_logs_name_the_account_never_the_key(
    caplog: pytest.LogCaptureFixture, new_backend: NewBackend
) -> None:
    key = "sk-live-very-secret-0001"
    fake = FakeLensmor(api_key=key)
    guard = CreditGuard(key, transport=fake.transport, backend=new_backend())
    with caplog.at_level(logging.DEBUG, logger="creditguard"):
        with guard.spend(5):
            fake.charge(5)
        with pytest.raises(InsufficientCredits), guard.spend(10**9):
            pass
        guard.for_key("another-key-0002").invalidate()
    assert "read the balance of" in caplog.text
    assert "spent 5 credits" in caplog.text
    assert guard.account in caplog.text
    assert key not in caplog.text
    assert key not in repr(guard)
    assert key not in repr(guard._engine.upstream)
    assert key not in repr(guard._engine.upstream.key)  # type: ignore[attr-defined]
    assert key not in repr(guard._account)


def test_spend_validates_its_cost(guard: CreditGuard) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Spend(guard, -5)
    with pytest.raises(TypeError):
        Spend(guard, 2.5)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_async_callable_object_is_guarded_as_async(
    fake: FakeLensmor, new_backend: NewBackend
) -> None:
    order: list[str] = []
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        on_event=lambda e: order.append(e.kind),
        backend=new_backend(),
    )

    class Unlock:
        async def __call__(self, n: int) -> int:
            order.append("body")
            fake.charge(n)
            return n

    guarded = guard.requires_credits(lambda n: n)(Unlock())
    assert inspect.iscoroutinefunction(guarded)
    assert await guarded(3) == 3
    assert order == ["admitted", "body", "spent"]
    assert guard.balance().total_balance == 30047


def test_generators_are_refused(guard: CreditGuard) -> None:
    async def agen() -> Any:
        yield 1

    def gen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        guard.requires_credits(1)(agen)
    with pytest.raises(TypeError, match="generator"):
        guard.requires_credits(1)(gen)


def test_refusals_without_a_balance_are_observable(
    fake: FakeLensmor, new_backend: NewBackend
) -> None:
    events: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        retry=NO_RETRY,
        on_event=events.append,
        backend=new_backend(),
    )
    fake.fail_next(503)
    with pytest.raises(BalanceUnavailable), guard.spend(1):
        pass
    bad = CreditGuard(
        "wrong", transport=fake.transport, on_event=events.append, backend=new_backend()
    )
    with pytest.raises(AuthenticationError), bad.spend(1):
        pass
    assert [e.kind for e in events] == ["unavailable", "rejected"]
    assert isinstance(events[0].error, BalanceUnavailable)
    assert isinstance(events[1].error, AuthenticationError)


# -- construction: base URLs and seconds ---------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://platform.lensmor.com",
        "https://platform.lensmor.com/",
        "https://platform.lensmor.com:443",
        "https://PLATFORM.Lensmor.com:443/",
        "HTTPS://platform.lensmor.com",
    ],
)
def test_equivalent_base_urls_name_one_account(url: str, new_backend: NewBackend) -> None:
    reference = CreditGuard("k", base_url="https://platform.lensmor.com", backend=new_backend())
    guard = CreditGuard("k", base_url=url, backend=new_backend())
    assert guard.account == reference.account
    assert guard.base_url == "https://platform.lensmor.com"


def test_equivalent_base_urls_share_reservations(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    backend = new_backend()
    a = CreditGuard(fake.api_key, transport=fake.transport, backend=backend, admission_timeout=0)
    b = CreditGuard(
        fake.api_key,
        base_url="https://PLATFORM.lensmor.com:443/",
        transport=fake.transport,
        backend=backend,
        admission_timeout=0,
    )
    with a.spend(80):
        with pytest.raises(InsufficientCredits), b.spend(80):
            pytest.fail("both 80-credit calls admitted on 100 credits")
        fake.charge(80)


def test_a_base_url_with_credentials_is_refused_and_never_echoed(new_backend: NewBackend) -> None:
    with pytest.raises(CreditGuardError) as info:
        CreditGuard(
            "k", base_url="https://user:hunter2@platform.lensmor.com", backend=new_backend()
        )
    assert "hunter2" not in str(info.value)
    assert "user" not in str(info.value).replace("user:password", "")
    with pytest.raises(CreditGuardError):
        CreditGuard("k", base_url="https://platform.lensmor.com/?key=1", backend=new_backend())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": float("nan")},
        {"timeout": -1},
        {"timeout": 0},
        {"timeout": float("inf")},
        {"timeout": httpx.Timeout(1.0, read=-1.0)},
        {"timeout": httpx.Timeout(1.0, connect=float("nan"))},
        {"ttl": 10**400},
        {"ttl": float("inf")},
        {"ttl": float("nan")},
        {"admission_timeout": -1},
        {"admission_timeout": float("inf")},
        {"admission_timeout": True},
    ],
)
def test_bad_seconds_are_refused_at_construction(
    kwargs: dict[str, Any], new_backend: NewBackend
) -> None:
    with pytest.raises((ValueError, TypeError)):
        CreditGuard("k", **kwargs, backend=new_backend())


def test_an_httpx_timeout_with_no_limit_on_a_phase_is_accepted(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, timeout=httpx.Timeout(None), backend=new_backend()
    )
    assert guard.balance().total_balance == 30050


def test_for_key_never_falls_back_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, new_backend: NewBackend
) -> None:
    monkeypatch.setenv("LENSMOR_API_KEY", "operator-key")
    guard = CreditGuard(backend=new_backend())
    for bad in (None, "", " ", "key with space"):
        with pytest.raises(CreditGuardError):
            guard.for_key(bad)  # type: ignore[arg-type]
    assert guard.for_key("tenant").account != guard.account


# -- the decorator's cost functions --------------------------------------------------------


def test_a_cost_function_that_cannot_take_the_arguments_fails_at_decoration(
    new_backend: NewBackend,
) -> None:
    guard = CreditGuard("k", backend=new_backend())
    with pytest.raises(TypeError, match="cannot take the arguments of unlock"):

        @guard.requires_credits(lambda ids: 15 * len(ids))  # type: ignore[arg-type]
        def unlock(ids: list[str], *, dry_run: bool = False) -> None: ...

    with pytest.raises(TypeError, match="cannot take the arguments"):

        @guard.requires_credits(lambda: 1)  # type: ignore[arg-type]
        async def search(query: str) -> None: ...

    @guard.requires_credits(lambda ids, *, dry_run=False: 0 if dry_run else 15 * len(ids))
    def unlock_ok(ids: list[str], *, dry_run: bool = False) -> None: ...

    @guard.requires_credits(lambda *args, **kwargs: 1)
    def anything(a: int, b: str = "") -> None: ...


# -- an interrupted event hook -------------------------------------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_the_admitted_hook_leaves_no_reservation(
    interrupt: type[BaseException],
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)

    def hook(event: GuardEvent) -> None:
        if event.kind == "admitted" and event.cost == 60:
            raise interrupt

    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=hook, backend=new_backend()
    )
    ran = []
    with pytest.raises(interrupt), guard.spend(60):
        ran.append(60)
    assert not ran
    assert guard._account.snapshot()[1:] == (0, 0)
    with guard.spend(50):  # not "50 required, 40 available"
        fake.charge(50)


@pytest.mark.anyio
async def test_an_interrupt_in_the_unchecked_hook_leaves_no_reservation(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)

    def hook(event: GuardEvent) -> None:
        if event.kind == "unchecked":
            raise KeyboardInterrupt

    guard = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        on_event=hook,
        on_unavailable="allow",
        retry=RetryPolicy(attempts=1),
        backend=new_backend(),
    )
    fake.fail_next(503)
    with pytest.raises(KeyboardInterrupt):
        async with guard.spend(60):
            pytest.fail("must not run")
    assert guard._account.snapshot()[1:] == (0, 0)


# -- current_spend() -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_current_spend_inside_decorated_functions(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    seen: list[Spend | None] = []

    @guard.requires_credits(lambda ids: 15 * len(ids))
    async def unlock(ids: list[str]) -> None:
        seen.append(current_spend())

    @guard.requires_credits(10)
    def search() -> None:
        seen.append(current_spend())

    assert current_spend() is None
    await unlock(["a", "b"])
    await anyio.to_thread.run_sync(search)
    assert current_spend() is None
    first, second = seen
    assert first is not None
    assert second is not None
    assert (first.cost, second.cost) == (30, 10)
    assert first.balance_before is not None
    assert first.balance_before.total_balance == 30050


def test_current_spend_nests_and_stays_in_its_thread(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    other: list[Spend | None] = []
    with guard.spend(5) as outer:
        assert current_spend() is outer
        with guard.spend(3) as inner:
            assert current_spend() is inner
            t = threading.Thread(target=lambda: other.append(current_spend()))
            t.start()
            t.join()
        assert current_spend() is outer
    assert current_spend() is None
    assert other == [None]


def test_spends_exited_out_of_order_leave_no_finished_spend_current(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    a, b, c = guard.spend(1), guard.spend(2), guard.spend(3)
    a.__enter__()
    b.__enter__()
    c.__enter__()
    b.__exit__(None, None, None)  # the middle one first
    assert current_spend() is c
    c.__exit__(None, None, None)
    assert current_spend() is a  # not b, which has finished
    a.__exit__(None, None, None)
    assert current_spend() is None
    a2, b2 = guard.spend(1), guard.spend(2)
    a2.__enter__()
    b2.__enter__()
    a2.__exit__(None, None, None)  # the outer one first
    assert current_spend() is b2
    b2.__exit__(None, None, None)
    assert current_spend() is None


@pytest.mark.anyio
async def test_a_task_started_inside_a_spend_does_not_see_it_once_it_ended(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    ended = anyio.Event()
    seen: list[Spend | None] = []

    async def child() -> None:
        await ended.wait()
        seen.append(current_spend())

    async with anyio.create_task_group() as tg:
        async with guard.spend(1):
            tg.start_soon(child)  # inherits the context, with the spend current
        ended.set()
    assert seen == [None]
