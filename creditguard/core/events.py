"""What the guard tells ``on_event`` observers: ``GuardEvent``."""

from __future__ import annotations

import dataclasses

from creditguard.core.models import CreditBalance

__all__ = ["GuardEvent"]


@dataclasses.dataclass(frozen=True, slots=True)
class GuardEvent:
    """What the guard just did, for ``on_event`` observers.

    ``kind`` is one of ``"admitted"``, ``"denied"`` (not enough credits), ``"busy"``
    (calls in flight did not settle within ``admission_timeout``), ``"unavailable"``
    (refused because the balance could not be read, failing closed), ``"rejected"`` (the key
    was refused), ``"unchecked"`` (admitted without a balance under
    ``on_unavailable="allow"``), ``"spent"`` (with the balance before and after),
    ``"failed"`` (the action raised), ``"cancelled"`` (cancelled in the action or in the
    refresh after it), ``"refresh_failed"``, ``"released"`` (a hold ended with nothing
    charged), ``"allowance_warning"`` (a subject's calls passed its allowance's
    ``warn_at`` in this window: once per subject per window), ``"low_balance"`` and
    ``"balance_recovered"`` (the balance crossed an ``on_low_balance`` threshold:
    ``available`` is the threshold). ``account`` is the account's fingerprint,
    never the key. ``charged`` (on ``"spent"``) is what the call cost, when its paid call
    reported it. ``subject`` is the call's subject, when it has one.
    """

    kind: str
    account: str
    cost: int
    balance_before: CreditBalance | None = None
    balance_after: CreditBalance | None = None
    available: int | None = None
    error: BaseException | None = None
    charged: int | None = None
    subject: str | None = None
