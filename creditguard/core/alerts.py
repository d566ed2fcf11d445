"""Low-balance alerts: after each balance the guard learns (a read, or a paid call's
report), tell the ``on_low_balance`` callbacks whose threshold it crossed, once per
crossing. The backend records which side of each threshold the balance was last seen
on, so that every process sharing it tells a crossing once (``Reservations.flip``)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable

from creditguard.core import outcomes
from creditguard.core.engine import Engine
from creditguard.core.models import CreditBalance
from creditguard.core.policy import LowBalance
from creditguard.core.spending import Watcher
from creditguard.core.steps import Call, Ops

__all__ = ["observe"]

logger = outcomes.logger


def observe(engine: Engine, balance: CreditBalance) -> Ops[None]:
    """The balance is now ``balance``: tell the callbacks of the thresholds it crossed
    (a backend call only when this process sees a side change)."""
    for watcher in engine.settings.policy.watchers:
        threshold = watcher.credits(balance.total_amount)
        low = balance.total_balance < threshold
        if watcher.low is low:
            continue
        watcher.low = low
        before = yield from engine.account.flip(watcher.name, low)
        if before is low or (before is None and not low):
            continue  # another process told it, or nothing was low to recover from
        alert = LowBalance(threshold, balance.total_balance, "low" if low else "recovered")
        kind = "low_balance" if low else "balance_recovered"
        if low:
            logger.warning(
                "the balance of %s fell below %d credits: %d",
                engine.account.fingerprint,
                threshold,
                balance.total_balance,
            )
        outcomes.emit(engine, kind, 0, balance, available=threshold)
        yield _tell(watcher, alert)


def _tell(watcher: Watcher, alert: LowBalance) -> Call:
    """Calling ``watcher``'s callback, as a ``Call``: from async code an async callback
    is awaited; from sync code it runs in a thread of its own. What it raises is logged."""
    callback = watcher.callback

    def run() -> None:
        try:
            result = callback(alert)
        except Exception:
            logger.exception("an on_low_balance callback raised")
            return
        if inspect.isawaitable(result):
            threading.Thread(
                target=_run_coroutine, args=(result,), name="creditguard-alert", daemon=True
            ).start()

    async def arun() -> None:
        try:
            result = callback(alert)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("an on_low_balance callback raised")

    return Call(run, arun)


def _run_coroutine(result: Awaitable[None]) -> None:
    async def main() -> None:
        await result

    try:
        asyncio.run(main())
    except Exception:
        logger.exception("an on_low_balance callback raised")
