"""The flows of holds, written once for sync and async callers: take a hold (admitted
like a spend, then kept open by the backend, by id), find one by id, and end it (settled
with a read or the paid call's report, released, or failed).

A hold nobody ends expires: its credits come back and, since what it spent is unknown,
the cached balance is distrusted. With a shared backend any process can end it by id.
"""

from __future__ import annotations

from creditguard.core import flows, outcomes
from creditguard.core.calls import Guarded, Held
from creditguard.core.engine import Engine
from creditguard.core.errors import UnknownHold
from creditguard.core.models import CreditBalance
from creditguard.core.spending import end_budgets
from creditguard.core.steps import Kept, Steps, Turn

__all__ = ["end", "fail", "leave", "look", "take"]


def take(
    engine: Engine, call: Guarded, expires_in: float, sync: bool
) -> Steps[tuple[Kept, Turn | None]]:
    """Wait for a turn (when the gate is on), admit ``call`` and keep its reservation
    open as a hold; on any failure, nothing is left reserved or queued."""
    account = engine.account
    yield from flows.open(engine, call, sync)  # as a spend block enters
    turn, call._turn = call._turn, None  # the hold's now
    reservation, call._reservation = call._reservation, None
    try:
        if reservation is None:  # pragma: no cover - admission always reserves or raises
            raise RuntimeError("admitted without a reservation")
        kept = yield from account.keep(reservation, expires_in, turn)
    except BaseException:
        if reservation is not None:
            end_budgets(reservation, 0)
            yield from account.give_back(reservation)
        if turn is not None:
            yield from account.leave(turn)
        raise
    return kept, turn


def look(engine: Engine, hold_id: str) -> Steps[Kept]:
    """The open hold ``hold_id`` of the engine's account, or :class:`UnknownHold`."""
    kept = yield from engine.account.held(hold_id)
    if kept is None:
        raise UnknownHold(hold_id)
    return kept


def _call_of(engine: Engine, kept: Kept) -> Guarded:
    """A hold's reservation as a call whose action has finished, to settle or drop like
    any other."""
    reservation = kept.reservation
    call = Guarded(engine, reservation.cost)
    call._entered = True
    call._reservation = reservation
    call.balance_before = reservation.balance
    return call


def _give_turn(engine: Engine, hold: Held) -> Steps[None]:
    """Give back the gate turn this hold object has, if any."""
    turn, hold._turn = hold._turn, None
    if turn is not None:
        yield from engine.account.leave(turn)


def fail(engine: Engine, hold_id: str, exc: BaseException, sync: bool) -> Steps[None]:
    """End the hold ``hold_id``, if it is open, as a spend whose action raised ``exc``
    (its charge unknown; a ``402`` raises :class:`InsufficientCredits`)."""
    kept = yield from engine.account.claim(hold_id)
    if kept is not None:
        yield from flows.exit(engine, _call_of(engine, kept), exc, sync)


def end(
    engine: Engine, hold: Held, report: object, release: bool, sync: bool
) -> Steps[CreditBalance | None]:
    """Settle ``hold`` (with ``report``, or a read) or release it (nothing was charged);
    :class:`UnknownHold` when it is no longer open."""
    account = engine.account
    yield from _give_turn(engine, hold)
    kept = yield from account.claim(hold.id)
    if kept is None:
        raise UnknownHold(hold.id)
    if release:
        end_budgets(kept.reservation, 0)
        yield from account.give_back(kept.reservation)
        outcomes.emit(engine, "released", hold.cost, hold.balance_before)
        return None
    call = _call_of(engine, kept)
    call._result = report
    yield from flows.exit(engine, call, None, sync)
    hold.balance_after = call.balance_after
    hold.charged = call.charged
    return call.balance_after


def leave(engine: Engine, hold: Held, exc: BaseException | None, sync: bool) -> Steps[None]:
    """The end of a hold's ``with`` block: give its turn back; if the block raised, end
    the hold as a failed spend (its charge is unknown)."""
    yield from _give_turn(engine, hold)
    if exc is not None:
        yield from fail(engine, hold.id, exc, sync)
