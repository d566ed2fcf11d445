"""One guarded call's state as the flows see it (``Guarded``: the base of ``Spend``;
``Held``: the base of ``Hold``), the guarded calls running in this context, and who is
calling (thread and task)."""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from creditguard.core.checks import _check_cost

if TYPE_CHECKING:
    from creditguard.core.engine import Engine
    from creditguard.core.models import CreditBalance
    from creditguard.core.steps import Kept, Reservation, Turn

__all__ = ["Guarded", "Held", "caller", "current", "enclosing", "in_event_loop_thread"]


class Guarded:
    """One guarded call of ``cost`` credits, from admission to settling."""

    __slots__ = (
        "_action",
        "_active",
        "_after",
        "_defer",
        "_due",
        "_engine",
        "_entered",
        "_observed",
        "_outer",
        "_reservation",
        "_result",
        "_started",
        "_subject",
        "_turn",
        "balance_before",
        "charged",
        "cost",
    )

    def __init__(
        self, engine: Engine, cost: int, defer: bool = False, subject: str | None = None
    ) -> None:
        self._engine = engine
        self._subject = subject  # who the call spends for (its allowance), if anyone
        self._action: str | None = None  # what it is (a function, a route), for observers
        self._observed: tuple[object, ...] | None = None  # its observers' tokens, if any
        self._started = 0.0  # when it asked for admission (monotonic), when observed
        # Settle without waiting for the refresh (blocks, decorated calls, middleware):
        # the next read that anyone needs settles it.
        self._defer = defer
        self._entered = False
        self._active = False  # entered and not yet exited
        self._outer: Guarded | None = None  # the call this one runs inside, if any
        self._reservation: Reservation | None = None  # held from admission to settling
        self._result: object = None  # the paid call's answer, to settle from its report
        self._turn: Turn | None = None  # its turn at the gate (max_concurrent), if on
        self.charged: int | None = None
        self.cost = _check_cost(cost)
        self.balance_before: CreditBalance | None = None
        self._after: CreditBalance | None = None  # the balance after, once known
        # Settled later (deferred): the settlement, whose ``after`` a read must start at
        # to include this call's charge; ``None`` once ``_after`` is all there is to know.
        self._due: Reservation | None = None

    @property
    def balance_after(self) -> CreditBalance | None:
        """The balance after the call, when it is known (``None``: not known)."""
        return self._after

    def _activate(self) -> None:
        self._outer = current.get()
        self._active = True
        current.set(self)

    def _leave(self) -> None:
        # Not a token reset: calls may be exited in another order than they were
        # entered (or in another context), and the variable must then neither go back
        # to a call that has finished nor lose one that is still running.
        self._active = False
        if current.get() is self:
            outer = self._outer
            while outer is not None and not outer._active:
                outer = outer._outer
            current.set(outer)


current: contextvars.ContextVar[Guarded | None] = contextvars.ContextVar(
    "creditguard_current_spend", default=None
)
"""The innermost guarded call entered in this context (it may have exited since)."""


def enclosing(engine: Engine) -> Iterator[Guarded]:
    """The calls on ``engine``'s account that the caller runs inside, innermost first."""
    account = engine.account
    outer = current.get()
    while outer is not None:
        if outer._active and outer._engine.account is account:
            yield outer
        outer = outer._outer


class Held:
    """A hold: a reservation kept open past its call, until its work is done."""

    __slots__ = (
        "_action",
        "_engine",
        "_observed",
        "_started",
        "_subject",
        "_turn",
        "balance_after",
        "balance_before",
        "charged",
        "cost",
        "expires_at",
        "id",
    )

    def __init__(self, engine: Engine, kept: Kept, turn: Turn | None) -> None:
        self._engine = engine
        self._turn = turn  # the gate turn this object gives back, if it has one
        reservation = kept.reservation
        self.id = kept.hold_id
        self.cost = reservation.cost
        self.balance_before: CreditBalance | None = reservation.balance
        self.expires_at = kept.expires_at
        self.balance_after: CreditBalance | None = None
        self.charged: int | None = None
        self._subject: str | None = None
        self._action: str | None = None
        self._observed: tuple[object, ...] | None = None  # its observers' tokens, if any
        self._started = 0.0


def caller() -> tuple[int, int]:
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


def in_event_loop_thread() -> bool:
    """Whether this thread is running an event loop (asyncio or trio) right now."""
    if asyncio._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())
