"""The exceptions creditguard raises. Every one derives from :class:`CreditGuardError`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import CreditBalance

__all__ = [
    "ActionNotAllowed",
    "AuthenticationError",
    "BalanceUnavailable",
    "CreditGuardError",
    "InsecureTransportError",
    "InsufficientCredits",
    "InvalidResponse",
    "RateLimited",
]


class CreditGuardError(Exception):
    """Base class of every error raised by creditguard."""


class InsufficientCredits(CreditGuardError):
    """The account cannot pay for the action, so it was not run.

    ``required`` is the call's cost. ``available`` is what the account could pay for at
    that moment: the balance itself when the cost exceeds it (spends in flight can only
    lower it), else the balance minus ``reserved`` (when spends in flight did not settle
    within the admission wait, or the guard was told not to wait). ``reserved`` is the
    credits held by guarded calls still in flight. ``balance`` is the balance the
    decision was made on (``None`` when the refusal comes from
    :meth:`CreditBalance.after_spending`).
    """

    def __init__(
        self,
        required: int,
        available: int,
        balance: CreditBalance | None = None,
        *,
        reserved: int = 0,
    ) -> None:
        self.required = required
        self.available = available
        self.balance = balance
        self.reserved = reserved
        message = f"{required} credits required, {available} available"
        if reserved:
            message += f" ({reserved} reserved by calls in flight)"
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_insufficient,
            (self.required, self.available, self.balance, self.reserved),
        )


def _rebuild_insufficient(
    required: int, available: int, balance: CreditBalance | None, reserved: int
) -> InsufficientCredits:
    return InsufficientCredits(required, available, balance, reserved=reserved)


class AuthenticationError(CreditGuardError):
    """The credits service rejected the API key (401/403). Never retried, never fail-open."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class BalanceUnavailable(CreditGuardError):
    """The balance could not be obtained (network error, 5xx, timeout, bad body...)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class RateLimited(BalanceUnavailable):
    """429 Too Many Requests after the bounded retries.

    ``retry_after`` is the wait in seconds the service asked for, when it said.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, status_code=429)


class InvalidResponse(BalanceUnavailable):
    """The credits service answered with something that is not the documented JSON."""


class InsecureTransportError(CreditGuardError, ValueError):
    """Refused to send the API key in clear text over plain ``http://`` to a remote host."""


class ActionNotAllowed(CreditGuardError):
    """Lensmor's precheck says the action may not run, for a reason other than credits
    (``reason_code``: ``unlock_in_progress``, ``state_conflict``, ``no_contacts_available``,
    ``unsupported_action``, ``invalid_subject``, ``not_found``...). ``detail`` is the
    precheck's own detail. The action was not run and nothing was reserved.
    """

    def __init__(self, reason_code: str, detail: Mapping[str, Any] | None = None) -> None:
        self.reason_code = reason_code
        self.detail: Mapping[str, Any] = dict(detail or {})
        super().__init__(f"Lensmor does not allow this action: {reason_code}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reason_code, self.detail))
