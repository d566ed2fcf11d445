"""The guard's spending policy at run time: the floor (``keep``), the allowance of each
subject (its window, as admission asks for it), the ``budget()`` blocks a call runs in,
and the low-balance watchers. The rules are in docs/policy.md; the windows' books live
in the state backend (``Reservations.window_usage``), the budgets in this process."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import cast

from creditguard.core.balance import BudgetExceeded
from creditguard.core.policy import Allowance, LowBalance, resolve, subject_key
from creditguard.core.steps import Reservation, Window

__all__ = [
    "AllowanceSpec",
    "Budget",
    "LowBalanceCallback",
    "Policy",
    "Watcher",
    "budgets",
]

AllowanceSpec = Allowance | Callable[[str], Allowance | None] | None
"""One allowance for every subject, a callable ``subject -> Allowance | None``, or none."""

LowBalanceCallback = Callable[[LowBalance], Awaitable[None] | None]

_now = time.time  # the wall clock windows are worked out on (tests set it)

_MAX_WINDOWS = 10_000  # windows remembered per guard before the memo starts over


class Policy:
    """A guard's spending rules, shared by its views: the floor, the allowance, the
    windows worked out (memoised until they end), and the low-balance watchers."""

    __slots__ = ("_lock", "_windows", "active", "allowance", "keep", "watchers")

    def __init__(self, keep: int, allowance: AllowanceSpec) -> None:
        self.keep = keep
        self.allowance = allowance
        # Whether admission has a rule to look at (the floor or an allowance).
        self.active = bool(keep) or allowance is not None
        self.watchers: list[Watcher] = []
        self._lock = threading.Lock()
        # (subject, allowance) -> its window now; a window is used until it ends
        self._windows: dict[tuple[str, Allowance], Window] = {}

    def window(self, subject: str | None, at: float | None = None) -> Window | None:
        """The allowance window ``subject``'s call counts in now (``None``: no subject, or
        no allowance for it)."""
        if subject is None or self.allowance is None:
            return None
        allowance = resolve(self.allowance, subject)
        if allowance is None:
            return None
        now = _now() if at is None else at
        memo = (subject, allowance)
        window = self._windows.get(memo)
        if window is not None and window.start <= now < window.end:
            return window
        start, end = allowance.period(datetime.fromtimestamp(now, timezone.utc))
        key = f"{subject_key(subject)}:{int(start.timestamp() * 1000)}"
        window = Window(subject, key, allowance.limit, start, end, allowance.warn_credits)
        with self._lock:
            if len(self._windows) >= _MAX_WINDOWS:
                self._windows.clear()
            self._windows[memo] = window
        return window


# -- budgets ---------------------------------------------------------------------------


class Budget:
    """A ``guard.budget(limit)`` block: caps what the guarded calls inside it (and the
    tasks started inside it) may be admitted for in total. Process-local.

    ``spent`` is what its calls were charged (a paid call's report, else its cost; a call
    that failed: nothing), ``reserved`` what its calls in flight hold, ``remaining`` what
    may still be admitted (``limit - spent - reserved``)."""

    __slots__ = ("_lock", "_token", "limit", "reserved", "spent")

    def __init__(self, limit: int) -> None:
        if type(limit) is not int or limit < 0:
            raise ValueError(f"a budget's limit must be an int >= 0, got {limit!r}")
        self.limit = limit
        self.spent = 0
        self.reserved = 0
        self._lock = threading.Lock()
        self._token: contextvars.Token[tuple[Budget, ...]] | None = None

    def __repr__(self) -> str:
        return f"<Budget limit={self.limit} spent={self.spent} reserved={self.reserved}>"

    @property
    def remaining(self) -> int:
        """What the block's calls may still be admitted for."""
        return max(0, self.limit - self.spent - self.reserved)

    def _take(self, cost: int) -> bool | None:
        """Reserve ``cost``: ``True``; ``None`` when only the block's calls in flight
        stand in the way (wait for them); raises :class:`BudgetExceeded` when it cannot
        fit even if they charge nothing."""
        with self._lock:
            if cost > self.limit - self.spent:
                raise BudgetExceeded(
                    cost, limit=self.limit, spent=self.spent, reserved=self.reserved
                )
            if cost > self.limit - self.spent - self.reserved:
                return None
            self.reserved += cost
            return True

    def _settle(self, cost: int, charged: int) -> None:
        with self._lock:
            self.reserved -= cost
            self.spent += charged

    # -- the block ---------------------------------------------------------------------

    def __enter__(self) -> Budget:
        if self._token is not None:
            raise RuntimeError("a budget can be entered only once; call guard.budget() again")
        self._token = budgets.set((*budgets.get(), self))
        return self

    def __exit__(self, *exc: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            try:
                budgets.reset(token)
            except ValueError:  # exited in another context: drop this budget from it
                budgets.set(tuple(b for b in budgets.get() if b is not self))

    async def __aenter__(self) -> Budget:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


budgets: contextvars.ContextVar[tuple[Budget, ...]] = contextvars.ContextVar(
    "creditguard_budgets", default=()
)
"""The budget blocks the caller runs in, outermost first (tasks inherit them)."""


def take_budgets(cost: int) -> tuple[tuple[Budget, ...], bool]:
    """Reserve ``cost`` in every budget the caller runs in: (the budgets, ``True``), or
    (``()``, ``False``) when a budget's calls in flight stand in the way (nothing is then
    reserved); raises :class:`BudgetExceeded` (nothing reserved)."""
    chain = budgets.get()
    if not chain:
        return (), True
    taken: list[Budget] = []
    try:
        for budget in chain:
            if budget._take(cost) is None:
                for done in taken:
                    done._settle(cost, 0)
                return (), False
            taken.append(budget)
    except BaseException:
        for done in taken:
            done._settle(cost, 0)
        raise
    return chain, True


def settle_budgets(chain: tuple[Budget, ...], cost: int, charged: int) -> None:
    for budget in chain:
        budget._settle(cost, charged)


def end_budgets(reservation: Reservation, charged: int | None = None) -> None:
    """The call of ``reservation`` ended: count what it was charged (``charged``, else
    what its call reported, else its cost) in the budgets it counts in, once."""
    chain = reservation.budgets
    if not chain:
        return
    reservation.budgets = ()
    if charged is None:
        charged = reservation.cost if reservation.charge is None else reservation.charge
    for budget in chain:
        cast(Budget, budget)._settle(reservation.cost, charged)


# -- low balance -----------------------------------------------------------------------


class Watcher:
    """One ``guard.on_low_balance(threshold, callback)``: ``threshold`` in credits (an
    int) or a fraction of the account's ``total_amount`` (a float in (0, 1)). ``low`` is
    what this process last saw (``None``: nothing yet); ``name`` names its state in the
    backend, so that every process sharing it hears a crossing once."""

    __slots__ = ("callback", "low", "name", "threshold")

    def __init__(self, threshold: int | float, callback: LowBalanceCallback) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be an int or a float, got {threshold!r}")
        if isinstance(threshold, float) and not 0 < threshold < 1:
            raise ValueError(f"a fractional threshold must be in (0, 1), got {threshold!r}")
        if isinstance(threshold, int) and threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.threshold = threshold
        self.callback = callback
        self.low: bool | None = None
        self.name = f"low:{threshold!r}"

    def credits(self, total_amount: int) -> int:
        """The threshold in credits for an account of ``total_amount``."""
        threshold = self.threshold
        if isinstance(threshold, float):
            return int(threshold * total_amount)
        return threshold
