"""``Hold``: credits reserved past the call that took them, for paid work that finishes
later (Lensmor's contact unlocks are tasks), and the guard's logic that takes and ends
holds, written once for sync and async callers (``guard.hold()``, ``guard.ahold()``...).

A hold is admitted like ``guard.spend()`` and then kept open by the account's backend, by
id, until it is settled (a read after the work is done, or the paid call's report),
released (nothing was charged), or expires (its credits come back and, since what it
spent is unknown, the cached balance is distrusted). With a shared backend any process
can end it by id.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from creditguard.core.errors import UnknownHold
from creditguard.core.steps import Kept, Steps, Turn
from creditguard.guard.spend import Spend

if TYPE_CHECKING:
    from creditguard.core.models import CreditBalance
    from creditguard.guard.guard import CreditGuard

__all__ = ["Hold"]


class Hold:
    """Credits held for paid work that finishes after the call that started it.

    ``id`` names it to every process sharing the guard's backend
    (:meth:`CreditGuard.hold_by_id`); ``cost`` is what it holds; ``balance_before`` the
    balance it was admitted on (``None`` when taken unchecked under
    ``on_unavailable="allow"``); ``expires_at`` the Unix time it expires at if nobody ends
    it. After :meth:`settle`, ``balance_after`` is the balance read after the work (or
    ``None`` when that read failed) and ``charged`` what the report given to it said the
    work cost, if it said.

    Used as a context manager (``with guard.hold(n) as hold:``), the block is the paid
    call that starts the work: the hold's turn at the gate (``max_concurrent``) is given
    back when the block ends, and the hold stays open. If the block raises, the hold ends
    there (what it spent is unknown: the cached balance is distrusted) and the exception
    goes on (a ``402`` from Lensmor as :class:`InsufficientCredits`).
    """

    __slots__ = (
        "_guard",
        "_turn",
        "balance_after",
        "balance_before",
        "charged",
        "cost",
        "expires_at",
        "id",
    )

    def __init__(self, guard: CreditGuard, kept: Kept, turn: Turn | None) -> None:
        self._guard = guard
        self._turn = turn  # the gate turn this object gives back, if it has one
        reservation = kept.reservation
        self.id = kept.hold_id
        self.cost = reservation.cost
        self.balance_before: CreditBalance | None = reservation.balance
        self.expires_at = kept.expires_at
        self.balance_after: CreditBalance | None = None
        self.charged: int | None = None

    def __repr__(self) -> str:
        before = None if self.balance_before is None else self.balance_before.total_balance
        return f"<Hold id={self.id} cost={self.cost} before={before}>"

    def settle(self, report: object = None) -> CreditBalance | None:
        """The work is done: settle the hold and return the balance after it.

        Without ``report`` (or with one that carries no credit figures) the balance is
        read after now, so it includes whatever the work was charged. With the paid
        call's answer (``creditsUsed``, ``balanceAfter``...) it may settle from that, as
        a spend does. ``None`` when the read after failed (the hold is settled all the
        same; the cached balance is distrusted). Raises :class:`UnknownHold` when the hold
        was settled, released or expired already."""
        guard = self._guard
        return guard._drive(_end(guard, self, report, False, True))

    async def asettle(self, report: object = None) -> CreditBalance | None:
        """Async :meth:`settle`."""
        guard = self._guard
        return await guard._adrive(_end(guard, self, report, False, False))

    def release(self) -> None:
        """Nothing was charged (the work was refused, or had nothing to charge): give the
        credits back with no read. Raises :class:`UnknownHold` when the hold was settled,
        released or expired already."""
        guard = self._guard
        guard._drive(_end(guard, self, None, True, True))

    async def arelease(self) -> None:
        """Async :meth:`release`."""
        guard = self._guard
        await guard._adrive(_end(guard, self, None, True, False))

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self._guard
        guard._drive(_leave(guard, self, exc, True))

    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self._guard
        await guard._adrive(_leave(guard, self, exc, False))


def take(guard: CreditGuard, spend: Spend, expires_in: float, sync: bool) -> Steps[Hold]:
    """Wait for a turn (when the gate is on), admit ``spend`` and keep its reservation
    open as a hold; on any failure, nothing is left reserved or queued."""
    account = guard._account
    yield from guard._open(spend, sync)  # as a spend block enters
    turn, spend._turn = spend._turn, None  # the hold's now
    reservation, spend._reservation = spend._reservation, None
    try:
        if reservation is None:  # pragma: no cover - admission always reserves or raises
            raise RuntimeError("admitted without a reservation")
        kept = yield from account.keep(reservation, expires_in, turn)
    except BaseException:
        if reservation is not None:
            yield from account.give_back(reservation)
        if turn is not None:
            yield from account.leave(turn)
        raise
    return Hold(guard, kept, turn)


def look(guard: CreditGuard, hold_id: str) -> Steps[Hold]:
    """The open hold ``hold_id`` of the guard's account, or :class:`UnknownHold`."""
    kept = yield from guard._account.held(hold_id)
    if kept is None:
        raise UnknownHold(hold_id)
    return Hold(guard, kept, None)


def _spend_of(guard: CreditGuard, kept: Kept) -> Spend:
    """A hold's reservation as a spend whose action has finished, for the guard to
    settle or drop like any other."""
    reservation = kept.reservation
    spend = Spend(guard, reservation.cost)
    spend._entered = True
    spend._reservation = reservation
    spend.balance_before = reservation.balance
    return spend


def _give_turn(guard: CreditGuard, hold: Hold) -> Steps[None]:
    """Give back the gate turn this hold object has, if any."""
    turn, hold._turn = hold._turn, None
    if turn is not None:
        yield from guard._account.leave(turn)


def fail(guard: CreditGuard, hold_id: str, exc: BaseException, sync: bool) -> Steps[None]:
    """End the hold ``hold_id``, if it is open, as a spend whose action raised ``exc``
    (its charge unknown; a ``402`` raises :class:`InsufficientCredits`)."""
    kept = yield from guard._account.claim(hold_id)
    if kept is not None:
        yield from guard._exit(_spend_of(guard, kept), exc, sync)


def _end(
    guard: CreditGuard, hold: Hold, report: object, release: bool, sync: bool
) -> Steps[CreditBalance | None]:
    account = guard._account
    yield from _give_turn(guard, hold)
    kept = yield from account.claim(hold.id)
    if kept is None:
        raise UnknownHold(hold.id)
    if release:
        yield from account.give_back(kept.reservation)
        guard._emit("released", hold.cost, hold.balance_before)
        return None
    spend = _spend_of(guard, kept)
    spend._result = report
    yield from guard._exit(spend, None, sync)
    hold.balance_after = spend.balance_after
    hold.charged = spend.charged
    return spend.balance_after


def _leave(guard: CreditGuard, hold: Hold, exc: BaseException | None, sync: bool) -> Steps[None]:
    """The end of a hold's ``with`` block: give its turn back; if the block raised, end
    the hold as a failed spend (its charge is unknown)."""
    yield from _give_turn(guard, hold)
    if exc is not None:
        yield from fail(guard, hold.id, exc, sync)
