"""The guard's flows, written once: read the balance, admit a call (at the gate, on the
cached balance, or waiting for calls in flight), settle it (from its report, later, or with
a read), and what a precheck decides. Each is a generator of steps over an ``Engine``:
it yields the reads, the backend's calls and the waits it needs, and ``creditguard.core.
drive`` runs it from sync code (``drive``) or async code (``adrive``): the only
difference between sync and async callers.

The rules these keep are in docs/consistency.md and docs/architecture.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, cast

from creditguard.core import alerts, observe, outcomes
from creditguard.core.balance import InsufficientCredits
from creditguard.core.calls import Guarded, caller, current, enclosing, in_event_loop_thread
from creditguard.core.drive import run
from creditguard.core.engine import Engine
from creditguard.core.errors import (
    ActionNotAllowed,
    AdmissionTimeout,
    AuthenticationError,
    BalanceUnavailable,
    GateTimeout,
    InvalidResponse,
)
from creditguard.core.models import CreditBalance, PrecheckResult
from creditguard.core.spending import Budget, budgets, end_budgets, settle_budgets, take_budgets
from creditguard.core.steps import (
    Admission,
    Flight,
    Reservation,
    Step,
    Steps,
    Turn,
    Waiter,
    own_credits,
    pause,
)

__all__ = [
    "admit",
    "admit_cached",
    "after",
    "cost_of",
    "exit",
    "open",
    "read",
    "settle",
]

_monotonic = time.monotonic
logger = outcomes.logger


def read(engine: Engine, refresh: bool, sync: bool) -> Steps[CreditBalance]:
    """The balance: through the cache, or read anew (``refresh``); one that includes every
    finished call waiting for a read."""
    account = engine.account
    if refresh:
        bumped, first = yield from account.bumped(sync)
        return (yield from settle(engine, bumped, first, sync))
    after = yield from account.pending()
    if after:  # finished spends wait for a read: the balance must include them
        settled = yield from account.read_after(after, None, sync)
        if isinstance(settled, CreditBalance):
            return settled
        return (yield from settle(engine, after, settled, sync))
    flight: Flight | None = None
    while True:
        step = yield from account.read(engine.settings.ttl, flight, sync)
        if isinstance(step, CreditBalance):
            return step
        flight = cast(Flight, (yield step))


def settle(engine: Engine, after: int, step: Step, sync: bool) -> Steps[CreditBalance]:
    """A balance read that started at or after ``after``; ``step`` is the first read to
    wait on or perform."""
    account = engine.account
    while True:
        flight = cast(Flight, (yield step))
        # A finished flight's fields no longer change: no lock needed to look.
        if flight.result is not None and flight.start_seq >= after:
            return flight.result
        next_step = yield from account.read_after(after, flight, sync)
        if isinstance(next_step, CreditBalance):
            return next_step
        step = next_step


# -- admission -----------------------------------------------------------------------


def open(engine: Engine, call: Guarded, sync: bool) -> Steps[None]:
    """Take a turn at the gate (if it is on), then admit ``call`` (giving the turn back
    if it is refused). A backend may decide whether the account can pay, and admit the
    call, in the same step that grants the turn (see ``Turn``)."""
    if engine.settings.max_concurrent is None:
        if not admit_cached(engine, call):
            yield from admit(engine, call, sync)
        return
    call._turn = yield from _take_turn(engine, call, sync)
    try:
        turn = call._turn
        reservation = None if turn is None else turn.admitted
        if reservation is not None:
            turn.admitted = None  # type: ignore[union-attr]  # turn is not None here
            _admitted(engine, call, reservation)
        elif not admit_cached(engine, call):
            yield from admit(engine, call, sync)
    except BaseException:
        turn, call._turn = call._turn, None
        if turn is not None:
            yield from engine.account.leave(turn)
        raise


def _take_turn(engine: Engine, call: Guarded, sync: bool) -> Steps[Turn | None]:
    """A turn at the account's gate (``None``: no gate, or the caller runs inside an
    enclosing guarded call of the account, whose turn it shares). Queued in order;
    bounded by ``gate_timeout``; a caller that gives up (or is cancelled) leaves no place
    in the queue. A call the account cannot pay is refused before it queues (on the
    backend's first look when it can tell, else by :func:`_payable`)."""
    settings = engine.settings
    limit = settings.max_concurrent
    if limit is None:
        return None
    account = engine.account
    if current.get() is not None:
        me = caller()
        for outer in enclosing(engine):
            if outer._turn is not None and outer._turn.owner == me:
                return None
    turn = Turn(os.urandom(8).hex())
    turn.owner = caller()
    own = tuple(o._reservation for o in enclosing(engine) if o._reservation)
    turn.asking = Admission(call.cost, settings.ttl, sync, own)
    turn.check = call.cost > 0
    # A decorated call (no balance looked at after) may be admitted with its turn, when
    # no spending policy applies (the floor, allowances and budgets are admission's).
    turn.admit = call._defer and not settings.policy.active and not budgets.get()
    started = _monotonic()
    until = started + settings.gate_timeout
    try:
        while True:
            try:
                step = yield from account.enter(turn, limit, sync, until)
            except InsufficientCredits as refusal:  # the backend's look: it cannot pay
                outcomes.denied(engine, refusal)
                raise
            if step is False:  # the backend cannot tell whether it can pay: check first
                turn.check = False
                yield from _payable(engine, call, sync)
                continue
            if not isinstance(step, Step):  # True: the turn is this caller's
                return turn
            if _monotonic() >= until:
                raise GateTimeout(limit, _monotonic() - started)
            yield step
    except BalanceUnavailable as exc:  # the gate's backend is unreachable
        yield from account.leave(turn)
        if settings.on_unavailable != "allow":
            raise
        logger.warning(
            "the gate of %s is unavailable (%s); running without a turn (on_unavailable='allow')",
            account.fingerprint,
            exc,
        )
        return None
    except BaseException:
        yield from account.leave(turn)
        raise


def _own(engine: Engine) -> int:
    """The credits of the caller's own enclosing calls on the account: they cannot settle
    while it waits."""
    return own_credits(tuple(o._reservation for o in enclosing(engine) if o._reservation))


def _payable(engine: Engine, call: Guarded, sync: bool) -> Steps[None]:
    """Before queueing at the gate: refuse a call the account cannot pay even if the
    calls in flight charge nothing (its turn would only make it wait to be refused).
    A balance that cannot be read decides nothing here: admission, after the turn,
    applies ``on_unavailable``."""
    try:
        balance = yield from read(engine, False, sync)
    except BalanceUnavailable:
        return
    except AuthenticationError as exc:
        outcomes.rejected(engine, call.cost, exc)
        raise
    held = yield from engine.account.committed()
    keep = engine.settings.policy.keep
    free = balance.total_balance - held - _own(engine) - keep
    if call.cost > free:
        refusal = InsufficientCredits(call.cost, max(0, free), balance, reserved=held, keep=keep)
        outcomes.denied(engine, refusal)
        raise refusal


def admit_cached(engine: Engine, call: Guarded) -> bool:
    """The warm path, no generator: admit on a fresh cached balance that covers the cost
    with room for every reservation (anything else goes the slow way)."""
    settings = engine.settings
    policy = settings.policy
    if budgets.get():
        return False  # budgets are taken on the way that may wait for them
    if not policy.active:
        reservation = engine.account.try_admit(call.cost, settings.ttl, call._defer)
    else:
        window = policy.window(call._subject)
        reservation = engine.account.try_admit(
            call.cost, settings.ttl, call._defer, policy.keep, window
        )
    if reservation is None:
        return False
    _admitted(engine, call, reservation)
    return True


def admit(engine: Engine, call: Guarded, sync: bool) -> Steps[None]:
    """Admit ``call`` on a balance that covers it beside every reservation, waiting for
    calls in flight to settle when only they stand in the way (``admission_timeout`` in
    all), or refuse it (``InsufficientCredits`` only when the account cannot pay even if
    they charge nothing). The ``budget()`` blocks the caller runs in are asked first."""
    if not budgets.get():
        yield from _admit(engine, call, sync)
        return
    chain = yield from _take_budgets(engine, call.cost, sync)
    try:
        yield from _admit(engine, call, sync)
    except BaseException:
        settle_budgets(chain, call.cost, 0)
        raise
    reservation = call._reservation
    if reservation is None:  # pragma: no cover - admission always reserves or raises
        settle_budgets(chain, call.cost, 0)
    else:
        reservation.budgets = chain


def _take_budgets(engine: Engine, cost: int, sync: bool) -> Steps[tuple[Budget, ...]]:
    """Reserve ``cost`` in every budget the caller runs in, waiting (polling: budgets
    are this process's) while only their calls in flight stand in the way, at most
    ``admission_timeout``; :class:`BudgetExceeded` when a budget cannot take it even if
    they charge nothing."""
    wait = engine.settings.admission_timeout
    may_wait = wait > 0 and not (sync and in_event_loop_thread())
    until = _monotonic() + wait
    delay = 0.001
    while True:
        try:
            chain, taken = take_budgets(cost)
        except InsufficientCredits as exc:
            outcomes.denied(engine, exc)
            raise
        if taken:
            return chain
        if not may_wait or _monotonic() >= until:
            timeout = AdmissionTimeout(cost, min(b.remaining for b in budgets.get()))
            outcomes.busy(engine, timeout)
            raise timeout
        yield pause(min(delay, max(0.0, until - _monotonic())))
        delay = min(delay * 2, 0.02)


def _admit(engine: Engine, call: Guarded, sync: bool) -> Steps[None]:
    """:func:`admit`, the budgets aside."""
    account = engine.account
    cost = call.cost
    settings = engine.settings
    ttl = settings.ttl
    # How long this call may wait for calls in flight to settle: admission_timeout in
    # all, counted from when it first waits for them (a balance read, bounded by the
    # read budget, does not start the window, and nothing restarts it). A thread that
    # runs an event loop never waits for them: they may be tasks of the loop it blocks.
    wait = settings.admission_timeout
    may_wait = wait > 0 and not (sync and in_event_loop_thread())
    deadline: float | None = None  # set when this call first waits for settling
    # This caller's own enclosing calls: they cannot settle while it waits.
    own = tuple(o._reservation for o in enclosing(engine) if o._reservation)
    policy = settings.policy
    asking = Admission(cost, ttl, sync, own)
    if policy.active:
        asking.keep = policy.keep
        asking.window = policy.window(call._subject)
    flight: Flight | None = None
    try:
        if not call._defer:
            # A block that looks at its balances is admitted on one that includes
            # every call that returned before it (they may wait for a read).
            after = yield from account.pending()
            if after:
                first = yield from account.read_after(after, None, sync)
                if not isinstance(first, CreditBalance):
                    yield from settle(engine, after, first, sync)
        while True:
            until = None
            if may_wait:
                until = deadline if deadline is not None else _monotonic() + wait
            # Read to settle finished spends on the first look, and again only while
            # this call may still wait.
            asking.until = until
            asking.settle = flight is None or (until is not None and _monotonic() < until)
            step = yield from account.admit(asking, flight)
            if isinstance(step, Reservation):
                break
            if deadline is None and isinstance(step.waitable, Waiter):
                deadline = until
            waited = yield step
            flight = waited if isinstance(waited, Flight) else None
    except InsufficientCredits as exc:
        outcomes.denied(engine, exc)
        raise
    except AdmissionTimeout as exc:
        outcomes.busy(engine, exc)
        raise
    except BalanceUnavailable as exc:
        yield from _unavailable(engine, call, exc)
        return
    except AuthenticationError as exc:
        outcomes.rejected(engine, call.cost, exc)
        raise
    _admitted(engine, call, step)


def _admitted(engine: Engine, call: Guarded, reservation: Reservation) -> None:
    call._reservation = reservation
    call.balance_before = reservation.balance
    if call._observed is not None:
        observe.decided(engine, call, "admitted")
    if reservation.warned:
        outcomes.allowance_warning(engine, call)
    if engine.settings.on_event is not None:
        _emit_reserved(engine, call, "admitted", reservation.balance)


def _emit_reserved(
    engine: Engine,
    call: Guarded,
    kind: str,
    balance: CreditBalance | None = None,
    error: BaseException | None = None,
) -> None:
    """Emit an event between reserving and running the action: if the hook is
    interrupted (``KeyboardInterrupt``, ``SystemExit``), the action never runs, so its
    reservation is given back before the interrupt goes on."""
    try:
        outcomes.emit(engine, kind, call.cost, balance, error=error)
    except BaseException:
        reservation, call._reservation = call._reservation, None
        if reservation is not None:
            end_budgets(reservation, 0)
            engine.account.unreserve(reservation)
        turn, call._turn = call._turn, None
        if turn is not None:
            run(engine.account.leave(turn))
        raise


def _unavailable(engine: Engine, call: Guarded, exc: BalanceUnavailable) -> Steps[None]:
    """Fail closed (re-raise) unless the guard was told to fail open."""
    if engine.settings.on_unavailable != "allow":
        outcomes.unavailable(engine, call.cost, exc)
        raise exc
    outcomes.unchecked(engine, call.cost, exc)
    call._reservation = yield from engine.account.unchecked(call.cost)
    if call._observed is not None:
        observe.decided(engine, call, "unchecked")
    if engine.settings.on_event is not None:
        _emit_reserved(engine, call, "unchecked", error=exc)


# -- settling ------------------------------------------------------------------------


def exit(engine: Engine, call: Guarded, exc: BaseException | None, sync: bool) -> Steps[None]:
    """The paid action is over: give the turn back, then settle ``call`` (from its
    report, later, or with a read), or drop it if the action raised."""
    account = engine.account
    turn, call._turn = call._turn, None
    if turn is not None:  # the paid call is over: the next caller may make one
        yield from account.leave(turn)
    settlement, call._reservation = call._reservation, None
    if settlement is None:  # never admitted, or already given back
        return
    if exc is not None:
        end_budgets(settlement, 0)  # a failed call spends nothing of its budgets
        yield from account.drop(settlement)
        outcomes.failed(engine, call, exc)
        if engine.upstream.refused_for_credits(exc):
            # Lensmor itself refused the paid call: someone else (the web app shares the
            # pool) spent what the guard admitted on. One ``except InsufficientCredits``
            # covers both refusals; the original is the cause.
            raise InsufficientCredits(call.cost, 0) from exc
        return
    result, call._result = call._result, None
    if result is not None and (yield from _settled_from_report(engine, call, settlement, result)):
        return
    end_budgets(settlement)
    if call._defer:
        # Return now, and let the next read (whoever needs one) settle this spend; a
        # block reads its balance after only if it is asked for (see ``after``).
        yield from account.defer(settlement)
        call._due = settlement
        outcomes.spent(engine, call, None)
        return
    step = yield from account.begin(settlement, sync)
    try:
        balance = yield from settle(engine, settlement.after, step, sync)
    except Exception as error:
        yield from account.end(settlement, True)
        outcomes.refresh_failed(engine, call, error)
        return
    except BaseException as cancelled:
        # Cancelled (or interrupted) after the action succeeded, while refreshing: the
        # spend happened but is not measured. Forget the balance, release, go on being
        # cancelled.
        yield from account.end(settlement, True)
        outcomes.failed(engine, call, cancelled)
        raise
    yield from account.end(settlement, False)
    outcomes.spent(engine, call, balance)


def after(engine: Engine, call: Guarded, sync: bool) -> Steps[CreditBalance | None]:
    """The balance after ``call``, asked for once it has exited: known (from its report,
    its refresh or an earlier ask; ``None`` when it raised), or, when it settled later,
    read now: a read that started after its action finished, so it includes its charge
    (``None``, logged, when that read fails). Remembered for the next ask."""
    settlement = call._due
    if settlement is None:
        return call._after
    account = engine.account
    try:
        if settlement.after:
            step = yield from account.read_after(settlement.after, None, sync)
            if isinstance(step, CreditBalance):
                balance = step
            else:
                balance = yield from settle(engine, settlement.after, step, sync)
        else:
            # The backend has not numbered the action's end (Redis learns it with this
            # process's next call): a read that starts from now on started after it.
            bumped, first = yield from account.bumped(sync)
            balance = yield from settle(engine, bumped, first, sync)
    except Exception as error:
        call._due = None
        outcomes.after_unread(engine, call, error)
        return None
    call._due = None
    call._after = balance
    return balance


def _settled_from_report(
    engine: Engine, call: Guarded, settlement: Reservation, result: object
) -> Steps[bool]:
    """Settle ``call`` from its paid call's own report, when it carries one that can
    stand in for a refresh (see docs/consistency.md)."""
    fingerprint = engine.account.fingerprint
    try:
        report = engine.upstream.report(result)
    except InvalidResponse as exc:  # never hide the action's result: refresh instead
        logger.warning("ignoring a malformed credits report on %s: %s", fingerprint, exc)
        return False
    if report is None:
        return False
    charged = report.charged
    if charged is not None and charged > call.cost:
        logger.warning(
            "a call on %s declared %d credits and was charged %d: declare at least what it"
            " can cost, or admission cannot be safe",
            fingerprint,
            call.cost,
            charged,
        )
    before = settlement.balance
    contradiction = None if before is None else report.contradiction(before)
    if contradiction is not None:  # never cached: the refresh after spending is the truth
        logger.warning(
            "ignoring a credits report on %s that contradicts the balance before the call: %s",
            fingerprint,
            contradiction,
        )
        return False
    if charged is not None:
        settlement.charge = charged  # what its subject's window and budgets count
        call.charged = charged  # what it cost, even when a read settles it
    after = yield from engine.account.reported(
        settlement, charged, report.total_after, report.balance_after
    )
    if after is None:
        return False
    if charged is None and before is not None and report.total_after is not None:
        charged = before.total_balance - report.total_after
    call.charged = charged
    end_budgets(settlement, charged)
    outcomes.spent(engine, call, after)
    if engine.settings.policy.watchers:
        yield from alerts.observe(engine, after)
    return True


# -- precheck ------------------------------------------------------------------------


def _covers(engine: Engine, credits: int) -> bool:
    """Whether the fresh cached balance, less what calls in flight hold, covers
    ``credits`` (no request)."""
    account = engine.account
    if not account.fresh(engine.settings.ttl):
        return False
    cached, reserved, _ = account.snapshot()
    keep = engine.settings.policy.keep
    return cached is not None and cached.total_balance - reserved - keep >= credits


def cost_of(
    engine: Engine,
    action_type: str,
    params: Mapping[str, Any],
    at_most: int | None,
    sync: bool,
) -> Steps[int]:
    """The credits to admit an action for, from Lensmor's precheck (0: nothing to
    charge), or the refusal it means. ``at_most`` (when the cached balance covers it)
    is admitted without asking."""
    if at_most is not None and _covers(engine, at_most):
        return at_most
    result = cast(PrecheckResult, (yield engine.upstream.precheck(action_type, params)))
    if not result.allowed:
        if result.reason_code == "insufficient_balance":
            # Lensmor says the balance is short: the cached one may not know yet, so read.
            balance = yield from read(engine, True, sync)
            exc = InsufficientCredits(result.credits, balance.total_balance or 0)
            outcomes.denied(engine, exc)
            raise exc
        raise ActionNotAllowed(result.reason_code, result.detail)
    if not result.should_charge:
        return 0
    return result.credits
