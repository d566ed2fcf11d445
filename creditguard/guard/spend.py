"""``Spend``: one guarded spend, a sync and async context manager, and
``current_spend()``, the spend of the guarded call running in this context.

The admission and settling it drives are the guard's (``_guard.py``).
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import TYPE_CHECKING

from creditguard.core.checks import _check_cost
from creditguard.lensmor.precheck import Precheck

if TYPE_CHECKING:
    from creditguard.core.models import CreditBalance
    from creditguard.core.steps import Reservation, Turn
    from creditguard.guard.guard import CreditGuard

__all__ = ["Spend", "current_spend"]

_current: contextvars.ContextVar[Spend | None] = contextvars.ContextVar(
    "creditguard_current_spend", default=None
)


def current_spend() -> Spend | None:
    """The :class:`Spend` of the guarded call running in this context, or ``None``.

    Inside a function decorated with ``requires_credits`` (or a ``with guard.spend()``
    block) it is that call's spend: its ``cost`` and ``balance_before`` are known while
    the action runs. It follows the context (thread, task) the spend was entered in;
    nested spends see the innermost.
    """
    spend = _current.get()
    while spend is not None and not spend._active:  # exited out of order, or elsewhere
        spend = spend._outer
    return spend


class Spend:
    """One guarded spend of ``cost`` credits; a sync and async context manager.

    ``balance_before`` is the balance the admission was decided on (``None`` only when
    run unchecked under ``on_unavailable="allow"``); a block is admitted on one that
    includes every guarded call that returned before it. ``balance_after`` is set when the
    block exits: the balance read after the action finished, or ``None`` when that
    refresh failed or the block raised or was cancelled. (A decorated call does not wait
    for that read: its spend has ``balance_after=None`` and settles at a later read.)
    ``charged`` is what the call cost when its paid call reported it (see :meth:`report`),
    else ``None``. While the block
    (or decorated call) runs, :func:`current_spend` returns this spend.
    """

    __slots__ = (
        "_active",
        "_defer",
        "_entered",
        "_guard",
        "_outer",
        "_precheck",
        "_reservation",
        "_result",
        "_turn",
        "balance_after",
        "balance_before",
        "charged",
        "cost",
    )

    def __init__(self, guard: CreditGuard, cost: int | Precheck, *, defer: bool = False) -> None:
        self._guard = guard
        # Settle without waiting for the refresh (decorated calls, middleware): the
        # caller never sees balance_after, so the next read that needs it settles it.
        self._defer = defer
        self._entered = False
        self._precheck: Precheck | None = None
        if isinstance(cost, Precheck):
            self._precheck, cost = cost, 0  # the cost is Lensmor's answer, on entering
        self._active = False  # entered and not yet exited
        self._outer: Spend | None = None  # the spend this one runs inside, if any
        self._reservation: Reservation | None = None  # held from admission to settling
        self._result: object = None  # the paid call's answer, to settle from its report
        self._turn: Turn | None = None  # its turn at the gate (max_concurrent), if on
        self.charged: int | None = None
        self.cost = _check_cost(cost)
        self.balance_before: CreditBalance | None = None
        self.balance_after: CreditBalance | None = None

    def __repr__(self) -> str:
        before = None if self.balance_before is None else self.balance_before.total_balance
        after = None if self.balance_after is None else self.balance_after.total_balance
        return f"<Spend cost={self.cost} before={before} after={after}>"

    def report(self, result: object) -> None:
        """Hand the paid call's answer to the guard, inside the block.

        ``result`` is Lensmor's answer: an ``httpx.Response`` or its decoded JSON. When it
        reports what the call did (``creditsUsed``, ``balanceAfter``...), the spend may
        settle from it without a balance read (see the consistency model), and
        :attr:`charged` says what the call cost. An answer without credit figures, or one
        that cannot be trusted, changes nothing: the spend settles with a refresh.
        Decorated functions need not call it: what they return is looked at the same way.
        """
        if not self._active:
            raise RuntimeError("Spend.report() is for inside the guarded block")
        self._result = result

    def _enter(self) -> None:
        if self._entered:
            raise RuntimeError("a Spend can be entered only once; call guard.spend() again")
        self._entered = True

    def _activate(self) -> None:
        self._outer = _current.get()
        self._active = True
        _current.set(self)

    def _leave(self) -> None:
        # Not a token reset: spends may be exited in another order than they were
        # entered (or in another context), and the variable must then neither go back
        # to a spend that has finished nor lose one that is still running.
        self._active = False
        if _current.get() is self:
            outer = self._outer
            while outer is not None and not outer._active:
                outer = outer._outer
            _current.set(outer)

    def __enter__(self) -> Spend:
        self._enter()
        guard = self._guard
        precheck = self._precheck
        if precheck is not None:
            self.cost = guard._cost_of(precheck, precheck.params_for())
            if not self.cost:  # nothing to charge: run with nothing reserved
                self._activate()
                return self
        if guard._shared.max_concurrent is not None:
            guard._drive(guard._open(self, True))
        elif not guard._admit_cached(self):
            guard._drive(guard._admit(self, True))
        self._activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leave()
        guard = self._guard
        guard._drive(guard._exit(self, exc, True))

    async def __aenter__(self) -> Spend:
        self._enter()
        guard = self._guard
        precheck = self._precheck
        if precheck is not None:
            self.cost = await guard._acost_of(precheck, precheck.params_for())
            if not self.cost:  # nothing to charge: run with nothing reserved
                self._activate()
                return self
        if guard._shared.max_concurrent is not None:
            await guard._adrive(guard._open(self, False))
        elif not guard._admit_cached(self):
            await guard._adrive(guard._admit(self, False))
        self._activate()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leave()
        guard = self._guard
        await guard._adrive(guard._exit(self, exc, False))
