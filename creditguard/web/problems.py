"""The HTTP answers of every web adapter for the guard's errors: status, headers and an
RFC 9457 problem-details JSON body (``problem_for``), and the 400 for a path that cannot
be priced."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any

from creditguard.core.balance import AllowanceExceeded, BudgetExceeded, InsufficientCredits
from creditguard.core.errors import (
    AdmissionTimeout,
    AuthenticationError,
    BalanceUnavailable,
    CreditGuardError,
    GateTimeout,
    RateLimited,
)

__all__ = ["BAD_PATH", "PROBLEM_CONTENT_TYPE", "Problem", "problem_for"]

logger = logging.getLogger("creditguard.web")

PROBLEM_CONTENT_TYPE = "application/problem+json"


# -- error answers ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """The HTTP answer for a guard error: status, extra headers and the JSON body."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    def content(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()

    def header_list(self) -> list[tuple[str, str]]:
        """``content-type`` and the extra headers (``content-length`` not included)."""
        return [("content-type", PROBLEM_CONTENT_TYPE), *self.headers]


BAD_PATH = Problem(
    400,
    {
        "type": "about:blank",
        "title": "Bad Request",
        "status": 400,
        "detail": "the request path holds control characters",
        "error": "bad_path",
    },
)
"""The answer of a middleware pricing by path to a path it cannot decide
(:func:`undecidable`)."""


def _seconds(seconds: float | None) -> tuple[tuple[str, str], ...]:
    """A ``Retry-After`` header of ``seconds`` (rounded up), none when unknown."""
    if seconds is not None and math.isfinite(seconds) and seconds >= 0:
        return (("retry-after", str(math.ceil(seconds))),)
    return ()


def _store_down(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the credit state store (Redis) being unreachable."""
    cause = exc.__cause__
    while cause is not None:
        if type(cause).__module__.split(".")[0] == "redis":
            return True
        cause = cause.__cause__
    return False


def _payment_required(exc: InsufficientCredits) -> Problem:
    """The 402 of a refusal: of the account (``insufficient_credits``; a floor set with
    ``keep`` is not told), of a subject's allowance (``allowance_exceeded``, with when it
    resets and ``Retry-After``; never the subject) or of a budget (``budget_exceeded``)."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": "Payment Required",
        "status": 402,
        "required": exc.required,
        "available": exc.available,
        "reserved": exc.reserved,
    }
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, AllowanceExceeded):
        resets_at = exc.resets_at.isoformat()
        left = f"{exc.remaining} are left of this allowance until {resets_at}"
        body.update(error="allowance_exceeded", remaining=exc.remaining, resets_at=resets_at)
        headers = _seconds(max(0.0, exc.resets_at.timestamp() - time.time()))
    elif isinstance(exc, BudgetExceeded):
        left = f"{exc.remaining} are left of its budget"
        body.update(error="budget_exceeded", remaining=exc.remaining)
    else:
        left = f"{exc.available} are available"
        body["error"] = "insufficient_credits"
    body["detail"] = f"this request needs {exc.required} Lensmor credits; {left}"
    return Problem(402, body, headers)


def problem_for(exc: BaseException) -> Problem | None:
    """The answer for ``exc``, or ``None`` when it is not a guard error (re-raise it).

    * :class:`AllowanceExceeded`: 402 ``allowance_exceeded`` with ``required``,
      ``remaining`` and ``resets_at`` (ISO 8601), and ``Retry-After`` (seconds until it
      resets); never the subject's id;
    * :class:`BudgetExceeded`: 402 ``budget_exceeded`` with ``required`` and ``remaining``;
    * :class:`InsufficientCredits`: 402 ``insufficient_credits`` with ``required``,
      ``available`` and ``reserved`` (credits held by calls in flight; a floor set with
      ``keep`` is not told);
    * :class:`AdmissionTimeout` (calls in flight stand in the way and did not settle in
      time) and :class:`GateTimeout` (no turn at the account's gate in time): 503
      ``credits_busy`` with ``Retry-After``;
    * :class:`BalanceUnavailable` (the Lensmor balance cannot be read: rate limited,
      invalid response, unreachable; or the credit state store, Redis, is unreachable):
      503 ``balance_unavailable``, with ``Retry-After`` when the service said how long;
    * any other :class:`CreditGuardError` (a rejected key, no key, an insecure base URL):
      500 ``credits_misconfigured``; the details go to the log, never to the client.

    Bodies are RFC 9457 problem details (``type``, ``title``, ``status``, ``detail``) plus
    the ``error`` code and the figures above, sent as ``application/problem+json``.
    """
    if isinstance(exc, InsufficientCredits):
        return _payment_required(exc)
    if isinstance(exc, AdmissionTimeout | GateTimeout):
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "error": "credits_busy",
        }
        if isinstance(exc, AdmissionTimeout):
            body["detail"] = (
                f"this request needs {exc.required} Lensmor credits; {exc.available} are"
                f" free beside {exc.reserved} held by requests in flight: retry later"
            )
            body.update(required=exc.required, available=exc.available, reserved=exc.reserved)
            wait: float = exc.retry_after
        else:
            body["detail"] = "too many paid requests of this account in flight: retry later"
            wait = 1.0
        logger.info("Lensmor credits busy: %s", exc)
        return Problem(503, body, _seconds(wait) or (("retry-after", "1"),))
    if isinstance(exc, BalanceUnavailable):
        store = _store_down(exc)
        logger.warning(
            "%s: %s",
            "credit state store unavailable" if store else "Lensmor credits balance unavailable",
            exc,
        )
        return Problem(
            503,
            {
                "type": "about:blank",
                "title": "Service Unavailable",
                "status": 503,
                "detail": (
                    "the credit state store is unavailable right now"
                    if store
                    else "the Lensmor credits balance cannot be checked right now"
                ),
                "error": "balance_unavailable",
            },
            _seconds(exc.retry_after) if isinstance(exc, RateLimited) else (),
        )
    if isinstance(exc, CreditGuardError):
        what = (
            "the credits service rejected the API key"
            if isinstance(exc, AuthenticationError)
            else type(exc).__name__
        )
        logger.error("Lensmor credits misconfigured (%s): %s", what, exc)
        return Problem(
            500,
            {
                "type": "about:blank",
                "title": "Internal Server Error",
                "status": 500,
                "detail": "the server's Lensmor credits configuration is not working",
                "error": "credits_misconfigured",
            },
        )
    return None
