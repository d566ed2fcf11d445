"""The guard: ``CreditGuard``, its logic (admission, settling, outcomes) written once as
generators of steps, and the module-level ``requires_credits``.

The account state it decides on is behind ``AccountState`` (``_protocols.py``: the memory
backend in ``_state.py``, Redis in ``redis.py``); the two I/O edges that run the logic from
sync and from async code are in ``_edges.py``; ``Spend`` is in ``_spend.py``, the decorator
machinery in ``_decorate.py``, ``Precheck`` in ``_precheck.py``, the configuration checks
in ``_config.py``, ``GuardEvent`` in ``_shared.py``; all are importable from here as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ParamSpec, TypeVar, cast, overload

import httpx

from creditguard.backends.memory.account import MemoryBackend
from creditguard.core.checks import (
    _check_base_url,
    _check_key,
    _check_seconds,
    _check_timeout,
    _fingerprint,
)
from creditguard.core.drive import _Edges
from creditguard.core.engine import GuardEvent, OnUnavailable, _Shared
from creditguard.core.errors import (
    ActionNotAllowed,
    AdmissionTimeout,
    AuthenticationError,
    BalanceUnavailable,
    GateTimeout,
    InsufficientCredits,
    InvalidResponse,
    UnknownHold,
)
from creditguard.core.models import AccountSnapshot, CreditBalance, PrecheckResult
from creditguard.core.roles import AccountState, StateBackend
from creditguard.core.secret import Secret
from creditguard.core.steps import Flight, Reservation, Step, Steps, Turn, Waiter, own_credits
from creditguard.guard.decorate import _CostDecorator, _Decorator, _decorator
from creditguard.guard.hold import Hold, look, take
from creditguard.guard.spend import Spend, _current, current_spend
from creditguard.lensmor.client import AsyncBalanceClient, BalanceClient, RetryPolicy
from creditguard.lensmor.precheck import Cost, Precheck
from creditguard.lensmor.reader import _Reader
from creditguard.lensmor.reports import is_insufficient_credits, parse_report

__all__ = [
    "DEFAULT_BASE_URL",
    "CreditGuard",
    "GuardEvent",
    "Hold",
    "Precheck",
    "Spend",
    "current_spend",
    "default_guard",
    "requires_credits",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_monotonic = time.monotonic

DEFAULT_BASE_URL = "https://platform.lensmor.com"
"""The base URL when neither ``base_url`` nor ``LENSMOR_BASE_URL`` is given."""
logger = logging.getLogger("creditguard")


class CreditGuard(_Edges):
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

    ``admission_timeout`` (seconds, 5 by default) bounds how long a call may wait at
    admission when the balance covers its cost but the credits reserved by calls in
    flight leave too little: it waits for those calls to settle, then decides on a
    balance that includes them, so it is refused only when the account really cannot
    pay. It waits while they keep settling, at most ``admission_timeout`` between two of
    them and ten times that in all. ``0`` refuses at once instead.

    ``max_concurrent`` (``None``: no limit) is the account's gate: at most that many
    guarded actions (spend blocks, decorated calls, holds until their ``with`` block ends)
    of the account in flight at once, in this process with the memory backend and across
    every process sharing a Redis backend. Lensmor answers ``409`` to a second credit
    operation in progress for one key, so ``max_concurrent=1`` sends them one at a time.
    Further callers wait their turn, in the order they came, for at most
    ``gate_timeout`` seconds, then get :class:`GateTimeout`. Waiting holds no
    reservation; a guarded call made inside another of the same account runs in the
    enclosing one's turn.
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
        admission_timeout: float = 5.0,
        timeout: float | httpx.Timeout = 3.0,
        retry: RetryPolicy | None = None,
        backend: StateBackend | None = None,
        on_event: Callable[[GuardEvent], None] | None = None,
        verify: bool | ssl.SSLContext = True,
        allow_insecure_http: bool = False,
        max_concurrent: int | None = None,
        gate_timeout: float = 30.0,
    ) -> None:
        key = _check_key(api_key)
        if max_concurrent is not None and (type(max_concurrent) is not int or max_concurrent < 1):
            raise ValueError(f"max_concurrent must be an int >= 1 or None, got {max_concurrent!r}")
        gate_timeout = _check_seconds("gate_timeout", gate_timeout)
        if base_url is None:
            base_url = os.environ.get("LENSMOR_BASE_URL") or DEFAULT_BASE_URL
        base_url = _check_base_url(base_url, allow_insecure_http)
        ttl = _check_seconds("ttl", ttl)
        admission_timeout = _check_seconds("admission_timeout", admission_timeout)
        if on_unavailable not in ("deny", "allow"):
            raise ValueError(f"on_unavailable must be 'deny' or 'allow', got {on_unavailable!r}")
        if transport is not None and not isinstance(
            transport, (httpx.BaseTransport, httpx.AsyncBaseTransport)
        ):
            raise TypeError(f"transport must be an httpx transport, got {type(transport).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        reader = _Reader(base_url, _check_timeout(timeout), retry or RetryPolicy())
        sync_transport = transport if isinstance(transport, httpx.BaseTransport) else None
        async_transport = transport if isinstance(transport, httpx.AsyncBaseTransport) else None
        self._shared = _Shared(
            base_url=base_url,
            ttl=ttl,
            admission_timeout=admission_timeout,
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
            max_concurrent=max_concurrent,
            gate_timeout=gate_timeout,
        )
        self._owner = True
        self._bind(key)

    def _bind(self, key: str) -> None:
        shared = self._shared
        self._key = Secret(key)
        self._account: AccountState = shared.backend.account(_fingerprint(shared.base_url, key))

    def for_key(self, api_key: str) -> CreditGuard:
        """A guard for another API key that shares this one's configuration and clients.

        For multi-tenant apps: each key is its own account with its own balance and
        reservations. The key must be given: ``None`` or a malformed key raises
        :class:`CreditGuardError` (never a fall back to ``LENSMOR_API_KEY``, which would
        spend from the operator's account). Closing the view closes nothing; close the
        guard it came from.
        """
        key = _check_key(api_key, from_env=False)
        view = object.__new__(CreditGuard)
        view._shared = self._shared
        view._owner = False
        view._bind(key)
        return view

    @property
    def account(self) -> str:
        """The account's fingerprint (a hash of base URL and key; never the key)."""
        return self._account.fingerprint

    @property
    def base_url(self) -> str:
        """The base URL of the credits service, normalised, without a trailing ``/``."""
        return self._shared.base_url

    @property
    def ttl(self) -> float:
        """Seconds a balance read is trusted for admission."""
        return self._shared.ttl

    @property
    def admission_timeout(self) -> float:
        """Seconds a call may wait at admission for calls in flight to settle."""
        return self._shared.admission_timeout

    @property
    def max_concurrent(self) -> int | None:
        """At most this many guarded actions of the account in flight (``None``: no gate)."""
        return self._shared.max_concurrent

    def __repr__(self) -> str:
        return f"<CreditGuard account={self.account} base_url={self._shared.base_url!r}>"

    # -- balance -------------------------------------------------------------------

    def balance(self, *, refresh: bool = False) -> CreditBalance:
        """The account's balance through the TTL cache (``refresh=True`` reads it anew)."""
        return self._drive(self._read(refresh, True))

    async def abalance(self, *, refresh: bool = False) -> CreditBalance:
        """Async :meth:`balance`: the same cache, read through an httpx async transport."""
        return await self._adrive(self._read(refresh, False))

    def snapshot(self) -> AccountSnapshot:
        """What the guard holds for this account now: the cached balance, the credits
        reserved by guarded calls in flight, the open holds, the finished calls waiting
        for a read and the callers queued at the gate (over Redis: across every process).
        Makes no request to Lensmor."""
        return self._drive(self._account.survey())

    async def asnapshot(self) -> AccountSnapshot:
        """Async :meth:`snapshot`."""
        return await self._adrive(self._account.survey())

    def invalidate(self) -> None:
        """Forget the cached balance; reads already in flight will not be trusted."""
        self._account.invalidate()

    # -- precheck ------------------------------------------------------------------

    def precheck(self, action_type: str, params: Mapping[str, Any]) -> PrecheckResult:
        """Ask Lensmor what ``action_type`` with ``params`` would charge, without charging
        (``POST /external/actions/precheck``; one request, not retried)."""
        shared = self._shared
        request = shared.reader.precheck_request(self._key, action_type, params)
        response, body = shared.client.send(request)
        return shared.reader.precheck_answer(response, body)

    async def aprecheck(self, action_type: str, params: Mapping[str, Any]) -> PrecheckResult:
        """Async :meth:`precheck`."""
        shared = self._shared
        request = shared.reader.precheck_request(self._key, action_type, params)
        response, body = await shared.aclient.send(request)
        return shared.reader.precheck_answer(response, body)

    def _covers(self, credits: int) -> bool:
        """Whether the fresh cached balance, less what calls in flight hold, covers
        ``credits`` (no request)."""
        account = self._account
        if not account.fresh(self._shared.ttl):
            return False
        cached, reserved, _ = account.snapshot()
        return cached is not None and cached.total_balance - reserved >= credits

    def _precheck_decision(self, result: PrecheckResult, available: int | None) -> int:
        """The credits to admit for, from the precheck's answer (0: nothing to charge),
        or the refusal it means."""
        if not result.allowed:
            if result.reason_code == "insufficient_balance":
                exc = InsufficientCredits(result.credits, available or 0)
                self._denied(exc)
                raise exc
            raise ActionNotAllowed(result.reason_code, result.detail)
        if not result.should_charge:
            return 0
        return result.credits

    def _cost_of(self, cost: Precheck, params: Mapping[str, Any]) -> int:
        if cost.at_most is not None and self._covers(cost.at_most):
            return cost.at_most
        result = self.precheck(cost.action_type, params)
        short = not result.allowed and result.reason_code == "insufficient_balance"
        # Lensmor says the balance is short: the cached one may not know yet, so read.
        available = self.balance(refresh=True).total_balance if short else None
        return self._precheck_decision(result, available)

    async def _acost_of(self, cost: Precheck, params: Mapping[str, Any]) -> int:
        if cost.at_most is not None and self._covers(cost.at_most):
            return cost.at_most
        result = await self.aprecheck(cost.action_type, params)
        short = not result.allowed and result.reason_code == "insufficient_balance"
        available = (await self.abalance(refresh=True)).total_balance if short else None
        return self._precheck_decision(result, available)

    # -- the logic, once ---------------------------------------------------------------
    #
    # Each operation is a generator over the account state. It yields ``(flight, lead)``
    # when it needs a balance read performed or awaited, and is sent back the flight
    # whose outcome to look at (or has the read's exception thrown in). ``_drive`` runs
    # one from sync code, ``_adrive`` from async code: they are the only difference.

    def _read(self, refresh: bool, sync: bool) -> Steps[CreditBalance]:
        account = self._account
        if refresh:
            bumped, first = yield from account.bumped(sync)
            return (yield from self._settle(bumped, first, sync))
        after = yield from account.pending()
        if after:  # finished spends wait for a read: the balance must include them
            settled = yield from account.read_after(after, None, sync)
            if isinstance(settled, CreditBalance):
                return settled
            return (yield from self._settle(after, settled, sync))
        flight: Flight | None = None
        while True:
            step = yield from account.read(self._shared.ttl, flight, sync)
            if isinstance(step, CreditBalance):
                return step
            flight = cast(Flight, (yield step))

    def _settle(self, after: int, step: Step, sync: bool) -> Steps[CreditBalance]:
        """A balance read that started at or after ``after``; ``step`` is the first read
        to wait on or perform."""
        account = self._account
        while True:
            flight = cast(Flight, (yield step))
            # A finished flight's fields no longer change: no lock needed to look.
            if flight.result is not None and flight.start_seq >= after:
                return flight.result
            next_step = yield from account.read_after(after, flight, sync)
            if isinstance(next_step, CreditBalance):
                return next_step
            step = next_step

    def _enclosing(self) -> Iterator[Spend]:
        """The spends of this account that the caller runs inside, innermost first."""
        account = self._account
        outer = _current.get()
        while outer is not None:
            if outer._active and outer._guard._account is account:
                yield outer
            outer = outer._outer

    def _take_turn(self, sync: bool) -> Steps[Turn | None]:
        """A turn at the account's gate (``None``: no gate, or the caller runs inside an
        enclosing guarded call of the account, whose turn it shares). Queued in order;
        bounded by ``gate_timeout``; a caller that gives up (or is cancelled) leaves no
        place in the queue."""
        shared = self._shared
        limit = shared.max_concurrent
        if limit is None:
            return None
        account = self._account
        if _current.get() is not None:
            me = _caller()
            for outer in self._enclosing():
                if outer._turn is not None and outer._turn.owner == me:
                    return None
        turn = Turn(os.urandom(8).hex())
        turn.owner = _caller()
        started = _monotonic()
        until = started + shared.gate_timeout
        try:
            while True:
                step = yield from account.enter(turn, limit, sync, until)
                if step is True:
                    return turn
                if _monotonic() >= until:
                    raise GateTimeout(limit, _monotonic() - started)
                yield cast(Step, step)
        except BalanceUnavailable as exc:  # the gate's backend is unreachable
            yield from account.leave(turn)
            if shared.on_unavailable != "allow":
                raise
            logger.warning(
                "the gate of %s is unavailable (%s); running without a turn"
                " (on_unavailable='allow')",
                account.fingerprint,
                exc,
            )
            return None
        except BaseException:
            yield from account.leave(turn)
            raise

    def _open(self, spend: Spend, sync: bool) -> Steps[None]:
        """Take a turn at the gate, then admit ``spend`` (giving the turn back if it is
        refused)."""
        if self._shared.max_concurrent is not None and spend.cost:
            yield from self._payable(spend, sync)
        spend._turn = yield from self._take_turn(sync)
        try:
            if not self._admit_cached(spend):
                yield from self._admit(spend, sync)
        except BaseException:
            turn, spend._turn = spend._turn, None
            if turn is not None:
                yield from self._account.leave(turn)
            raise

    def _payable(self, spend: Spend, sync: bool) -> Steps[None]:
        """Before queueing at the gate: refuse a call the account cannot pay even if the
        calls in flight charge nothing (its turn would only make it wait to be refused).
        A balance that cannot be read decides nothing here: admission, after the turn,
        applies ``on_unavailable``."""
        try:
            balance = yield from self._read(False, sync)
        except BalanceUnavailable:
            return
        except AuthenticationError as exc:
            if self._shared.on_event is not None:
                self._emit("rejected", spend.cost, error=exc)
            raise
        held = yield from self._account.committed()
        own = own_credits(tuple(o._reservation for o in self._enclosing() if o._reservation))
        free = balance.total_balance - held - own
        if spend.cost > free:
            refusal = InsufficientCredits(spend.cost, max(0, free), balance, reserved=held)
            self._denied(refusal)
            raise refusal

    def _admit_cached(self, spend: Spend) -> bool:
        """The warm path, no generator: admit on a fresh cached balance that covers the
        cost with room for every reservation (anything else goes the slow way)."""
        reservation = self._account.try_admit(spend.cost, self._shared.ttl, spend._defer)
        if reservation is None:
            return False
        self._admitted(spend, reservation)
        return True

    def _admit(self, spend: Spend, sync: bool) -> Steps[None]:
        account = self._account
        cost = spend.cost
        shared = self._shared
        ttl = shared.ttl
        # How long this call may wait for calls in flight to settle: admission_timeout in
        # all, counted from when it first waits for them (a balance read, bounded by the
        # read budget, does not start the window, and nothing restarts it). A thread that
        # runs an event loop never waits for them: they may be tasks of the loop it blocks.
        wait = shared.admission_timeout
        may_wait = wait > 0 and not (sync and _in_event_loop_thread())
        deadline: float | None = None  # set when this call first waits for settling
        # This caller's own enclosing spends: they cannot settle while it waits.
        enclosing = tuple(o._reservation for o in self._enclosing() if o._reservation)
        flight: Flight | None = None
        try:
            if not spend._defer:
                # A block that looks at its balances is admitted on one that includes
                # every call that returned before it (they may wait for a read).
                after = yield from account.pending()
                if after:
                    first = yield from account.read_after(after, None, sync)
                    if not isinstance(first, CreditBalance):
                        yield from self._settle(after, first, sync)
            while True:
                until = None
                if may_wait:
                    until = deadline if deadline is not None else _monotonic() + wait
                # Read to settle finished spends on the first look, and again only while
                # this call may still wait.
                settle = flight is None or (until is not None and _monotonic() < until)
                step = yield from account.admit(cost, ttl, flight, sync, until, enclosing, settle)
                if isinstance(step, Reservation):
                    break
                if deadline is None and isinstance(step[0], Waiter):
                    deadline = until
                waited = yield step
                flight = waited if isinstance(waited, Flight) else None
        except InsufficientCredits as exc:
            self._denied(exc)
            raise
        except AdmissionTimeout as exc:
            self._busy(exc)
            raise
        except BalanceUnavailable as exc:
            yield from self._unavailable(spend, exc)
            return
        except AuthenticationError as exc:
            if self._shared.on_event is not None:
                self._emit("rejected", spend.cost, error=exc)
            raise
        self._admitted(spend, step)

    def _admitted(self, spend: Spend, reservation: Reservation) -> None:
        spend._reservation = reservation
        spend.balance_before = reservation.balance
        if self._shared.on_event is not None:
            self._emit_reserved(spend, "admitted", reservation.balance)

    def _emit_reserved(
        self,
        spend: Spend,
        kind: str,
        balance: CreditBalance | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Emit an event between reserving and running the action: if the hook is
        interrupted (``KeyboardInterrupt``, ``SystemExit``), the action never runs, so
        its reservation is given back before the interrupt goes on."""
        try:
            self._emit(kind, spend.cost, balance, error=error)
        except BaseException:
            reservation, spend._reservation = spend._reservation, None
            if reservation is not None:
                self._account.unreserve(reservation)
            turn, spend._turn = spend._turn, None
            if turn is not None:
                self._run(self._account.leave(turn))
            raise

    def _exit(self, spend: Spend, exc: BaseException | None, sync: bool) -> Steps[None]:
        account = self._account
        turn, spend._turn = spend._turn, None
        if turn is not None:  # the paid call is over: the next caller may make one
            yield from account.leave(turn)
        settlement, spend._reservation = spend._reservation, None
        if settlement is None:  # never admitted, or already given back
            return
        if exc is not None:
            yield from account.drop(settlement)
            self._failed(spend, exc)
            if _refused_for_credits(exc):
                # Lensmor itself refused the paid call: someone else (the web app shares
                # the pool) spent what the guard admitted on. One ``except
                # InsufficientCredits`` covers both refusals; the original is the cause.
                raise InsufficientCredits(spend.cost, 0) from exc
            return
        result, spend._result = spend._result, None
        if result is not None and (yield from self._settled_from_report(spend, settlement, result)):
            return
        if spend._defer:
            # The caller does not look at the balance after: return now, and let the
            # next read (whoever needs one) settle this spend.
            yield from account.defer(settlement)
            self._spent(spend, None)
            return
        step = yield from account.begin(settlement, sync)
        try:
            balance = yield from self._settle(settlement.after, step, sync)
        except Exception as error:
            yield from account.end(settlement, True)
            self._refresh_failed(spend, error)
            return
        except BaseException as cancelled:
            # Cancelled (or interrupted) after the action succeeded, while refreshing:
            # the spend happened but is not measured. Forget the balance, release, go on
            # being cancelled.
            yield from account.end(settlement, True)
            self._failed(spend, cancelled)
            raise
        yield from account.end(settlement, False)
        self._spent(spend, balance)

    def _settled_from_report(
        self, spend: Spend, settlement: Reservation, result: object
    ) -> Steps[bool]:
        """Settle ``spend`` from its paid call's own report, when it carries one that can
        stand in for a refresh (see :meth:`Account.settle_reported`)."""
        try:
            report = parse_report(result)
        except InvalidResponse as exc:  # never hide the action's result: refresh instead
            logger.warning("ignoring a malformed credits report on %s: %s", self.account, exc)
            return False
        if report is None:
            return False
        charged = report.charged
        if charged is not None and charged > spend.cost:
            logger.warning(
                "a call on %s declared %d credits and was charged %d: declare at least what"
                " it can cost, or admission cannot be safe",
                self.account,
                spend.cost,
                charged,
            )
        before = settlement.balance
        contradiction = None if before is None else report.contradiction(before)
        if contradiction is not None:  # never cached: the refresh after spending is the truth
            logger.warning(
                "ignoring a credits report on %s that contradicts the balance before the call: %s",
                self.account,
                contradiction,
            )
            return False
        after = yield from self._account.reported(
            settlement, charged, report.total_after, report.balance_after
        )
        if after is None:
            return False
        if charged is None and before is not None and report.total_after is not None:
            charged = before.total_balance - report.total_after
        spend.charged = charged
        self._spent(spend, after)
        return True

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

    def _busy(self, exc: AdmissionTimeout) -> None:
        logger.info(
            "%s credits on %s not admitted in time: %s free beside %s reserved by calls in flight",
            exc.required,
            self._account.fingerprint,
            exc.available,
            exc.reserved,
        )
        if self._shared.on_event is not None:
            self._emit("busy", exc.required, available=exc.available, error=exc)

    def _unavailable(self, spend: Spend, exc: BalanceUnavailable) -> Steps[None]:
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
        spend._reservation = yield from self._account.unchecked(spend.cost)
        if self._shared.on_event is not None:
            self._emit_reserved(spend, "unchecked", error=exc)

    def _spent(self, spend: Spend, balance: CreditBalance | None) -> None:
        """``balance``: the balance after, or ``None`` when the spend settles later."""
        spend.balance_after = balance
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "spent %d credits on %s: %s -> %s",
                spend.cost,
                self._account.fingerprint,
                "unchecked" if spend.balance_before is None else spend.balance_before.total_balance,
                "settles later" if balance is None else balance.total_balance,
            )
        if self._shared.on_event is not None:
            self._emit("spent", spend.cost, spend.balance_before, balance, charged=spend.charged)

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
        charged: int | None = None,
    ) -> None:
        on_event = self._shared.on_event
        if on_event is None:
            return
        event = GuardEvent(
            kind, self._account.fingerprint, cost, before, after, available, error, charged
        )
        try:
            on_event(event)
        except Exception:
            logger.exception("on_event hook raised on a %r event", kind)

    # -- public spending API -----------------------------------------------------------

    def spend(self, cost: int | Precheck) -> Spend:
        """Guard a block: ``with guard.spend(25) as s:`` or ``async with guard.spend(25) as s:``.

        ``cost`` may be a :class:`Precheck` (its ``params`` a mapping, or a callable of no
        arguments): the block is then admitted for what Lensmor says it would charge, and
        runs with nothing reserved when that is nothing."""
        return Spend(self, cost)

    def hold(self, cost: int | Precheck, *, expires_in: float = 600.0) -> Hold:
        """Admit and reserve ``cost`` like :meth:`spend`, and keep it reserved past this
        call until the work it pays for is done: ``hold.settle()`` then (or
        ``hold.release()`` if nothing was charged). Use it for paid work that finishes
        later, such as Lensmor's contact unlock tasks.

        A hold nobody ends expires after ``expires_in`` seconds: its credits come back and
        the cached balance is distrusted (what it spent is unknown). ``cost`` may be a
        :class:`Precheck` (a hold is taken even when it says nothing will be charged, so
        the work can be ended the same way). Raises what admission raises."""
        expires_in = _check_seconds("expires_in", expires_in, positive=True)
        spend = Spend(self, cost)
        precheck = spend._precheck
        if precheck is not None:
            spend.cost = self._cost_of(precheck, precheck.params_for())
        return self._drive(take(self, spend, expires_in, True))

    async def ahold(self, cost: int | Precheck, *, expires_in: float = 600.0) -> Hold:
        """Async :meth:`hold`."""
        expires_in = _check_seconds("expires_in", expires_in, positive=True)
        spend = Spend(self, cost)
        precheck = spend._precheck
        if precheck is not None:
            spend.cost = await self._acost_of(precheck, precheck.params_for())
        return await self._adrive(take(self, spend, expires_in, False))

    def hold_by_id(self, hold_id: str) -> Hold:
        """The open hold ``hold_id`` of this account, taken in this process or, with a
        shared backend, in any other: settle or release it here. Raises
        :class:`UnknownHold` when no such hold is open (never taken on this account,
        already ended, or expired)."""
        return self._drive(look(self, _check_hold_id(hold_id)))

    async def ahold_by_id(self, hold_id: str) -> Hold:
        """Async :meth:`hold_by_id`."""
        return await self._adrive(look(self, _check_hold_id(hold_id)))

    @overload
    def requires_credits(self, cost: int | Precheck) -> _Decorator: ...

    @overload
    def requires_credits(self, cost: Callable[P, int]) -> _CostDecorator[P]: ...

    def requires_credits(self, cost: Cost) -> _Decorator | _CostDecorator[Any]:
        """Decorate a sync or async function so each call is guarded for ``cost`` credits.

        ``cost`` is an int >= 0, or a callable taking the decorated function's arguments
        and returning one (evaluated, and validated, before any request). A callable
        cost is type-checked against the decorated function's parameters, and one that
        cannot take its arguments is a ``TypeError`` at decoration time.
        """
        return _decorator(cost, lambda: self)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP clients (a :meth:`for_key` view closes nothing)."""
        if self._owner:
            self._shared.client.close()
            self._shared.aclient.drop()

    async def aclose(self) -> None:
        """Close the HTTP transports, awaiting the running loop's own (a :meth:`for_key`
        view closes nothing)."""
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


def _check_hold_id(hold_id: object) -> str:
    if not isinstance(hold_id, str):
        raise TypeError(f"a hold id is a str, got {type(hold_id).__name__}")
    if not hold_id or len(hold_id) > 64 or not hold_id.isalnum() or not hold_id.isascii():
        raise UnknownHold(hold_id[:64])
    return hold_id


def _refused_for_credits(exc: BaseException) -> bool:
    """Whether the action failed because Lensmor refused it for want of credits (402, or
    its ``INSUFFICIENT_CREDITS`` error body). Only the action's own exception counts: an
    app that wraps the refusal in an error of its own keeps its error."""
    return isinstance(exc, httpx.HTTPStatusError) and is_insufficient_credits(exc)


def _caller() -> tuple[int, int]:
    """Who is calling: this thread and, in an event loop, this task. A guarded call made
    inside another by the same caller runs in its turn; one made by a task the enclosing
    call started (which inherits its context) runs beside it, so it needs a turn."""
    task: object = None
    if asyncio._get_running_loop() is not None:
        task = asyncio.current_task()
    else:
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():
            task = trio.lowlevel.current_task()
    return threading.get_ident(), id(task)


def _in_event_loop_thread() -> bool:
    """Whether this thread is running an event loop (asyncio or trio) right now."""
    if asyncio._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


_default: CreditGuard | None = None
_default_lock = threading.Lock()


def default_guard() -> CreditGuard:
    """The process-wide guard behind the module-level :func:`requires_credits`, built
    from the environment (``LENSMOR_API_KEY``, ``LENSMOR_BASE_URL``) on first use."""
    return _default_guard()


def _default_guard() -> CreditGuard:
    global _default
    guard = _default
    if guard is None:
        with _default_lock:
            if _default is None:
                _default = CreditGuard()
            guard = _default
    return guard


@overload
def requires_credits(cost: int | Precheck, *, guard: CreditGuard | None = None) -> _Decorator: ...


@overload
def requires_credits(
    cost: Callable[P, int], *, guard: CreditGuard | None = None
) -> _CostDecorator[P]: ...


def requires_credits(
    cost: Cost, *, guard: CreditGuard | None = None
) -> _Decorator | _CostDecorator[Any]:
    """Module-level decorator; without ``guard``, a default :class:`CreditGuard` is built
    from the environment (``LENSMOR_API_KEY``, ``LENSMOR_BASE_URL``) at the first call."""
    if guard is not None:
        return guard.requires_credits(cost)
    return _decorator(cost, _default_guard)
