"""The exceptions creditguard raises. Every one derives from :class:`CreditGuardError`.

:class:`InsufficientCredits`, which carries the balance it was decided on, is defined beside
that balance, in ``balance.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ActionNotAllowed",
    "AdmissionTimeout",
    "AuthenticationError",
    "BalanceUnavailable",
    "CreditGuardError",
    "GateTimeout",
    "InsecureTransportError",
    "InvalidResponse",
    "RateLimited",
    "TaskPending",
    "UnknownHold",
]


class CreditGuardError(Exception):
    """Base class of every error raised by creditguard."""


class AdmissionTimeout(CreditGuardError, TimeoutError):
    """The account could pay for the call if the guarded calls in flight charged nothing,
    but not if they charged what they reserved, and they did not settle within
    ``admission_timeout``: the call was not run and nothing was reserved. It is not a
    refusal for credits (that is :class:`InsufficientCredits`): retry later.

    ``required`` is the call's cost, ``available`` what the account could pay at that
    moment beside the calls in flight (balance minus ``reserved``), ``reserved`` the
    credits those calls hold, ``retry_after`` a suggested wait in seconds.
    """

    def __init__(
        self,
        required: int,
        available: int,
        *,
        reserved: int = 0,
        retry_after: float = 1.0,
    ) -> None:
        self.required = required
        self.available = available
        self.reserved = reserved
        self.retry_after = retry_after
        super().__init__(
            f"{required} credits required: {available} free beside {reserved} reserved by"
            " calls in flight, which did not settle in time; retry later"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_admission_timeout,
            (self.required, self.available, self.reserved, self.retry_after),
        )


def _rebuild_admission_timeout(
    required: int, available: int, reserved: int, retry_after: float
) -> AdmissionTimeout:
    return AdmissionTimeout(required, available, reserved=reserved, retry_after=retry_after)


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
    """The credits service answered with something that is not the documented JSON.

    Raised by the contact unlock helpers for a submission or task answer of the wrong
    shape, ``task_id`` and ``hold_id`` name the task and the hold it was about (``None``
    when unknown, and always ``None`` elsewhere). The hold is left open: poll the task
    again, or settle or release the hold by id (``guard.hold_by_id(hold_id)``).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        task_id: str | None = None,
        hold_id: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.hold_id = hold_id
        super().__init__(message, status_code=status_code)


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


class GateTimeout(CreditGuardError, TimeoutError):
    """The call waited ``waited`` seconds for its turn at the account's gate
    (``max_concurrent`` guarded actions in flight at once) without getting one, so it was
    not run. Nothing was reserved and it left no place in the queue."""

    def __init__(self, max_concurrent: int, waited: float) -> None:
        self.max_concurrent = max_concurrent
        self.waited = waited
        super().__init__(
            f"waited {waited:.1f}s for a turn: {max_concurrent} guarded action(s) of this"
            " account already in flight"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.max_concurrent, self.waited))


class UnknownHold(CreditGuardError, LookupError):
    """No hold ``hold_id`` is open on this account: it was never taken here (or on another
    account), it was settled or released already, or it expired (its credits are back
    and the cached balance was distrusted)."""

    def __init__(self, hold_id: str) -> None:
        self.hold_id = hold_id
        super().__init__(f"no open hold {hold_id!r} on this account (settled, released or expired)")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.hold_id,))


class TaskPending(CreditGuardError, TimeoutError):
    """A Lensmor task (``task_id``) had not ended after ``waited`` seconds of polling. Its
    hold (``hold_id``, if any) is still open: poll again, or let it expire."""

    def __init__(self, task_id: str, hold_id: str | None, waited: float) -> None:
        self.task_id = task_id
        self.hold_id = hold_id
        self.waited = waited
        super().__init__(f"task {task_id} had not ended after {waited:.0f}s of polling")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.task_id, self.hold_id, self.waited))
