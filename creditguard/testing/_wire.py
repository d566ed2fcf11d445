"""What the sandbox's modules share: an answer to send, Lensmor's error body, a request that
is not what an endpoint takes, the account's credits (its buckets, how they are spent and
how they are written) and the rate limit."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

BalanceShape = Literal["0.22", "0.24"]
BALANCE_SHAPES: tuple[str, ...] = ("0.22", "0.24")


@dataclass
class _Answer:
    """What one request gets: a status, headers and a body, or a fault to act out."""

    status: int
    body: bytes
    headers: dict[str, str]
    fault: str | None = None


def _json(status: int, data: object, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(
        status, json.dumps(data).encode(), {"content-type": "application/json", **(headers or {})}
    )


def api_error(
    status: int,
    error_key: str,
    message: str,
    trace_id: str,
    *,
    details: object = None,
    headers: dict[str, str] | None = None,
) -> _Answer:
    """Lensmor's ``ApiError`` body (``code``, ``message``, ``errorKey``, ``traceId``, and
    ``details`` when there are any), with the trace id also as ``X-Request-ID``."""
    body: dict[str, Any] = {
        "code": status,
        "message": message,
        "errorKey": error_key,
        "traceId": trace_id,
    }
    if details is not None:
        body["details"] = details
    return _json(status, body, {**(headers or {}), "x-request-id": trace_id})


Check = tuple[str, int, dict[str, Any]]
"""A precheck's ``reason_code``, ``credits`` and ``detail`` for one action."""

Checker = Callable[[dict[str, Any]], Check]


class _BadRequest(Exception):
    """The request is not what the endpoint takes: ``400 INVALID_REQUEST``."""


def _string(data: dict[str, Any], name: str, most: int, *, required: bool = True) -> str | None:
    """``data[name]``, a string of 1 to ``most`` characters (``None`` when absent and not
    ``required``); raise :class:`_BadRequest` otherwise."""
    value = data.get(name)
    if value is None and name not in data and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= most:
        raise _BadRequest(f"{name} must be a string of 1 to {most} characters")
    return value


def _number(value: int, floats: bool) -> int | float:
    return float(value) if floats else value


@dataclass
class Credits:
    """The account's buckets, in credits (and times in milliseconds since the epoch).

    Spending takes subscription credits first, then add-on credits (they expire), then gift
    credits (they do not): Lensmor publishes the first and the last of that order only.
    """

    subscription_amount: int
    subscription: int
    addon_amount: int
    addon: int
    addon_expire_ms: int | None
    gift_amount: int
    gift: int
    reset_ms: int | None

    @property
    def total(self) -> int:
        return self.subscription + self.addon + self.gift

    @property
    def total_amount(self) -> int:
        return self.subscription_amount + self.addon_amount + self.gift_amount

    def spend(self, n: int) -> None:
        """Take ``n`` credits, which the caller checked the account has (``n <= total``)."""
        from_subscription = min(n, self.subscription)
        from_addon = min(n - from_subscription, self.addon)
        self.subscription -= from_subscription
        self.addon -= from_addon
        self.gift -= n - from_subscription - from_addon

    def body(self, shape: BalanceShape, floats: bool) -> dict[str, Any]:
        """The balance JSON of ``GET /external/credits/balance``: the 0.22 shape (no add-on
        keys) or the 0.24+ one, numbers as JSON integers or as floats (``30050.0``)."""
        out: dict[str, Any] = {
            "totalAmount": _number(self.total_amount, floats),
            "totalBalance": _number(self.total, floats),
            "subscriptionAmount": _number(self.subscription_amount, floats),
            "subscriptionBalance": _number(self.subscription, floats),
        }
        if shape != "0.22":
            out["addonAmount"] = _number(self.addon_amount, floats)
            out["addonBalance"] = _number(self.addon, floats)
            expire = self.addon_expire_ms
            out["addonExpireAt"] = None if expire is None else _number(expire, floats)
        out["giftAmount"] = _number(self.gift_amount, floats)
        out["giftBalance"] = _number(self.gift, floats)
        out["resetAt"] = None if self.reset_ms is None else _number(self.reset_ms, floats)
        return out

    def balance_after(self, shape: BalanceShape, floats: bool) -> dict[str, Any]:
        """``balanceAfter`` of an event or full-access unlock: ``subscriptionBalance``,
        ``permanentBalance`` (the gift credits, which never expire), ``totalBalance``,
        ``unlimited`` (always false), and ``addonBalance`` beside them in the 0.24+ shape
        (extra properties are allowed)."""
        out: dict[str, Any] = {
            "subscriptionBalance": _number(self.subscription, floats),
            "permanentBalance": _number(self.gift, floats),
            "totalBalance": _number(self.total, floats),
            "unlimited": False,
        }
        if shape != "0.22":
            out["addonBalance"] = _number(self.addon, floats)
        return out


class RateLimit:
    """A fixed window of ``limit`` requests per ``window`` seconds for the key; ``None``:
    unlimited, and no ``X-RateLimit-*`` headers."""

    def __init__(self, limit: int | None, window: float) -> None:
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ValueError(f"rate_limit must be an int >= 1 or None, got {limit!r}")
        if not isinstance(window, (int, float)) or not 0 < window <= 86400:
            raise ValueError(f"rate_limit_window must be between 0 and 86400, got {window!r}")
        self.limit = limit
        self.window = float(window)
        self._lock = threading.Lock()
        self._started = 0.0
        self._used = 0

    def take(self) -> tuple[bool, dict[str, str]]:
        """Count one request: whether it may be served, and the headers to send."""
        if self.limit is None:
            return True, {}
        now = time.time()
        with self._lock:
            if self._used == 0 or now >= self._started + self.window:
                self._started, self._used = now, 0
            allowed = self._used < self.limit
            if allowed:
                self._used += 1
            reset = self._started + self.window
            remaining = self.limit - self._used
        headers = {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": str(math.ceil(reset)),
        }
        if not allowed:
            headers["retry-after"] = str(max(1, math.ceil(reset - now)))
        return allowed, headers

    def reset(self) -> None:
        with self._lock:
            self._used = 0
