"""The balance model: the documented JSON shape of ``GET /external/credits/balance``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from ._errors import InsufficientCredits, InvalidResponse

__all__ = ["CreditBalance"]

# (python attribute, documented camelCase field)
_INT_FIELDS = (
    ("total_amount", "totalAmount"),
    ("total_balance", "totalBalance"),
    ("subscription_amount", "subscriptionAmount"),
    ("subscription_balance", "subscriptionBalance"),
    ("gift_amount", "giftAmount"),
    ("gift_balance", "giftBalance"),
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _require_int(data: Mapping[str, Any], field: str) -> int:
    if field not in data:
        raise InvalidResponse(f"balance response lacks {field!r}")
    value = data[field]
    # bool is an int subclass: reject it explicitly, as well as floats, strings and null.
    if type(value) is not int:
        raise InvalidResponse(f"{field!r} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise InvalidResponse(f"{field!r} must not be negative, got {value}")
    return value


def _reset_at_from_ms(value: object) -> datetime | None:
    if value is None:
        return None
    if type(value) is not int:
        raise InvalidResponse(
            f"'resetAt' must be an integer (ms) or null, got {type(value).__name__}"
        )
    return _datetime_from_ms(value)


@functools.lru_cache(maxsize=256)
def _datetime_from_ms(value: int) -> datetime:
    """resetAt changes once per credit period: the same few values come back on every read."""
    if value < 0:
        raise InvalidResponse(f"'resetAt' must not be negative, got {value}")
    try:
        return _EPOCH + timedelta(milliseconds=value)
    except OverflowError as exc:
        raise InvalidResponse(f"'resetAt' is out of range: {value}") from exc


def _reset_at_to_ms(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


@dataclasses.dataclass(frozen=True, slots=True)
class CreditBalance:
    """A credit balance as reported by the Lensmor credits service.

    Subscription credits are consumed before gift credits. ``reset_at`` is the earliest
    active subscription credit expiration (UTC), or ``None``.
    """

    total_amount: int
    total_balance: int
    subscription_amount: int
    subscription_balance: int
    gift_amount: int
    gift_balance: int
    reset_at: datetime | None = None

    @classmethod
    def from_api(cls, data: object) -> CreditBalance:
        """Validate and convert the service's JSON object; raise :class:`InvalidResponse`."""
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
                and min(ta, tb, sa, sb, ga, gb) >= 0
            ):
                return _build(cls, ta, tb, sa, sb, ga, gb, _reset_at_from_ms(reset))
        # Something is off: find the first field at fault and say which.
        ints = {attr: _require_int(data, field) for attr, field in _INT_FIELDS}
        if "resetAt" not in data:
            raise InvalidResponse("balance response lacks 'resetAt'")
        return cls(**ints, reset_at=_reset_at_from_ms(data["resetAt"]))

    def to_api(self) -> dict[str, int | None]:
        """The documented camelCase JSON shape; ``from_api(x).to_api() == x``."""
        out: dict[str, int | None] = {field: getattr(self, attr) for attr, field in _INT_FIELDS}
        out["resetAt"] = None if self.reset_at is None else _reset_at_to_ms(self.reset_at)
        return out

    def after_spending(self, n: int) -> CreditBalance:
        """The balance after spending ``n`` credits: subscription first, then gift."""
        if type(n) is not int:
            raise TypeError(f"credits must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"credits must be >= 0, got {n}")
        if n > self.total_balance:
            raise InsufficientCredits(n, self.total_balance, self)
        from_subscription = min(n, self.subscription_balance)
        from_gift = n - from_subscription
        if from_gift > self.gift_balance:
            # total_balance disagrees with the buckets; trust the buckets.
            raise InsufficientCredits(n, self.subscription_balance + self.gift_balance, self)
        return dataclasses.replace(
            self,
            total_balance=self.total_balance - n,
            subscription_balance=self.subscription_balance - from_subscription,
            gift_balance=self.gift_balance - from_gift,
        )


# Every balance read makes one CreditBalance; the dataclass ``__init__`` of a frozen class
# goes through ``object.__setattr__`` per field. Values validated by ``from_api`` are set
# through the slot descriptors directly, which costs half as much.
_SLOT_SETTERS = tuple(
    getattr(CreditBalance, f.name).__set__ for f in dataclasses.fields(CreditBalance)
)
_new = object.__new__


def _build(
    cls: type[CreditBalance],
    ta: int,
    tb: int,
    sa: int,
    sb: int,
    ga: int,
    gb: int,
    reset_at: datetime | None,
) -> CreditBalance:
    if cls is not CreditBalance:  # a subclass may have an __init__ of its own
        return cls(ta, tb, sa, sb, ga, gb, reset_at)
    obj = _new(cls)
    s_ta, s_tb, s_sa, s_sb, s_ga, s_gb, s_reset = _SLOT_SETTERS
    s_ta(obj, ta)
    s_tb(obj, tb)
    s_sa(obj, sa)
    s_sb(obj, sb)
    s_ga(obj, ga)
    s_gb(obj, gb)
    s_reset(obj, reset_at)
    return obj
