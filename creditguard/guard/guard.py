"""``CreditGuard``: the facade users build and call, and the module-level
``requires_credits``.

It checks its configuration, builds the engine its flows run over (``creditguard.core``:
the account's state from the backend, the settings, Lensmor for its key) and drives those
flows from sync or async code. ``Spend``, ``Hold`` and the decorator, beside it, are as thin.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal, ParamSpec, TypeVar, overload

import httpx

from creditguard.backends.memory import MemoryBackend
from creditguard.core import flows, observe
from creditguard.core import holds as hold_flows
from creditguard.core.checks import _check_key, _check_seconds, _fingerprint
from creditguard.core.drive import adrive, drive
from creditguard.core.engine import Engine, OnUnavailable, Settings
from creditguard.core.errors import UnknownHold
from creditguard.core.events import GuardEvent
from creditguard.core.models import AccountSnapshot, CreditBalance, PrecheckResult
from creditguard.core.observe import Observer
from creditguard.core.policy import Usage
from creditguard.core.roles import AccountState, StateBackend
from creditguard.core.secret import Secret
from creditguard.core.spending import AllowanceSpec, Budget, LowBalanceCallback, Policy, Watcher
from creditguard.guard.decorate import Subject, _CostDecorator, _Decorator, _decorator
from creditguard.guard.hold import Hold
from creditguard.guard.policy import _check_allowance, _check_keep, _usage, usage_steps
from creditguard.guard.spend import Spend, acost_of, cost_of, current_spend
from creditguard.lensmor.checks import _check_base_url, _check_timeout
from creditguard.lensmor.client import AsyncBalanceClient, BalanceClient, RetryPolicy
from creditguard.lensmor.precheck import Cost, Precheck
from creditguard.lensmor.reader import _Reader
from creditguard.lensmor.upstream import Lensmor

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

DEFAULT_BASE_URL = "https://platform.lensmor.com"
"""The base URL when neither ``base_url`` nor ``LENSMOR_BASE_URL`` is given."""


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

    __slots__ = ("_account", "_clients", "_engine", "_owner")

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
        keep: int = 0,
        allowance: AllowanceSpec = None,
        telemetry: bool | Literal["metrics"] = True,
        ledger: Observer | None = None,
    ) -> None:
        key = _check_key(api_key)
        policy = Policy(_check_keep(keep), _check_allowance(allowance))
        observers = _observers(telemetry, ledger)
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
        # The longest one balance read can take (its retry deadline plus one request
        # timeout): a caller waiting for someone else's read waits no longer than that.
        phases = [t for t in reader.timeout.as_dict().values() if t is not None]
        settings = Settings(
            base_url=base_url,
            ttl=ttl,
            admission_timeout=admission_timeout,
            on_unavailable=on_unavailable,
            on_event=on_event,
            max_concurrent=max_concurrent,
            gate_timeout=gate_timeout,
            read_budget=reader.policy.deadline + (max(phases) if phases else 0.0),
            policy=policy,
            observers=observers,
        )
        self._clients = _Clients(
            settings,
            backend if backend is not None else MemoryBackend(),
            reader,
            BalanceClient(
                reader,
                transport=sync_transport,
                verify=verify,
                missing=transport is not None and sync_transport is None,
            ),
            AsyncBalanceClient(
                reader,
                transport=async_transport,
                verify=verify,
                missing=transport is not None and async_transport is None,
            ),
        )
        self._owner = True
        self._bind(key)

    def _bind(self, key: str) -> None:
        clients = self._clients
        settings = clients.settings
        account = clients.backend.account(_fingerprint(settings.base_url, key))
        upstream = Lensmor(clients.reader, clients.client, clients.aclient, Secret(key))
        self._account: AccountState = account
        self._engine = Engine(account, settings, upstream)

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
        view._clients = self._clients
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
        return self._engine.settings.base_url

    @property
    def ttl(self) -> float:
        """Seconds a balance read is trusted for admission."""
        return self._engine.settings.ttl

    @property
    def admission_timeout(self) -> float:
        """Seconds a call may wait at admission for calls in flight to settle."""
        return self._engine.settings.admission_timeout

    @property
    def max_concurrent(self) -> int | None:
        """At most this many guarded actions of the account in flight (``None``: no gate)."""
        return self._engine.settings.max_concurrent

    def __repr__(self) -> str:
        return f"<CreditGuard account={self.account} base_url={self.base_url!r}>"

    # -- balance -------------------------------------------------------------------

    def balance(self, *, refresh: bool = False) -> CreditBalance:
        """The account's balance through the TTL cache (``refresh=True`` reads it anew)."""
        engine = self._engine
        return drive(engine, flows.read(engine, refresh, True))

    async def abalance(self, *, refresh: bool = False) -> CreditBalance:
        """Async :meth:`balance`: the same cache, read through an httpx async transport."""
        engine = self._engine
        return await adrive(engine, flows.read(engine, refresh, False))

    def snapshot(self) -> AccountSnapshot:
        """What the guard holds for this account now: the cached balance, the credits
        reserved by guarded calls in flight, the open holds, the finished calls waiting
        for a read and the callers queued at the gate (over Redis: across every process).
        Makes no request to Lensmor."""
        return drive(self._engine, self._account.survey())

    async def asnapshot(self) -> AccountSnapshot:
        """Async :meth:`snapshot`."""
        return await adrive(self._engine, self._account.survey())

    def invalidate(self) -> None:
        """Forget the cached balance; reads already in flight will not be trusted."""
        self._account.invalidate()

    # -- precheck ------------------------------------------------------------------

    def precheck(self, action_type: str, params: Mapping[str, Any]) -> PrecheckResult:
        """Ask Lensmor what ``action_type`` with ``params`` would charge, without charging
        (``POST /external/actions/precheck``; one request, not retried)."""
        return self._lensmor().precheck_now(action_type, params)

    async def aprecheck(self, action_type: str, params: Mapping[str, Any]) -> PrecheckResult:
        """Async :meth:`precheck`."""
        return await self._lensmor().aprecheck_now(action_type, params)

    def _lensmor(self) -> Lensmor:
        upstream = self._engine.upstream
        assert isinstance(upstream, Lensmor)
        return upstream

    def _hold(self, spend: Spend, expires_in: float, sync: bool) -> Hold:
        engine = self._engine
        observe.begin(engine, spend)
        try:
            kept, turn = drive(engine, hold_flows.take(engine, spend, expires_in, sync))
        except BaseException as exc:
            observe.refused(engine, spend, exc)
            raise
        return Hold.of(engine, kept, turn, spend)

    async def _ahold(self, spend: Spend, expires_in: float, sync: bool) -> Hold:
        engine = self._engine
        observe.begin(engine, spend)
        try:
            kept, turn = await adrive(engine, hold_flows.take(engine, spend, expires_in, sync))
        except BaseException as exc:
            observe.refused(engine, spend, exc)
            raise
        return Hold.of(engine, kept, turn, spend)

    # -- public spending API -----------------------------------------------------------

    def spend(
        self, cost: int | Precheck, *, subject: str | None = None, action: str | None = None
    ) -> Spend:
        """Guard a block: ``with guard.spend(25) as s:`` or ``async with guard.spend(25) as s:``.

        ``cost`` may be a :class:`Precheck` (its ``params`` a mapping, or a callable of no
        arguments): the block is then admitted for what Lensmor says it would charge, and
        runs with nothing reserved when that is nothing. ``subject`` names who the block
        spends for (a user, a tenant): its ``allowance`` applies. ``action`` names what it
        pays for, for the metrics and the ledger.

        The block exits without a balance read: ``s.balance_after`` (or ``await
        s.abalance_after()``) reads it when first asked for."""
        return Spend(self, cost, lazy=True, subject=subject, action=action)

    def hold(
        self,
        cost: int | Precheck,
        *,
        expires_in: float = 600.0,
        subject: str | None = None,
        action: str | None = None,
    ) -> Hold:
        """Admit and reserve ``cost`` like :meth:`spend`, and keep it reserved past this
        call until the work it pays for is done: ``hold.settle()`` then (or
        ``hold.release()`` if nothing was charged). Use it for paid work that finishes
        later, such as Lensmor's contact unlock tasks.

        A hold nobody ends expires after ``expires_in`` seconds: its credits come back and
        the cached balance is distrusted (what it spent is unknown). ``cost`` may be a
        :class:`Precheck` (a hold is taken even when it says nothing will be charged, so
        the work can be ended the same way). Raises what admission raises."""
        expires_in = _check_seconds("expires_in", expires_in, positive=True)
        spend = Spend(self, cost, subject=subject, action=action)
        precheck = spend._precheck
        if precheck is not None:
            spend.cost = cost_of(self._engine, precheck, precheck.params_for())
        return self._hold(spend, expires_in, True)

    async def ahold(
        self,
        cost: int | Precheck,
        *,
        expires_in: float = 600.0,
        subject: str | None = None,
        action: str | None = None,
    ) -> Hold:
        """Async :meth:`hold`."""
        expires_in = _check_seconds("expires_in", expires_in, positive=True)
        spend = Spend(self, cost, subject=subject, action=action)
        precheck = spend._precheck
        if precheck is not None:
            spend.cost = await acost_of(self._engine, precheck, precheck.params_for())
        return await self._ahold(spend, expires_in, False)

    def hold_by_id(self, hold_id: str) -> Hold:
        """The open hold ``hold_id`` of this account, taken in this process or, with a
        shared backend, in any other: settle or release it here. Raises
        :class:`UnknownHold` when no such hold is open (never taken on this account,
        already ended, or expired)."""
        engine = self._engine
        return Hold(engine, drive(engine, hold_flows.look(engine, _check_hold_id(hold_id))), None)

    async def ahold_by_id(self, hold_id: str) -> Hold:
        """Async :meth:`hold_by_id`."""
        engine = self._engine
        kept = await adrive(engine, hold_flows.look(engine, _check_hold_id(hold_id)))
        return Hold(engine, kept, None)

    @overload
    def requires_credits(
        self, cost: int | Precheck, *, subject: str | None = None
    ) -> _Decorator: ...

    @overload
    def requires_credits(
        self, cost: int | Precheck, *, subject: Callable[P, str]
    ) -> _CostDecorator[P]: ...

    @overload
    def requires_credits(
        self, cost: Callable[P, int], *, subject: str | Callable[P, str] | None = None
    ) -> _CostDecorator[P]: ...

    def requires_credits(
        self, cost: Cost, *, subject: Subject = None
    ) -> _Decorator | _CostDecorator[Any]:
        """Decorate a sync or async function so each call is guarded for ``cost`` credits.

        ``cost`` is an int >= 0, or a callable taking the decorated function's arguments
        and returning one (evaluated, and validated, before any request). A callable
        cost is type-checked against the decorated function's parameters, and one that
        cannot take its arguments is a ``TypeError`` at decoration time. ``subject``
        (who the call spends for: its ``allowance`` applies) is a str or, like ``cost``,
        a callable of the function's arguments.
        """
        return _decorator(cost, lambda: self, subject)

    # -- spending policy -------------------------------------------------------------

    @property
    def keep(self) -> int:
        """The credits this guard never spends (its floor)."""
        return self._engine.settings.policy.keep

    def usage(self, subject: str) -> Usage:
        """What ``subject`` has used of its allowance in the current window (over Redis,
        the whole deployment's figures)."""
        engine = self._engine
        return _usage(engine, subject, drive(engine, usage_steps(engine, subject)))

    async def ausage(self, subject: str) -> Usage:
        """Async :meth:`usage`."""
        engine = self._engine
        return _usage(engine, subject, await adrive(engine, usage_steps(engine, subject)))

    def budget(self, limit: int) -> Budget:
        """A block (``with`` or ``async with``) that caps what the guarded calls inside it,
        of any guard, may be admitted for in total: ``BudgetExceeded`` past ``limit``.
        Nested budgets all apply; tasks started inside inherit it. Process-local."""
        return Budget(limit)

    def on_low_balance(self, threshold: int | float, callback: LowBalanceCallback) -> None:
        """Call ``callback(LowBalance)`` (sync or async) once when the balance falls below
        ``threshold`` (credits, or a fraction of ``total_amount`` when a float in (0, 1))
        and once when it rises back above it; never per call. Over Redis, once per crossing
        for the whole deployment. Also told to ``on_event``."""
        self._engine.settings.policy.watchers.append(Watcher(threshold, callback))

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP clients (a :meth:`for_key` view closes nothing)."""
        if self._owner:
            self._clients.client.close()
            self._clients.aclient.drop()

    async def aclose(self) -> None:
        """Close the HTTP transports, awaiting the running loop's own (a :meth:`for_key`
        view closes nothing)."""
        if self._owner:
            self._clients.client.close()
            await self._clients.aclient.aclose()

    def __enter__(self) -> CreditGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> CreditGuard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Clients:
    """What every view of one guard shares: settings, state backend, HTTP clients."""

    __slots__ = ("aclient", "backend", "client", "reader", "settings")

    def __init__(
        self,
        settings: Settings,
        backend: StateBackend,
        reader: _Reader,
        client: BalanceClient,
        aclient: AsyncBalanceClient,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.reader = reader
        self.client = client
        self.aclient = aclient


def _observers(telemetry: object, ledger: object) -> tuple[Observer, ...]:
    """What the guard tells of each call: OpenTelemetry (when its API is installed and
    ``telemetry`` is on: metrics and spans, or ``"metrics"`` alone) and the ledger, if one
    is given."""
    if type(telemetry) is not bool and telemetry != "metrics":
        raise TypeError(f"telemetry must be True, False or 'metrics', got {telemetry!r}")
    found: list[Observer] = []
    if telemetry:
        from creditguard.telemetry import otel

        instruments = otel.instruments(spans=telemetry is True)
        if instruments is not None:
            found.append(instruments)
    if ledger is not None:
        for method in ("begin", "decided", "ended", "read"):
            if not callable(getattr(ledger, method, None)):
                raise TypeError(f"ledger must be a ledger (creditguard.ledger), got {ledger!r}")
        found.append(ledger)  # type: ignore[arg-type]  # checked just above
    return tuple(found)


def engine_of(guard: CreditGuard) -> Engine:
    """The engine ``guard``'s flows run over (for the flows written beside the facade,
    such as the contact-unlock task helper)."""
    return guard._engine


def _check_hold_id(hold_id: object) -> str:
    if not isinstance(hold_id, str):
        raise TypeError(f"a hold id is a str, got {type(hold_id).__name__}")
    if not hold_id or len(hold_id) > 64 or not hold_id.isalnum() or not hold_id.isascii():
        raise UnknownHold(hold_id[:64])
    return hold_id


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
def requires_credits(
    cost: int | Precheck, *, guard: CreditGuard | None = None, subject: str | None = None
) -> _Decorator: ...


@overload
def requires_credits(
    cost: int | Precheck, *, guard: CreditGuard | None = None, subject: Callable[P, str]
) -> _CostDecorator[P]: ...


@overload
def requires_credits(
    cost: Callable[P, int],
    *,
    guard: CreditGuard | None = None,
    subject: str | Callable[P, str] | None = None,
) -> _CostDecorator[P]: ...


def requires_credits(
    cost: Cost, *, guard: CreditGuard | None = None, subject: Subject = None
) -> _Decorator | _CostDecorator[Any]:
    """Module-level decorator; without ``guard``, a default :class:`CreditGuard` is built
    from the environment (``LENSMOR_API_KEY``, ``LENSMOR_BASE_URL``) at the first call."""
    if guard is not None:
        return _decorator(cost, lambda: guard, subject)
    return _decorator(cost, _default_guard, subject)
