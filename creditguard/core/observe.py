"""What the guard tells its observers (the OpenTelemetry instruments, the spend ledger):
each guarded call from start to end, each refusal with its reason, each balance read.

``Observer`` is the protocol; the functions here are the one place the guard calls its
observers from, and cost nothing when a guard has none. An observer must never make a
paid call wait or fail: what one raises is logged and dropped.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple, Protocol

from creditguard.core.balance import AllowanceExceeded, BudgetExceeded, InsufficientCredits
from creditguard.core.errors import (
    AdmissionTimeout,
    AuthenticationError,
    BalanceUnavailable,
    GateTimeout,
)
from creditguard.core.models import CreditBalance
from creditguard.core.outcomes import logger

if TYPE_CHECKING:
    from creditguard.core.calls import Guarded, Held
    from creditguard.core.engine import Engine

__all__ = ["SKIP", "Entry", "Observer", "begin", "decided", "ended", "read", "refused"]

SKIP: object = object()
"""What :meth:`Observer.begin` returns to sit a call out: it is told nothing more of it
(when every observer does, the call costs nothing more)."""

_monotonic = time.monotonic
# An entry's id: 96 random bits. Not a secret, only unique, so Python's generator (reseeded
# in a forked child) rather than os.urandom, a system call that costs 20 us on some kernels.
_bits = random.getrandbits


class Entry(NamedTuple):
    """One ended spend or hold, as the ledger records it.

    ``outcome`` is ``"spent"`` (the action returned), ``"failed"`` (it raised),
    ``"released"`` (a hold ended with nothing charged) or ``"expired"`` (a hold nobody
    ended in time). ``charged`` is what the paid call reported it cost (``None``: it did
    not say; the guard then counts the ``cost``). ``balance_before``/``balance_after`` are
    totals (``None`` when not known: a decorated call settles later). ``duration`` is in
    seconds, from asking for admission to the end. ``at`` is when it ended (UTC)."""

    id: str
    at: datetime
    account: str
    subject: str | None
    action: str | None
    cost: int
    charged: int | None
    balance_before: int | None
    balance_after: int | None
    outcome: str
    trace_id: str | None
    duration: float


class Observer(Protocol):
    """Told what the guard does. Every method is called in the caller's thread or task,
    must not block, and must not raise (what it raises is logged and dropped)."""

    def begin(self, engine: Engine, call: Guarded) -> object:
        """A guarded call starts (before its admission): what to hand back to
        :meth:`decided` and :meth:`ended` for it (a span, or ``None``), or :data:`SKIP`
        to be told nothing more of it."""
        ...

    def decided(
        self,
        engine: Engine,
        call: Guarded,
        token: object,
        outcome: str,
        reason: str | None,
        seconds: float,
    ) -> None:
        """Its admission was decided after ``seconds``: ``outcome`` ``"admitted"`` or
        ``"unchecked"`` (it runs), or ``"refused"`` (``reason``: ``"balance"``,
        ``"allowance"``, ``"budget"``, ``"keep"``), ``"busy"``, ``"unavailable"``,
        ``"rejected"`` or ``"cancelled"`` (it does not run: this is its end)."""
        ...

    def ended(self, engine: Engine, call: Guarded | Held, token: object, entry: Entry) -> None:
        """A call that ran has ended (a spend block or decorated call, or a hold)."""
        ...

    def read(
        self,
        engine: Engine,
        balance: CreditBalance | None,
        error: BaseException | None,
        started: float,
        seconds: float,
    ) -> None:
        """An upstream balance read ended (``balance``, or ``error``); ``started`` is its
        wall-clock start (Unix seconds)."""
        ...


def _each(engine: Engine) -> tuple[Observer, ...]:
    return engine.settings.observers


def begin(engine: Engine, call: Guarded) -> None:
    """``call`` starts: each observer's token is kept on it."""
    observers = engine.settings.observers
    if not observers:
        return
    tokens = []
    wanted = False
    for observer in observers:
        try:
            token = observer.begin(engine, call)
        except Exception:
            logger.exception("an observer failed when a call started")
            token = None
        tokens.append(token)
        wanted = wanted or token is not SKIP
    if wanted:
        call._started = _monotonic()
        call._observed = tuple(tokens)


def decided(engine: Engine, call: Guarded, outcome: str, reason: str | None = None) -> None:
    """``call``'s admission was decided (see :meth:`Observer.decided`)."""
    tokens = call._observed
    if tokens is None:
        return
    seconds = _monotonic() - call._started
    for observer, token in zip(engine.settings.observers, tokens, strict=False):
        if token is SKIP:
            continue
        try:
            observer.decided(engine, call, token, outcome, reason, seconds)
        except Exception:
            logger.exception("an observer failed on an admission")


def refusal(exc: BaseException) -> tuple[str, str | None]:
    """The outcome and reason an exception raised at admission stands for."""
    if isinstance(exc, AllowanceExceeded):
        return "refused", "allowance"
    if isinstance(exc, BudgetExceeded):
        return "refused", "budget"
    if isinstance(exc, InsufficientCredits):
        if exc.keep and exc.required <= exc.available + exc.keep:
            return "refused", "keep"
        return "refused", "balance"
    if isinstance(exc, (AdmissionTimeout, GateTimeout)):
        return "busy", None
    if isinstance(exc, AuthenticationError):
        return "rejected", None
    if isinstance(exc, BalanceUnavailable):
        return "unavailable", None
    if isinstance(exc, Exception):
        return "rejected", None
    return "cancelled", None


def refused(engine: Engine, call: Guarded, exc: BaseException) -> None:
    """``call`` was not admitted: ``exc`` says why."""
    if call._observed is None:
        return
    outcome, reason = refusal(exc)
    decided(engine, call, outcome, reason)
    call._observed = None


def ended(
    engine: Engine,
    call: Guarded | Held,
    outcome: str,
    trace_id: str | None = None,
    balance_after: CreditBalance | None = None,
) -> None:
    """``call`` ran and ended (``outcome``: see :class:`Entry`). A hold taken in another
    process (``hold_by_id``) is told here with its duration unknown (0)."""
    observers = engine.settings.observers
    if not observers:
        return
    tokens = call._observed
    if tokens is None:
        if not hasattr(call, "expires_at"):
            return  # a spend whose end was told already (or never began here)
        call._started = _monotonic()
        tokens = tuple(None for _ in observers)
    call._observed = None
    before = call.balance_before
    after = balance_after
    entry = Entry(  # by position, in the order of Entry's fields (keywords cost more)
        f"{_bits(96):024x}",
        datetime.now(timezone.utc),
        engine.account.fingerprint,
        call._subject,
        call._action,
        call.cost,
        call.charged,
        None if before is None else before.total_balance,
        None if after is None else after.total_balance,
        outcome,
        trace_id,
        _monotonic() - call._started,
    )
    for observer, token in zip(engine.settings.observers, tokens, strict=False):
        if token is SKIP:
            continue
        try:
            observer.ended(engine, call, token, entry)
        except Exception:
            logger.exception("an observer failed at the end of a call")


def read(
    engine: Engine,
    balance: CreditBalance | None,
    error: BaseException | None,
    started: float,
    seconds: float,
) -> None:
    """An upstream read ended."""
    for observer in engine.settings.observers:
        try:
            observer.read(engine, balance, error, started, seconds)
        except Exception:
            logger.exception("an observer failed on a balance read")
