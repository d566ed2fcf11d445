"""``Spend``: one guarded spend, a sync and async context manager, and
``current_spend()``, the spend of the guarded call running in this context.

The admission and settling it drives are the core's flows (``creditguard.core.flows``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, cast

from creditguard.core import flows, observe
from creditguard.core.calls import Guarded, current
from creditguard.core.drive import adrive, drive
from creditguard.core.engine import Engine
from creditguard.core.flows import admit_cached
from creditguard.core.models import CreditBalance
from creditguard.core.policy import check_subject
from creditguard.lensmor.precheck import Precheck
from creditguard.lensmor.upstream import Lensmor

__all__ = ["Spend", "acost_of", "cost_of", "current_spend"]


class Guard(Protocol):
    """What a spend needs of its guard (a ``CreditGuard``): the engine its flows run
    over."""

    @property
    def _engine(self) -> Engine: ...


def cost_of(engine: Engine, precheck: Precheck, params: Mapping[str, Any]) -> int:
    """What to admit an action for, from Lensmor's precheck (0: nothing to charge)."""
    steps = flows.cost_of(engine, precheck.action_type, params, precheck.at_most, True)
    return drive(engine, steps)


async def acost_of(engine: Engine, precheck: Precheck, params: Mapping[str, Any]) -> int:
    """Async :func:`cost_of`."""
    steps = flows.cost_of(engine, precheck.action_type, params, precheck.at_most, False)
    return await adrive(engine, steps)


def current_spend() -> Spend | None:
    """The :class:`Spend` of the guarded call running in this context, or ``None``.

    Inside a function decorated with ``requires_credits`` (or a ``with guard.spend()``
    block) it is that call's spend: its ``cost`` and ``balance_before`` are known while
    the action runs. It follows the context (thread, task) the spend was entered in;
    nested spends see the innermost.
    """
    spend = current.get()
    while spend is not None and not spend._active:  # exited out of order, or elsewhere
        spend = spend._outer
    return cast("Spend | None", spend)


