"""The guard's other models: what a precheck answers, what a paid call reported, the
open holds and what an account holds now (``AccountSnapshot``). ``CreditBalance`` is in
``balance.py`` (and importable from here)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from creditguard.core.balance import CreditBalance, _count
from creditguard.core.errors import InvalidResponse

__all__ = ["AccountSnapshot", "CreditBalance", "OpenHold", "PrecheckResult", "Report"]


@dataclasses.dataclass(frozen=True, slots=True)
class PrecheckResult:
    """Lensmor's answer to ``POST /external/actions/precheck``: what an action would
    charge, without charging, reserving or locking anything.

    ``allowed`` says whether the action may run; ``should_charge`` and ``credits`` what it
    would cost (0 when nothing: already-unlocked contacts are free); ``reason_code`` why
    (``ok``, ``already_unlocked``, ``insufficient_balance``, ``unlock_in_progress``,
    ``state_conflict``, ``no_contacts_available``, ``unsupported_action``...); ``detail``
    the action's own figures (e.g. ``personnel_ids`` that would be charged).
    """

    action_type: str
    allowed: bool
    should_charge: bool
    credits: int
    reason_code: str
    biz_code: str = ""
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_api(cls, data: object) -> PrecheckResult:
        """Validate the answer; raise :class:`InvalidResponse` when a field is missing or
        of the wrong type."""
        if not isinstance(data, Mapping):
            raise InvalidResponse(
                f"precheck answer must be a JSON object, got {type(data).__name__}"
            )
        for name in ("ok", "allowed", "should_charge"):
            if type(data.get(name)) is not bool:
                raise InvalidResponse(f"precheck answer lacks the boolean {name!r}")
        for name in ("action_type", "reason_code", "biz_code"):
            if not isinstance(data.get(name), str):
                raise InvalidResponse(f"precheck answer lacks the string {name!r}")
        if "credits" not in data:
            raise InvalidResponse("precheck answer lacks 'credits'")
        detail = data.get("detail")
        if not isinstance(detail, Mapping):
            raise InvalidResponse("precheck answer lacks the object 'detail'")
        return cls(
            action_type=data["action_type"],
            allowed=data["allowed"],
            should_charge=data["should_charge"],
            credits=_count(data["credits"], "credits"),
            reason_code=data["reason_code"],
            biz_code=data["biz_code"],
            detail=dict(detail),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class OpenHold:
    """One open hold of an account: its ``id``, ``cost`` and when it expires
    (``expires_at``, Unix seconds)."""

    id: str
    cost: int
    expires_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class AccountSnapshot:
    """What the guard holds for one account at one moment (``guard.snapshot()``): the
    same on both backends; over Redis, the whole account across every process.

    ``balance`` is the cached balance (``None``: none cached, or no longer trusted);
    ``reserved`` and ``in_flight`` the credits and count of guarded calls in flight,
    those that returned and wait for a read that includes them included (holds are
    not); ``held`` and ``holds`` the credits and count of open holds; ``settling`` how
    many of the calls in flight have returned and wait for that read;
    ``gate_waiting`` the callers queued for a turn at the gate; ``backend`` ``"memory"``
    or ``"redis"``; ``open_holds`` each open hold.
    """

    balance: CreditBalance | None
    reserved: int
    in_flight: int
    held: int
    holds: int
    settling: int
    gate_waiting: int
    backend: str
    open_holds: tuple[OpenHold, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """What one paid call reported about credits.

    ``charged`` is the credits the call says it used (``creditsUsed``, ``creditsSpent`` or
    ``totalCreditsUsed``), 0 when it charged nothing, ``None`` when it did not say.
    ``total_after`` is the total balance after the call, when reported. ``balance_after``
    is the whole balance, when the call reported one (visitors unlock). From the short
    4-field ``balanceAfter`` (event and full-access unlock): ``subscription_after``
    (``subscriptionBalance``), ``permanent_after`` (``permanentBalance``, the gift and
    other permanent credits) and ``unlimited``; ``subscription_after`` is also set from a
    whole balance. ``already_unlocked`` is the call's ``alreadyUnlocked``, when given.
    """

    charged: int | None
    total_after: int | None = None
    balance_after: CreditBalance | None = None
    subscription_after: int | None = None
    permanent_after: int | None = None
    unlimited: bool | None = None
    already_unlocked: bool | None = None

    def contradiction(self, before: CreditBalance) -> str | None:
        """What makes this report impossible after ``before``, the balance the call was
        admitted on (``None``: nothing). The total after can be at most the total before
        less the charge: lower is possible (the Lensmor web app spends from the same
        pool), higher is not (a charge the total does not show, or credits that appeared
        from nowhere). A report that contradicts it must not be cached."""
        total_after = self.total_after
        if total_after is None:
            return None
        charged = self.charged or 0
        if total_after <= before.total_balance - charged:
            return None
        said = "" if not charged else f" less the {charged} charged"
        return f"a total of {total_after} after it, above the {before.total_balance} before{said}"
