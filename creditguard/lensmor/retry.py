"""How one balance read retries: the policy, the waits a 429 asks for (``Retry-After``,
``X-RateLimit-Reset``) and the bookkeeping of a read's attempts and time budget (no I/O,
no waiting: the clients in ``_client.py`` do both)."""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

from creditguard.core.errors import BalanceUnavailable, RateLimited

__all__ = ["RetryPolicy", "parse_retry_after", "rate_limit_wait"]

_MAX_RETRY_AFTER = 1e9  # seconds; anything larger is "much too long" all the same
_monotonic = time.monotonic


@dataclass(frozen=True)
class RetryPolicy:
    """How one balance read retries.

    ``attempts`` bounds the number of requests, ``deadline`` the total seconds spent on
    one read: every retry's timeouts are capped by what is left of it, and a body still
    arriving past it is abandoned, so one read takes at most about ``deadline`` plus one
    read timeout (a stalled body is cut by the read timeout). 5xx answers and
    connection errors back off exponentially with full jitter, starting at ``backoff``
    and capped at ``backoff_max``; a 429 waits what its ``Retry-After`` asks, or fails at
    once with :class:`RateLimited` when that is longer than what is left of the deadline.
    401/403 and malformed bodies are never retried.
    """

    attempts: int = 3
    deadline: float = 5.0
    backoff: float = 0.1
    backoff_max: float = 1.0

    def __post_init__(self) -> None:
        if type(self.attempts) is not int or self.attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("deadline", "backoff", "backoff_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


_MAX_LIMIT_WAIT = 3600.0  # seconds; a rate-limit reset further away is not believed


def rate_limit_wait(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds until the rate limit resets when an answer says none is left.

    ``X-RateLimit-Remaining: 0`` with ``X-RateLimit-Reset`` (Unix seconds) gives the
    seconds until then (at least 0, at most an hour); anything else (requests left, no
    or unparseable headers) gives ``None``. Never raises.
    """
    remaining = headers.get("x-ratelimit-remaining")
    if remaining is None or remaining.strip() != "0":
        return None
    reset = headers.get("x-ratelimit-reset", "").strip()
    if not reset.isascii() or not reset.isdigit() or len(reset) > 12:
        return None
    wait = int(reset) - (time.time() if now is None else now)
    return min(max(0.0, wait), _MAX_LIMIT_WAIT)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    Returns ``None`` when the header is absent or unparseable; never raises for any input.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return min(float(text), _MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = now or datetime.now(timezone.utc)
    if current.tzinfo is None:
        current = current.replace(tzinfo=timezone.utc)
    try:
        seconds = (when - current).total_seconds()
    except OverflowError:  # pragma: no cover - defensive
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER)


class _Retry(Exception):
    """Internal: this attempt failed in a way that may succeed if tried again."""

    def __init__(
        self,
        error: BalanceUnavailable,
        retry_after: float | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.cause = cause


class _Attempts:
    """Bookkeeping of a read's retries and time budget (no I/O, no waiting), made when
    its first attempt fails: a read that succeeds at once allocates none."""

    __slots__ = ("_policy", "deadline", "made")

    def __init__(self, policy: RetryPolicy, deadline: float) -> None:
        self._policy = policy
        self.deadline = deadline
        self.made = 1

    def remaining(self) -> float:
        return self.deadline - _monotonic()

    def delay(self, retry: _Retry) -> float:
        """Seconds to wait before the next attempt, or raise the final error."""
        left = self.remaining()
        if retry.retry_after is not None:
            if retry.retry_after > left or self.made >= self._policy.attempts:
                raise RateLimited(
                    f"{retry.error}; retry after {retry.retry_after:g}s",
                    retry_after=retry.retry_after,
                ) from retry.cause
            return retry.retry_after
        if self.made >= self._policy.attempts or left <= 0:
            raise retry.error from retry.cause
        exp = min(self._policy.backoff_max, self._policy.backoff * (2 ** (self.made - 1)))
        wait = random.uniform(0, exp)
        if wait >= left:
            raise retry.error from retry.cause
        return wait


def _cap(value: float | None, left: float) -> float:
    return left if value is None else min(value, left)