class Spend(Guarded):
    """One guarded spend of ``cost`` credits; a sync and async context manager.

    ``balance_before`` is the balance the admission was decided on (``None`` only when
    run unchecked under ``on_unavailable="allow"``): the cached balance while it is
    fresh, so it may not yet include calls that returned just before (they settle at
    the next read).

    A block settles lazily: it exits without a balance read, and its reservation is held
    until a read that includes its charge comes back, whoever makes it (as a decorated
    call's). ``balance_after`` is read when first asked for: the balance from a read that
    started after the action finished (so it includes the block's charge), or the one
    its paid call reported when that report settled it; ``None`` when the block raised or
    was cancelled, or when that read failed (a warning is logged). It is read once, then
    remembered (a read that is cancelled is not: the next ask reads again). In async code
    use ``await s.abalance_after()``: the property reads with the sync client and would
    block the event loop while it does. (A decorated call, or a request guarded by a web
    adapter, never reads it: its spend has ``balance_after=None``.) ``charged`` is what
    the call cost when its paid call reported it (see :meth:`report`), else ``None``.
    While the block (or decorated call) runs, :func:`current_spend` returns this spend.
    """

    __slots__ = ("_lazy", "_precheck")

    def __init__(
        self,
        guard: Guard,
        cost: int | Precheck,
        *,
        defer: bool = False,
        lazy: bool = False,
        subject: str | None = None,
        action: str | None = None,
    ) -> None:
        self._precheck: Precheck | None = None
        if isinstance(cost, Precheck):
            self._precheck, cost = cost, 0  # the cost is Lensmor's answer, on entering
        engine = guard._engine
        # ``lazy`` (a block): settle later and read the balance after when asked for.
        # Over an async-only transport the property could not read it, so such a block
        # settles at exit as it always did (its balance after read then).
        upstream = engine.upstream
        lazy = lazy and not (isinstance(upstream, Lensmor) and not upstream.reads_sync)
        self._lazy = lazy
        if subject is not None:
            subject = check_subject(subject)
        Guarded.__init__(self, engine, cost, defer or lazy, subject)
        if action is not None and (type(action) is not str or not action):
            raise ValueError(f"action must be a non-empty str, got {action!r}")
        self._action = action

    def __repr__(self) -> str:
        before = None if self.balance_before is None else self.balance_before.total_balance
        text = f"<Spend cost={self.cost} before={before}"
        if not (self._lazy and self._due is not None):  # known: no read to show it
            after = self._after
            text += f" after={None if after is None else after.total_balance}"
        return text + ">"

    @property
    def balance_after(self) -> CreditBalance | None:
        """The balance after the block (read now if it settled later and was not read
        yet; see the class docs). ``None`` while the block runs."""
        if not (self._lazy and self._due is not None):
            return self._after
        engine = self._engine
        return drive(engine, flows.after(engine, self, True))

    async def abalance_after(self) -> CreditBalance | None:
        """:attr:`balance_after` from async code: the read, if one is needed, is made
        with the async client, without blocking the event loop."""
        if not (self._lazy and self._due is not None):
            return self._after
        engine = self._engine
        return await adrive(engine, flows.after(engine, self, False))

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

    def __enter__(self) -> Spend:
        self._enter()
        engine = self._engine
        if not engine.settings.observers:
            return self._admit()
        observe.begin(engine, self)
        try:
            return self._admit()
        except BaseException as exc:
            observe.refused(engine, self, exc)
            raise

    def _admit(self) -> Spend:
        precheck = self._precheck
        if precheck is not None:
            self.cost = cost_of(self._engine, precheck, precheck.params_for())
            if not self.cost:  # nothing to charge: run with nothing reserved
                self._activate()
                if self._observed is not None:
                    observe.decided(self._engine, self, "admitted")
                return self
        engine = self._engine
        if engine.settings.max_concurrent is not None:
            drive(engine, flows.open(engine, self, True))
        elif not admit_cached(engine, self):
            drive(engine, flows.admit(engine, self, True))
        self._activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leave()
        engine = self._engine
        if self._observed is None:
            drive(engine, flows.exit(engine, self, exc, True))
            return
        result = self._result
        try:
            drive(engine, flows.exit(engine, self, exc, True))
        except BaseException as error:
            observe.ended(engine, self, "failed", engine.upstream.trace_of(error))
            raise
        self._told(exc, result)

    def _told(self, exc: BaseException | None, result: object) -> None:
        """Tell the observers how the block ended."""
        engine = self._engine
        outcome = exc if exc is not None else result
        trace = None if outcome is None else engine.upstream.trace_of(outcome)
        observe.ended(engine, self, "failed" if exc else "spent", trace, self._after)

    async def __aenter__(self) -> Spend:
        self._enter()
        engine = self._engine
        if not engine.settings.observers:
            return await self._aadmit()
        observe.begin(engine, self)
        try:
            return await self._aadmit()
        except BaseException as exc:
            observe.refused(engine, self, exc)
            raise

    async def _aadmit(self) -> Spend:
        precheck = self._precheck
        if precheck is not None:
            self.cost = await acost_of(self._engine, precheck, precheck.params_for())
            if not self.cost:  # nothing to charge: run with nothing reserved
                self._activate()
                if self._observed is not None:
                    observe.decided(self._engine, self, "admitted")
                return self
        engine = self._engine
        if engine.settings.max_concurrent is not None:
            await adrive(engine, flows.open(engine, self, False))
        elif not admit_cached(engine, self):
            await adrive(engine, flows.admit(engine, self, False))
        self._activate()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leave()
        engine = self._engine
        if self._observed is None:
            await adrive(engine, flows.exit(engine, self, exc, False))
            return
        result = self._result
        try:
            await adrive(engine, flows.exit(engine, self, exc, False))
        except BaseException as error:
            observe.ended(engine, self, "failed", engine.upstream.trace_of(error))
            raise
        self._told(exc, result)
