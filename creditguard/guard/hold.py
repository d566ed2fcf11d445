"""``Hold``: credits reserved past the call that took them, for paid work that finishes
later (Lensmor's contact unlocks are tasks). ``guard.hold()`` takes one; its flows (take,
end, release) are the core's (``creditguard.core.holds``), written once for sync and async
callers.

A hold is admitted like ``guard.spend()`` and then kept open by the account's backend, by
id, until it is settled (a read after the work is done, or the paid call's report),
released (nothing was charged), or expires (its credits come back and, since what it
spent is unknown, the cached balance is distrusted). With a shared backend any process
can end it by id.
"""

from __future__ import annotations

from types import TracebackType

from creditguard.core import holds
from creditguard.core.calls import Guarded, Held
from creditguard.core.drive import adrive, drive
from creditguard.core.engine import Engine
from creditguard.core.models import CreditBalance
from creditguard.core.steps import Kept, Turn

__all__ = ["Hold"]


class Hold(Held):
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

    __slots__ = ()

    def __repr__(self) -> str:
        before = None if self.balance_before is None else self.balance_before.total_balance
        return f"<Hold id={self.id} cost={self.cost} before={before}>"

    @classmethod
    def of(cls, engine: Engine, kept: Kept, turn: Turn | None, call: Guarded) -> Hold:
        """The hold ``call`` took: it carries on the call's subject, action and what its
        observers were told."""
        hold = cls(engine, kept, turn)
        hold._subject = call._subject
        hold._action = call._action
        hold._observed = call._observed
        hold._started = call._started
        call._observed = None
        return hold

    def settle(self, report: object = None) -> CreditBalance | None:
        """The work is done: settle the hold and return the balance after it.

        Without ``report`` (or with one that carries no credit figures) the balance is
        read after now, so it includes whatever the work was charged. With the paid
        call's answer (``creditsUsed``, ``balanceAfter``...) it may settle from that, as
        a spend does. ``None`` when the read after failed (the hold is settled all the
        same; the cached balance is distrusted). Raises :class:`UnknownHold` when the hold
        was settled, released or expired already."""
        engine = self._engine
        return drive(engine, holds.end(engine, self, report, False, True))

    async def asettle(self, report: object = None) -> CreditBalance | None:
        """Async :meth:`settle`."""
        engine = self._engine
        return await adrive(engine, holds.end(engine, self, report, False, False))

    def release(self) -> None:
        """Nothing was charged (the work was refused, or had nothing to charge): give the
        credits back with no read. Raises :class:`UnknownHold` when the hold was settled,
        released or expired already."""
        engine = self._engine
        drive(engine, holds.end(engine, self, None, True, True))

    async def arelease(self) -> None:
        """Async :meth:`release`."""
        engine = self._engine
        await adrive(engine, holds.end(engine, self, None, True, False))

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine = self._engine
        drive(engine, holds.leave(engine, self, exc, True))

    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine = self._engine
        await adrive(engine, holds.leave(engine, self, exc, False))
