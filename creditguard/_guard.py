"""The guard: ``CreditGuard``, ``Spend`` and the ``requires_credits`` decorators.

The admission and settling logic lives in :mod:`creditguard._state`; this module drives it
from sync code (waiting on ``threading.Event``, reading through an httpx transport) and from
async code (waiting on an anyio event of the caller's loop, reading through an httpx async
transport).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, cast

import httpx

from ._client import AsyncBalanceClient, BalanceClient, RetryPolicy, Secret, _Reader
from ._errors import (
    AuthenticationError,
    BalanceUnavailable,
    CreditGuardError,
    InsecureTransportError,
    InsufficientCredits,
)
from ._models import CreditBalance
from ._state import Account, Flight, MemoryBackend, StateBackend

__all__ = ["DEFAULT_BASE_URL", "CreditGuard", "GuardEvent", "Spend", "requires_credits"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# An operation on the account state: yields the reads it needs, is sent their flights.
_Steps = Generator[tuple[Flight, bool], Flight, T]

DEFAULT_BASE_URL = "https://platform.lensmor.com"
logger = logging.getLogger("creditguard")

Cost = int | Callable[..., int]
OnUnavailable = Literal["deny", "allow"]


@dataclasses.dataclass(frozen=True, slots=True)
class GuardEvent:
    """What the guard just did, for ``on_event`` observers.

    ``kind`` is one of ``"admitted"``, ``"denied"`` (not enough credits), ``"unavailable"``
    (refused because the balance could not be read, failing closed), ``"rejected"`` (the key
    was refused), ``"unchecked"`` (admitted without a balance under
    ``on_unavailable="allow"``), ``"spent"`` (with the balance before and after),
    ``"failed"`` (the action raised), ``"cancelled"`` (cancelled in the action or in the
    refresh after it) and ``"refresh_failed"``. ``account`` is the account's fingerprint,
    never the key.
    """

    kind: str
    account: str
    cost: int
    balance_before: CreditBalance | None = None
    balance_after: CreditBalance | None = None
    available: int | None = None
    error: BaseException | None = None


def _check_cost(cost: object) -> int:
    if type(cost) is not int:
        raise TypeError(f"a credit cost must be an int, got {type(cost).__name__}")
    if cost < 0:
        raise ValueError(f"a credit cost must be >= 0, got {cost}")
    return cost


def _fingerprint(base_url: str, api_key: str) -> str:
    digest = hashlib.sha256(f"{base_url}\n{api_key}".encode()).hexdigest()
    return f"acct_{digest[:20]}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_base_url(base_url: str, allow_insecure_http: bool) -> str:
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise CreditGuardError(f"invalid base_url {base_url!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise CreditGuardError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
    if url.scheme == "http" and not allow_insecure_http and not _is_loopback(url.host):
        raise InsecureTransportError(
            f"refusing to send the API key over plain http:// to {url.host}; use https://,"
            " a loopback address, or pass allow_insecure_http=True"
        )
    return base_url.rstrip("/")


def _check_key(api_key: str | None) -> str:
    if api_key is None:
        api_key = os.environ.get("LENSMOR_API_KEY") or None
    if api_key is None:
        raise CreditGuardError(
            "no API key: pass api_key=... or set the LENSMOR_API_KEY environment variable"
        )
    if not isinstance(api_key, str):
        raise TypeError(f"api_key must be a str, got {type(api_key).__name__}")
    if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        raise CreditGuardError("the API key is malformed (empty, whitespace or non-ASCII)")
    return api_key


class _Shared:
    """What every view of one guard shares: configuration, HTTP clients, state backend."""

    __slots__ = (
        "aclient",
        "backend",
        "base_url",
        "client",
        "on_event",
        "on_unavailable",
        "reader",
        "ttl",
    )

    def __init__(
        self,
        *,
        base_url: str,
        ttl: float,
        on_unavailable: OnUnavailable,
        on_event: Callable[[GuardEvent], None] | None,
        backend: StateBackend,
        reader: _Reader,
        client: BalanceClient,
        aclient: AsyncBalanceClient,
    ) -> None:
        self.base_url = base_url
        self.reader = reader
        self.ttl = ttl
        self.on_unavailable = on_unavailable
        self.on_event = on_event
        self.backend = backend
        self.client = client
        self.aclient = aclient


class CreditGuard:
    """Checks an account's credits before a paid action and reports what it spent.

    ``api_key`` defaults to ``LENSMOR_API_KEY``; ``base_url`` to ``LENSMOR_BASE_URL``, else
    ``https://platform.lensmor.com``. ``ttl`` is how long (seconds) a balance read is
    trusted for admission. ``transport`` is an httpx transport used by both the sync and
    the async client (``httpx.MockTransport`` and ``FakeLensmor.transport`` serve both).
    ``on_unavailable="allow"`` runs actions unchecked (with a warning) when the balance
    cannot be read; it never covers a rejected key. ``timeout`` applies to each request;
    ``retry`` bounds attempts and total time of one read. ``backend`` holds the account
    state (one in-memory backend per guard by default: pass one backend to several guards
    to make them coordinate). ``on_event`` is called for every admission, denial, spend
    and refresh failure.
    """

    __slots__ = ("_account", "_key", "_owner", "_shared")

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        ttl: float = 5.0,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        on_unavailable: OnUnavailable = "deny",
        timeout: float | httpx.Timeout = 3.0,
        retry: RetryPolicy | None = None,
        backend: StateBackend | None = None,
        on_event: Callable[[GuardEvent], None] | None = None,
        verify: bool | ssl.SSLContext = True,
        allow_insecure_http: bool = False,
    ) -> None:
        key = _check_key(api_key)
        if base_url is None:
            base_url = os.environ.get("LENSMOR_BASE_URL") or DEFAULT_BASE_URL
        base_url = _check_base_url(base_url, allow_insecure_http)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 0:
            raise ValueError(f"ttl must be a number of seconds >= 0, got {ttl!r}")
        if on_unavailable not in ("deny", "allow"):
            raise ValueError(f"on_unavailable must be 'deny' or 'allow', got {on_unavailable!r}")
        if transport is not None and not isinstance(
            transport, (httpx.BaseTransport, httpx.AsyncBaseTransport)
        ):
            raise TypeError(f"transport must be an httpx transport, got {type(transport).__name__}")
        reader = _Reader(
            base_url,
            timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            retry or RetryPolicy(),
        )
        sync_transport = transport if isinstance(transport, httpx.BaseTransport) else None
        async_transport = transport if isinstance(transport, httpx.AsyncBaseTransport) else None
        self._shared = _Shared(
            base_url=base_url,
            ttl=float(ttl),
            on_unavailable=on_unavailable,
            on_event=on_event,
            backend=backend if backend is not None else MemoryBackend(),
            reader=reader,
            client=BalanceClient(
                reader,
                transport=sync_transport,
                verify=verify,
                missing=transport is not None and sync_transport is None,
            ),
            aclient=AsyncBalanceClient(
                reader,
                transport=async_transport,
                verify=verify,
                missing=transport is not None and async_transport is None,
            ),
        )
        self._owner = True
        self._bind(key)

    def _bind(self, key: str) -> None:
        shared = self._shared
        self._key = Secret(key)
        self._account: Account = shared.backend.account(_fingerprint(shared.base_url, key))

    def for_key(self, api_key: str) -> CreditGuard:
        """A guard for another API key that shares this one's configuration and clients.

        For multi-tenant apps: each key is its own account with its own balance and
        reservations. Closing the view closes nothing; close the guard it came from.
        """
        view = object.__new__(CreditGuard)
        view._shared = self._shared
        view._owner = False
        view._bind(_check_key(api_key))
        return view

    @property
    def account(self) -> str:
        """The account's fingerprint (a hash of base URL and key; never the key)."""
        return self._account.fingerprint

    @property
    def base_url(self) -> str:
        return self._shared.base_url

    @property
    def ttl(self) -> float:
        return self._shared.ttl

    def __repr__(self) -> str:
        return f"<CreditGuard account={self.account} base_url={self._shared.base_url!r}>"

    # -- balance -------------------------------------------------------------------

    def balance(self, *, refresh: bool = False) -> CreditBalance:
        """The account's balance through the TTL cache (``refresh=True`` reads it anew)."""
        return self._drive(self._read(refresh))

    async def abalance(self, *, refresh: bool = False) -> CreditBalance:
        """Async :meth:`balance`: the same cache, read through an httpx async transport."""
        return await self._adrive(self._read(refresh))

    def invalidate(self) -> None:
        """Forget the cached balance; reads already in flight will not be trusted."""
        self._account.invalidate()

    # -- the logic, once ---------------------------------------------------------------
    #
    # Each operation is a generator over the account state. It yields ``(flight, lead)``
    # when it needs a balance read performed or awaited, and is sent back the flight
    # whose outcome to look at (or has the read's exception thrown in). ``_drive`` runs
    # one from sync code, ``_adrive`` from async code: they are the only difference.

    def _read(self, refresh: bool) -> _Steps[CreditBalance]:
        account = self._account
        if refresh:
            return (yield from self._settle(*account.bump()))
        flight: Flight | None = None
        while True:
            step = account.read_step(self._shared.ttl, flight)
            if isinstance(step, CreditBalance):
                return step
            flight = yield step

    def _settle(self, after: int, step: tuple[Flight, bool]) -> _Steps[CreditBalance]:
        """A balance read that started at or after ``after``; ``step`` is the first read
        to wait on or perform."""
        account = self._account
        while True:
            flight = yield step
            # A finished flight's fields no longer change: no lock needed to look.
            if flight.result is not None and flight.start_seq >= after:
                return flight.result
            next_step = account.settle_step(after, flight)
            if isinstance(next_step, CreditBalance):
                return next_step
            step = next_step

    def _admit_cached(self, spend: Spend) -> bool:
        """The warm path, no generator: admit on a fresh cached balance if there is one."""
        try:
            balance = self._account.try_admit(spend.cost, self._shared.ttl)
        except InsufficientCredits as exc:
            self._denied(exc)
            raise
        if balance is None:
            return False
        self._admitted(spend, balance)
        return True

    def _admit(self, spend: Spend) -> _Steps[None]:
        account = self._account
        cost = spend.cost
        ttl = self._shared.ttl
        flight: Flight | None = None
        try:
            while True:
                step = account.admit_step(cost, ttl, flight)
                if isinstance(step, CreditBalance):
                    break
                flight = yield step
        except InsufficientCredits as exc:
            self._denied(exc)
            raise
        except BalanceUnavailable as exc:
            self._unavailable(spend, exc)
            return
        except AuthenticationError as exc:
            if self._shared.on_event is not None:
                self._emit("rejected", spend.cost, error=exc)
            raise
        self._admitted(spend, step)

    def _admitted(self, spend: Spend, balance: CreditBalance) -> None:
        spend.balance_before = balance
        if self._shared.on_event is not None:
            self._emit("admitted", spend.cost, balance)

    def _exit(self, spend: Spend, exc: BaseException | None) -> _Steps[None]:
        account = self._account
        if exc is not None:
            account.release_invalidate(spend.cost)
            self._failed(spend, exc)
            return
        settlement, step = account.begin_settle(spend.cost)
        try:
            balance = yield from self._settle(settlement.after, step)
        except Exception as error:
            account.end_settle(settlement, failed=True)
            self._refresh_failed(spend, error)
            return
        except BaseException as cancelled:
            # Cancelled (or interrupted) after the action succeeded, while refreshing:
            # the spend happened but is not measured. Forget the balance, release, go on
            # being cancelled.
            account.end_settle(settlement, failed=True)
            self._failed(spend, cancelled)
            raise
        account.end_settle(settlement)
        self._spent(spend, balance)

    # -- the two I/O edges -------------------------------------------------------------

    def _drive(self, steps: _Steps[T]) -> T:
        """Run an operation from sync code: reads through the sync transport, waits on a
        thread event."""
        try:
            step = next(steps)
            while True:
                try:
                    flight = self._io_sync(*step)
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(flight)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _adrive(self, steps: _Steps[T]) -> T:
        """Run an operation from async code: reads with the async transport, waits on an
        event of this loop. (The read is inline: no await hop between caller and read.)"""
        account = self._account
        try:
            step = next(steps)
            while True:
                flight, lead = step
                try:
                    if lead:
                        try:
                            result = await self._shared.aclient.read(self._balance_request())
                        except Exception as exc:
                            account.complete(flight, error=exc)
                            raise
                        except BaseException:
                            account.complete(flight)  # abandoned: a waiter leads the next
                            raise
                        account.complete(flight, result=result)
                        self._log_read(result)
                    else:
                        await flight.await_done(account.lock)
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(flight)
        except StopIteration as stop:
            value: T = stop.value
            return value

    def _balance_request(self) -> httpx.Request:
        return self._shared.reader.request(self._account.fingerprint, self._key)

    def _io_sync(self, flight: Flight, lead: bool) -> Flight:
        """Perform or wait for ``flight``; return the read whose outcome to look at."""
        if not lead:
            if flight.thread != threading.get_ident():
                flight.wait(self._account.lock)
                return flight
            # The read is led by a task of the event loop this thread is blocking:
            # waiting would deadlock, so read on our own.
            flight = self._account.private_flight()
        account = self._account
        try:
            result = self._shared.client.read(self._balance_request())
        except Exception as exc:
            account.complete(flight, error=exc)
            raise
        except BaseException:
            account.complete(flight)
            raise
        account.complete(flight, result=result)
        self._log_read(result)
        return flight

    def _log_read(self, balance: CreditBalance) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "read the balance of %s: %d total (%d subscription, %d gift)",
                self._account.fingerprint,
                balance.total_balance,
                balance.subscription_balance,
                balance.gift_balance,
            )

    # -- outcomes ------------------------------------------------------------------

    def _denied(self, exc: InsufficientCredits) -> None:
        logger.info(
            "denied %s credits on %s: %s available",
            exc.required,
            self._account.fingerprint,
            exc.available,
        )
        if self._shared.on_event is not None:
            self._emit("denied", exc.required, exc.balance, available=exc.available, error=exc)

    def _unavailable(self, spend: Spend, exc: BalanceUnavailable) -> None:
        """Fail closed (re-raise) unless the guard was told to fail open."""
        if self._shared.on_unavailable != "allow":
            if self._shared.on_event is not None:
                self._emit("unavailable", spend.cost, error=exc)
            raise exc
        logger.warning(
            "balance unavailable for %s (%s); running a %s-credit action unchecked"
            " (on_unavailable='allow')",
            self._account.fingerprint,
            exc,
            spend.cost,
        )
        self._account.reserve_unchecked(spend.cost)
        if self._shared.on_event is not None:
            self._emit("unchecked", spend.cost, error=exc)

    def _spent(self, spend: Spend, balance: CreditBalance) -> None:
        spend.balance_after = balance
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "spent %d credits on %s: %s -> %d",
                spend.cost,
                self._account.fingerprint,
                "unchecked" if spend.balance_before is None else spend.balance_before.total_balance,
                balance.total_balance,
            )
        if self._shared.on_event is not None:
            self._emit("spent", spend.cost, spend.balance_before, balance)

    def _failed(self, spend: Spend, exc: BaseException) -> None:
        kind = "failed" if isinstance(exc, Exception) else "cancelled"
        if self._shared.on_event is not None:
            self._emit(kind, spend.cost, spend.balance_before, error=exc)

    def _refresh_failed(self, spend: Spend, error: Exception) -> None:
        logger.warning(
            "the action on %s succeeded but the balance refresh after it failed: %s",
            self._account.fingerprint,
            error,
        )
        if self._shared.on_event is not None:
            self._emit("refresh_failed", spend.cost, spend.balance_before, error=error)

    def _emit(
        self,
        kind: str,
        cost: int,
        before: CreditBalance | None = None,
        after: CreditBalance | None = None,
        *,
        available: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        on_event = self._shared.on_event
        if on_event is None:
            return
        event = GuardEvent(kind, self._account.fingerprint, cost, before, after, available, error)
        try:
            on_event(event)
        except Exception:
            logger.exception("on_event hook raised on a %r event", kind)

    # -- public spending API -----------------------------------------------------------

    def spend(self, cost: int) -> Spend:
        """Guard a block: ``with guard.spend(25) as s:`` or ``async with guard.spend(25) as s:``."""
        return Spend(self, cost)

    def requires_credits(self, cost: Cost) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a sync or async function so each call is guarded for ``cost`` credits.

        ``cost`` is an int >= 0, or a callable taking the decorated function's arguments
        and returning one (evaluated, and validated, before any request).
        """
        return _decorator(cost, lambda: self)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP clients (a :meth:`for_key` view closes nothing)."""
        if self._owner:
            self._shared.client.close()
            self._shared.aclient.drop()

    async def aclose(self) -> None:
        if self._owner:
            self._shared.client.close()
            await self._shared.aclient.aclose()

    def __enter__(self) -> CreditGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> CreditGuard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Spend:
    """One guarded spend of ``cost`` credits; a sync and async context manager.

    ``balance_before`` is the balance the admission was decided on (``None`` only when
    run unchecked under ``on_unavailable="allow"``). ``balance_after`` is set when the
    block exits: the balance read after the action finished, or ``None`` when that
    refresh failed or the block raised or was cancelled.
    """

    __slots__ = ("_entered", "_guard", "balance_after", "balance_before", "cost")

    def __init__(self, guard: CreditGuard, cost: int) -> None:
        self._guard = guard
        self._entered = False
        self.cost = _check_cost(cost)
        self.balance_before: CreditBalance | None = None
        self.balance_after: CreditBalance | None = None

    def __repr__(self) -> str:
        before = None if self.balance_before is None else self.balance_before.total_balance
        after = None if self.balance_after is None else self.balance_after.total_balance
        return f"<Spend cost={self.cost} before={before} after={after}>"

    def _enter(self) -> None:
        if self._entered:
            raise RuntimeError("a Spend can be entered only once; call guard.spend() again")
        self._entered = True

    def __enter__(self) -> Spend:
        self._enter()
        guard = self._guard
        if not guard._admit_cached(self):
            guard._drive(guard._admit(self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self._guard
        guard._drive(guard._exit(self, exc))

    async def __aenter__(self) -> Spend:
        self._enter()
        guard = self._guard
        if not guard._admit_cached(self):
            await guard._adrive(guard._admit(self))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self._guard
        await guard._adrive(guard._exit(self, exc))


def _is_async(func: Callable[..., object]) -> bool:
    """A coroutine function, or a callable object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - the method itself is inspected
    return not inspect.isfunction(func) and inspect.iscoroutinefunction(call)


def _decorator(
    cost: Cost, get_guard: Callable[[], CreditGuard]
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    if callable(cost):
        cost_of: Callable[..., int] = cost
        static: int | None = None
    else:
        static = _check_cost(cost)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        if not callable(func):
            raise TypeError(f"requires_credits decorates a function, got {type(func).__name__}")
        if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
            raise TypeError(
                "requires_credits cannot guard a generator: its body runs after the call"
                " returns; guard the code that spends with `guard.spend()` instead"
            )
        if _is_async(func):
            afunc = cast(Callable[P, Awaitable[Any]], func)

            @functools.wraps(func)
            async def async_guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
                amount = static if static is not None else _check_cost(cost_of(*args, **kwargs))
                async with Spend(get_guard(), amount):
                    return await afunc(*args, **kwargs)

            return cast(Callable[P, R], async_guarded)

        @functools.wraps(func)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            amount = static if static is not None else _check_cost(cost_of(*args, **kwargs))
            with Spend(get_guard(), amount):
                return func(*args, **kwargs)

        return guarded

    return decorate


_default: CreditGuard | None = None
_default_lock = threading.Lock()


def _default_guard() -> CreditGuard:
    global _default
    guard = _default
    if guard is None:
        with _default_lock:
            if _default is None:
                _default = CreditGuard()
            guard = _default
    return guard


def requires_credits(
    cost: Cost, *, guard: CreditGuard | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Module-level decorator; without ``guard``, a default :class:`CreditGuard` is built
    from the environment (``LENSMOR_API_KEY``, ``LENSMOR_BASE_URL``) at the first call."""
    if guard is not None:
        return guard.requires_credits(cost)
    return _decorator(cost, _default_guard)
