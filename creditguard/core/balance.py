"""The balance model (the documented JSON shape of ``GET /external/credits/balance``), and
:class:`InsufficientCredits`, the refusal that carries the balance it was decided on.

Two published shapes: API 0.22 sends seven fields (``totalAmount``, ``totalBalance``, the
subscription and gift buckets, ``resetAt``); API 0.24 and later add an add-on bucket
(``addonAmount``, ``addonBalance``, ``addonExpireAt``). Every count is typed ``number`` in the
published schema, so a whole number sent as a JSON float (``30050.0``) is accepted as the int
it stands for; a fraction, NaN, an infinity, a bool, a string, a negative count or one above
2**53 - 1 (beyond what a double holds exactly) is not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from creditguard.core.errors import CreditGuardError, InvalidResponse

__all__ = ["AllowanceExceeded", "BudgetExceeded", "CreditBalance", "InsufficientCredits"]

# (python attribute, documented camelCase field): the counts every published version sends
_INT_FIELDS = (
    ("total_amount", "totalAmount"),
    ("total_balance", "totalBalance"),
    ("subscription_amount", "subscriptionAmount"),
    ("subscription_balance", "subscriptionBalance"),
    ("gift_amount", "giftAmount"),
    ("gift_balance", "giftBalance"),
)
# the add-on bucket's fields (API 0.24+); absent from older servers' answers
_ADDON_FIELDS = ("addonAmount", "addonBalance", "addonExpireAt")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# 9999-12-31T23:59:59.999Z, the last millisecond a datetime can hold
_MAX_MS = 253_402_300_799_999
# The largest count taken from the service: 2**53 - 1, the last integer a double holds
# exactly (the Redis backend's Lua scripts count in doubles). A count above it is out of
# range: InvalidResponse at parse time, the same on every backend, and no backend sees it.
_MAX_COUNT = 2**53 - 1


def _require_count(data: Mapping[str, Any], field: str) -> int:
    """The non-negative whole number ``data[field]``, or :class:`InvalidResponse`."""
    if field not in data:
        raise InvalidResponse(f"balance response lacks {field!r}")
    return _count(data[field], field)


def _count(value: object, field: str) -> int:
    # bool is an int subclass: reject it explicitly, as well as strings and null.
    if type(value) is float:
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidResponse(f"{field!r} must be a whole number, got {value!r}")
        value = int(value)  # 30050.0 -> 30050; -0.0 -> 0
    elif type(value) is not int:
        raise InvalidResponse(f"{field!r} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise InvalidResponse(f"{field!r} must not be negative, got {_shown(value)}")
    if value > _MAX_COUNT:
        raise InvalidResponse(f"{field!r} is out of range (above 2**53 - 1): {_shown(value)}")
    return value


def _shown(value: int) -> str:
    """An int for an error message (one too long to print is described)."""
    if -(10**30) < value < 10**30:
        return str(value)
    return f"a {value.bit_length()}-bit {'negative ' if value < 0 else ''}number"


def _timestamp(value: object, field: str) -> datetime | None:
    """A timestamp field in milliseconds (an int or a whole float), or null."""
    if value is None:
        return None
    if type(value) is float:
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidResponse(
                f"{field!r} must be a whole number of milliseconds or null, got {value!r}"
            )
        value = int(value)
    elif type(value) is not int:
        raise InvalidResponse(
            f"{field!r} must be an integer (ms) or null, got {type(value).__name__}"
        )
    if value < 0:
        raise InvalidResponse(f"{field!r} must not be negative, got {_shown(value)}")
    if value > _MAX_MS:
        raise InvalidResponse(f"{field!r} is out of range: {_shown(value)}")
    return _datetime_from_ms(value)


# resetAt and addonExpireAt change once per credit period: the same few values come back on
# every read, so their datetimes are kept (a plain dict is cheaper to ask than lru_cache).
_DATETIMES: dict[int, datetime] = {}


def _datetime_from_ms(value: int) -> datetime:
    """``value`` (an int from 0 to ``_MAX_MS``, checked by the caller) as a UTC datetime."""
    moment = _DATETIMES.get(value)
    if moment is None:
        if len(_DATETIMES) >= 256:
            _DATETIMES.clear()
        moment = _DATETIMES[value] = _EPOCH + timedelta(milliseconds=value)
    return moment


def _ms(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


@dataclasses.dataclass(frozen=True, slots=True)
class CreditBalance:
    """A credit balance as reported by the Lensmor credits service.

    ``total_balance`` is what the account can spend; the buckets say where it comes from:
    subscription credits (``reset_at`` is the earliest active subscription credit
    expiration, UTC, or ``None``), add-on credits (``addon_expire_at``, or ``None``: API
    0.24 and later; 0 and ``None`` from older servers, which do not send them) and gift
    credits, which do not expire. ``*_amount`` is what each bucket was granted.

    ``addon_fields`` records whether the service's answer carried the add-on fields, so
    that :meth:`to_api` gives back the shape it was read from; it takes no part in
    comparisons (a balance without add-on fields equals one whose add-on bucket is empty).
    """

    total_amount: int
    total_balance: int
    subscription_amount: int
    subscription_balance: int
    gift_amount: int
    gift_balance: int
    reset_at: datetime | None = None
    addon_amount: int = 0
    addon_balance: int = 0
    addon_expire_at: datetime | None = None
    addon_fields: bool = dataclasses.field(default=False, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: object) -> CreditBalance:
        """Validate and convert the service's JSON object; raise :class:`InvalidResponse`.

        Both published shapes are accepted: with the add-on fields (API 0.24+) and without
        them (0 and ``None`` then). Counts are whole numbers from 0 to 2**53 - 1 (ints, or
        floats with no fractional part); timestamps are whole milliseconds or null. Fields this
        version does not know are ignored. The buckets are not checked against the total:
        see :meth:`after_spending` for what happens when they disagree.
        """
        if type(data) is not dict and not isinstance(data, Mapping):
            raise InvalidResponse(
                f"balance response must be a JSON object, got {type(data).__name__}"
            )
        try:  # the common, valid case first: six plain non-negative ints and resetAt
            ta, tb, sa, sb, ga, gb, reset = (
                data["totalAmount"],
                data["totalBalance"],
                data["subscriptionAmount"],
                data["subscriptionBalance"],
                data["giftAmount"],
                data["giftBalance"],
                data["resetAt"],
            )
        except KeyError:
            pass
        else:
            if (
                type(ta) is type(tb) is type(sa) is type(sb) is type(ga) is type(gb) is int
                and 0 <= ta <= _MAX_COUNT
                and 0 <= tb <= _MAX_COUNT
                and 0 <= sa <= _MAX_COUNT
                and 0 <= sb <= _MAX_COUNT
                and 0 <= ga <= _MAX_COUNT
                and 0 <= gb <= _MAX_COUNT
                and (reset is None or (type(reset) is int and 0 <= reset <= _MAX_MS))
            ):
                reset_at = (
                    None if reset is None else _DATETIMES.get(reset) or _datetime_from_ms(reset)
                )
                size = len(data)
                if size == 7 or (  # exactly the seven fields: the API 0.22 shape; or that
                    size != 10  # shape with fields this version does not know
                    and "addonAmount" not in data
                    and "addonBalance" not in data
                    and "addonExpireAt" not in data
                ):
                    aa = ab = 0
                    expire_at = None
                    addon_fields = False
                else:  # the API 0.24 shape
                    try:
                        aa, ab, ae = (
                            data["addonAmount"],
                            data["addonBalance"],
                            data["addonExpireAt"],
                        )
                    except KeyError:
                        return cls._from_api_checked(data)
                    if not (
                        type(aa) is type(ab) is int
                        and 0 <= aa <= _MAX_COUNT
                        and 0 <= ab <= _MAX_COUNT
                        and (ae is None or (type(ae) is int and 0 <= ae <= _MAX_MS))
                    ):
                        return cls._from_api_checked(data)
                    expire_at = None if ae is None else _DATETIMES.get(ae) or _datetime_from_ms(ae)
                    addon_fields = True
                if cls is not CreditBalance:  # a subclass may have an __init__ of its own
                    return cls(ta, tb, sa, sb, ga, gb, reset_at, aa, ab, expire_at, addon_fields)
                # The dataclass __init__ of a frozen class goes through object.__setattr__
                # per field; values validated here go through the slot descriptors directly,
                # which costs half as much (every balance read makes one CreditBalance).
                obj = _new(cls)
                s_ta, s_tb, s_sa, s_sb, s_ga, s_gb, s_reset, s_aa, s_ab, s_ae, s_af = _SLOT_SETTERS
                s_ta(obj, ta)
                s_tb(obj, tb)
                s_sa(obj, sa)
                s_sb(obj, sb)
                s_ga(obj, ga)
                s_gb(obj, gb)
                s_reset(obj, reset_at)
                s_aa(obj, aa)
                s_ab(obj, ab)
                s_ae(obj, expire_at)
                s_af(obj, addon_fields)
                return obj
        # Floats, extra fields, or something off: check each field, name the first at fault.
        return cls._from_api_checked(data)

    @classmethod
    def _from_api_checked(cls, data: Mapping[str, Any]) -> CreditBalance:
        ta, tb, sa, sb, ga, gb = (_require_count(data, field) for _, field in _INT_FIELDS)
        if "resetAt" not in data:
            raise InvalidResponse("balance response lacks 'resetAt'")
        reset_at = _timestamp(data["resetAt"], "resetAt")
        addon_fields = any(field in data for field in _ADDON_FIELDS)
        addon_amount = _count(data["addonAmount"], "addonAmount") if "addonAmount" in data else 0
        addon_balance = (
            _count(data["addonBalance"], "addonBalance") if "addonBalance" in data else 0
        )
        addon_expire_at = _timestamp(data.get("addonExpireAt"), "addonExpireAt")
        return cls(
            ta,
            tb,
            sa,
            sb,
            ga,
            gb,
            reset_at,
            addon_amount,
            addon_balance,
            addon_expire_at,
            addon_fields,
        )

    def to_api(self) -> dict[str, int | None]:
        """The documented camelCase JSON shape; ``from_api(x).to_api() == x``.

        The add-on fields are written when the balance was read with them (API 0.24+), or
        when its add-on bucket is not empty; a balance read from an older server's answer
        gives back that answer's seven fields.
        """
        ta, tb, sa, sb, ga, gb = (
            self.total_amount,
            self.total_balance,
            self.subscription_amount,
            self.subscription_balance,
            self.gift_amount,
            self.gift_balance,
        )
        reset = None if self.reset_at is None else _ms(self.reset_at)
        expire_at = self.addon_expire_at
        if not (
            self.addon_fields or self.addon_amount or self.addon_balance or expire_at is not None
        ):
            return {
                "totalAmount": ta,
                "totalBalance": tb,
                "subscriptionAmount": sa,
                "subscriptionBalance": sb,
                "giftAmount": ga,
                "giftBalance": gb,
                "resetAt": reset,
            }
        return {  # in the order of the published schema
            "totalAmount": ta,
            "totalBalance": tb,
            "subscriptionAmount": sa,
            "subscriptionBalance": sb,
            "addonAmount": self.addon_amount,
            "addonBalance": self.addon_balance,
            "addonExpireAt": None if expire_at is None else _ms(expire_at),
            "giftAmount": ga,
            "giftBalance": gb,
            "resetAt": reset,
        }

    def after_spending(self, n: int) -> CreditBalance:
        """The balance after spending ``n`` credits.

        Raises :class:`InsufficientCredits` only when ``n`` exceeds ``total_balance``.
        ``total_balance`` falls by exactly ``n``, taken from the buckets in this order:
        subscription credits, then add-on credits, then gift credits. Lensmor publishes
        only that subscription credits go before gift credits; add-on credits are placed
        between them because they expire and gift credits do not, so the credits that
        would be lost first are spent first. The real service may order them otherwise:
        its next balance read is the truth.

        When the buckets add up to ``total_balance`` (as the service's do), they still do
        afterwards. When they do not (a bucket this version does not know, or an
        inconsistent answer), ``total_balance`` is the authority: spending never refuses
        what it covers, no bucket goes below 0, and the gap between the total and the
        buckets is left as it was, except that credits beyond what the buckets hold come
        out of the total alone.
        """
        if type(n) is not int:
            raise TypeError(f"credits must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"credits must be >= 0, got {n}")
        if n > self.total_balance:
            raise InsufficientCredits(n, self.total_balance, self)
        from_subscription = min(n, self.subscription_balance)
        rest = n - from_subscription
        from_addon = min(rest, self.addon_balance)
        rest -= from_addon
        from_gift = min(rest, self.gift_balance)
        return dataclasses.replace(
            self,
            total_balance=self.total_balance - n,
            subscription_balance=self.subscription_balance - from_subscription,
            addon_balance=self.addon_balance - from_addon,
            gift_balance=self.gift_balance - from_gift,
        )


# The slot descriptors' setters, in field order, for the fast path of ``from_api``.
_SLOT_SETTERS = tuple(
    getattr(CreditBalance, f.name).__set__ for f in dataclasses.fields(CreditBalance)
)
_new = object.__new__


class InsufficientCredits(CreditGuardError):
    """The account cannot pay for the action, so it was not run.

    ``required`` is the call's cost. ``available`` is what the account could pay for at
    that moment: the balance itself when the cost exceeds it (spends in flight can only
    lower it), else the balance minus ``reserved`` (when spends in flight did not settle
    within the admission wait, or the guard was told not to wait). ``reserved`` is the
    credits held by guarded calls still in flight. ``balance`` is the balance the
    decision was made on (``None`` when the refusal comes from
    :meth:`CreditBalance.after_spending`). ``keep`` is the guard's floor (``keep=``:
    credits it never spends) when the floor is what stood in the way, else ``0``;
    ``available`` is then what is left above it.
    """

    def __init__(
        self,
        required: int,
        available: int,
        balance: CreditBalance | None = None,
        *,
        reserved: int = 0,
        keep: int = 0,
    ) -> None:
        self.required = required
        self.available = available
        self.balance = balance
        self.reserved = reserved
        self.keep = keep
        super().__init__(self._message())

    def _message(self) -> str:
        message = f"{self.required} credits required, {self.available} available"
        if self.keep:
            message += f" above the {self.keep} kept back"
        if self.reserved:
            message += f" ({self.reserved} reserved by calls in flight)"
        return message

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_insufficient,
            (self.required, self.available, self.balance, self.reserved, self.keep),
        )


def _rebuild_insufficient(
    required: int, available: int, balance: CreditBalance | None, reserved: int, keep: int = 0
) -> InsufficientCredits:
    return InsufficientCredits(required, available, balance, reserved=reserved, keep=keep)


class AllowanceExceeded(InsufficientCredits):
    """The call's subject (a user, a tenant: see ``Allowance``) has used up its allowance
    for the current window, so the call was not run (the account may still have credits).

    ``subject`` is who asked, ``limit`` the allowance per window, ``spent`` what the
    subject's calls were charged in this window, ``remaining`` what is left of it (calls
    in flight not counted: a refusal holds even if they charge nothing), ``resets_at``
    when the window ends (an aware ``datetime``). ``required``/``available`` are as in
    :class:`InsufficientCredits` (``available`` is ``remaining``)."""

    def __init__(
        self,
        required: int,
        *,
        subject: str,
        limit: int,
        spent: int,
        resets_at: datetime,
        reserved: int = 0,
    ) -> None:
        self.subject = subject
        self.limit = limit
        self.spent = spent
        self.remaining = max(0, limit - spent)
        self.resets_at = resets_at
        super().__init__(required, self.remaining, None, reserved=reserved)

    def _message(self) -> str:
        return (
            f"{self.required} credits required, {self.remaining} left of the subject's"
            f" allowance of {self.limit} (resets at {self.resets_at.isoformat()})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_allowance,
            (self.required, self.subject, self.limit, self.spent, self.resets_at, self.reserved),
        )


def _rebuild_allowance(
    required: int,
    subject: str,
    limit: int,
    spent: int,
    resets_at: datetime,
    reserved: int,
) -> AllowanceExceeded:
    return AllowanceExceeded(
        required, subject=subject, limit=limit, spent=spent, resets_at=resets_at, reserved=reserved
    )


class BudgetExceeded(InsufficientCredits):
    """The call does not fit in the ``guard.budget(limit)`` block it runs in: what the
    block's calls spent (``spent``) plus its cost is over ``limit``; ``remaining`` is
    what is left."""

    def __init__(self, required: int, *, limit: int, spent: int, reserved: int = 0) -> None:
        self.limit = limit
        self.spent = spent
        self.remaining = max(0, limit - spent)
        super().__init__(required, self.remaining, None, reserved=reserved)

    def _message(self) -> str:
        return (
            f"{self.required} credits required, {self.remaining} left of the budget of {self.limit}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_budget, (self.required, self.limit, self.spent, self.reserved))


def _rebuild_budget(required: int, limit: int, spent: int, reserved: int) -> BudgetExceeded:
    return BudgetExceeded(required, limit=limit, spent=spent, reserved=reserved)
