"""The outcomes of guarded calls (admitted, denied, busy, spent, failed...), each logged
and told to the ``on_event`` observer in one place."""

from __future__ import annotations

import logging

from creditguard.core.balance import InsufficientCredits
from creditguard.core.calls import Guarded
from creditguard.core.engine import Engine
from creditguard.core.errors import AdmissionTimeout, BalanceUnavailable
from creditguard.core.events import GuardEvent
from creditguard.core.models import CreditBalance

__all__ = ["emit", "logger"]

logger = logging.getLogger("creditguard")


def emit(
    engine: Engine,
    kind: str,
    cost: int,
    before: CreditBalance | None = None,
    after: CreditBalance | None = None,
    *,
    available: int | None = None,
    error: BaseException | None = None,
    charged: int | None = None,
    subject: str | None = None,
) -> None:
    """Tell the ``on_event`` observer, if there is one (what it raises is logged)."""
    on_event = engine.settings.on_event
    if on_event is None:
        return
    event = GuardEvent(
        kind, engine.account.fingerprint, cost, before, after, available, error, charged, subject
    )
    try:
        on_event(event)
    except Exception:
        logger.exception("on_event hook raised on a %r event", kind)


def denied(engine: Engine, exc: InsufficientCredits) -> None:
    logger.info(
        "denied %s credits on %s: %s available",
        exc.required,
        engine.account.fingerprint,
        exc.available,
    )
    if engine.settings.on_event is not None:
        emit(engine, "denied", exc.required, exc.balance, available=exc.available, error=exc)


def allowance_warning(engine: Engine, call: Guarded) -> None:
    """A subject's calls passed its allowance's ``warn_at`` in this window (once)."""
    logger.warning(
        "a subject's calls on %s passed the warning level of its allowance",
        engine.account.fingerprint,
    )
    if engine.settings.on_event is not None:
        emit(engine, "allowance_warning", call.cost, call.balance_before, subject=call._subject)


def busy(engine: Engine, exc: AdmissionTimeout) -> None:
    logger.info(
        "%s credits on %s not admitted in time: %s free beside %s reserved by calls in flight",
        exc.required,
        engine.account.fingerprint,
        exc.available,
        exc.reserved,
    )
    if engine.settings.on_event is not None:
        emit(engine, "busy", exc.required, available=exc.available, error=exc)


def rejected(engine: Engine, cost: int, exc: BaseException) -> None:
    if engine.settings.on_event is not None:
        emit(engine, "rejected", cost, error=exc)


def unavailable(engine: Engine, cost: int, exc: BalanceUnavailable) -> None:
    """Failing closed: the balance could not be read."""
    if engine.settings.on_event is not None:
        emit(engine, "unavailable", cost, error=exc)


def unchecked(engine: Engine, cost: int, exc: BalanceUnavailable) -> None:
    """Failing open (``on_unavailable="allow"``): the call runs without a balance."""
    logger.warning(
        "balance unavailable for %s (%s); running a %s-credit action unchecked"
        " (on_unavailable='allow')",
        engine.account.fingerprint,
        exc,
        cost,
    )


def spent(engine: Engine, call: Guarded, balance: CreditBalance | None) -> None:
    """``balance``: the balance after, or ``None`` when the spend settles later."""
    call._after = balance
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "spent %d credits on %s: %s -> %s",
            call.cost,
            engine.account.fingerprint,
            "unchecked" if call.balance_before is None else call.balance_before.total_balance,
            "settles later" if balance is None else balance.total_balance,
        )
    if engine.settings.on_event is not None:
        emit(engine, "spent", call.cost, call.balance_before, balance, charged=call.charged)


def failed(engine: Engine, call: Guarded, exc: BaseException) -> None:
    kind = "failed" if isinstance(exc, Exception) else "cancelled"
    if engine.settings.on_event is not None:
        emit(engine, kind, call.cost, call.balance_before, error=exc)


def refresh_failed(engine: Engine, call: Guarded, error: Exception) -> None:
    logger.warning(
        "the action on %s succeeded but the balance refresh after it failed: %s",
        engine.account.fingerprint,
        error,
    )
    if engine.settings.on_event is not None:
        emit(engine, "refresh_failed", call.cost, call.balance_before, error=error)


def after_unread(engine: Engine, call: Guarded, error: Exception) -> None:
    """The balance after a spend that settled later was asked for, and its read failed."""
    logger.warning(
        "the action on %s succeeded but the balance read after it failed: %s",
        engine.account.fingerprint,
        error,
    )


def read(engine: Engine, balance: CreditBalance) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "read the balance of %s: %d total (%d subscription, %d gift)",
            engine.account.fingerprint,
            balance.total_balance,
            balance.subscription_balance,
            balance.gift_balance,
        )
