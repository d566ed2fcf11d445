"""What both backends share about settling: how many finished spends may wait for a read,
and the balance after a paid call from what it reported."""

from __future__ import annotations

from creditguard.core.models import CreditBalance

__all__ = ["MAX_SETTLING", "after_report"]

# Finished spends that may wait for a read at once (see the memory account's ``defer``;
# with Redis, per process between two of its reads).
MAX_SETTLING = 1024


def after_report(
    cached: CreditBalance,
    charged: int | None,
    total_after: int | None,
    balance_after: CreditBalance | None,
) -> CreditBalance | None:
    """The balance after a call, from what it reported and the balance read before it
    (``None`` when the report does not say enough, or says credits were added)."""
    if balance_after is not None:
        return balance_after
    if total_after is not None:
        spent = cached.total_balance - total_after  # this call's charge, and anyone else's
    elif charged is not None:
        spent = charged
    else:
        return None
    if spent < 0 or spent > cached.total_balance:
        return None
    return cached.after_spending(spent)
