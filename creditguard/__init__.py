"""creditguard: stop paid Lensmor API calls the account cannot pay for.

Check ``totalBalance`` through a short-TTL cache before a paid action, run it, then refresh
so the balance reported after spending is accurate. Sync and async (asyncio and trio).

Public names load on first use, so ``import creditguard`` (and the pytest plugin it ships)
costs next to nothing until the guard is actually used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import (
        ActionNotAllowed,
        AdmissionTimeout,
        AuthenticationError,
        BalanceUnavailable,
        CreditGuardError,
        GateTimeout,
        InsecureTransportError,
        InsufficientCredits,
        InvalidResponse,
        RateLimited,
        TaskPending,
        UnknownHold,
    )
    from ._guard import (
        DEFAULT_BASE_URL,
        CreditGuard,
        GuardEvent,
        Hold,
        Precheck,
        Spend,
        current_spend,
        default_guard,
        requires_credits,
    )
    from ._models import AccountSnapshot, CreditBalance, OpenHold, PrecheckResult
    from ._retry import RetryPolicy, parse_retry_after
    from ._state import MemoryBackend, StateBackend
    from ._tasks import (
        POLL_BACKOFF,
        ContactUnlock,
        apoll_unlock_task,
        asubmit_contact_unlock,
        aunlock_contacts,
        poll_unlock_task,
        submit_contact_unlock,
        unlock_contacts,
    )

__version__ = "0.1.0"
"""The version of the package."""

_EXPORTS = {
    "DEFAULT_BASE_URL": "._guard",
    "ActionNotAllowed": "._errors",
    "ContactUnlock": "._tasks",
    "POLL_BACKOFF": "._tasks",
    "TaskPending": "._errors",
    "apoll_unlock_task": "._tasks",
    "asubmit_contact_unlock": "._tasks",
    "aunlock_contacts": "._tasks",
    "poll_unlock_task": "._tasks",
    "submit_contact_unlock": "._tasks",
    "unlock_contacts": "._tasks",
    "Precheck": "._guard",
    "PrecheckResult": "._models",
    "AccountSnapshot": "._models",
    "AdmissionTimeout": "._errors",
    "AuthenticationError": "._errors",
    "BalanceUnavailable": "._errors",
    "CreditBalance": "._models",
    "CreditGuard": "._guard",
    "CreditGuardError": "._errors",
    "GateTimeout": "._errors",
    "GuardEvent": "._guard",
    "Hold": "._guard",
    "InsecureTransportError": "._errors",
    "InsufficientCredits": "._errors",
    "InvalidResponse": "._errors",
    "MemoryBackend": "._state",
    "OpenHold": "._models",
    "RateLimited": "._errors",
    "RetryPolicy": "._retry",
    "Spend": "._guard",
    "StateBackend": "._state",
    "UnknownHold": "._errors",
    "current_spend": "._guard",
    "default_guard": "._guard",
    "parse_retry_after": "._retry",
    "requires_credits": "._guard",
}

__all__ = [
    "DEFAULT_BASE_URL",
    "POLL_BACKOFF",
    "AccountSnapshot",
    "ActionNotAllowed",
    "AdmissionTimeout",
    "AuthenticationError",
    "BalanceUnavailable",
    "ContactUnlock",
    "CreditBalance",
    "CreditGuard",
    "CreditGuardError",
    "GateTimeout",
    "GuardEvent",
    "Hold",
    "InsecureTransportError",
    "InsufficientCredits",
    "InvalidResponse",
    "MemoryBackend",
    "OpenHold",
    "Precheck",
    "PrecheckResult",
    "RateLimited",
    "RetryPolicy",
    "Spend",
    "StateBackend",
    "TaskPending",
    "UnknownHold",
    "__version__",
    "apoll_unlock_task",
    "asubmit_contact_unlock",
    "aunlock_contacts",
    "current_spend",
    "default_guard",
    "parse_retry_after",
    "poll_unlock_task",
    "requires_credits",
    "submit_contact_unlock",
    "unlock_contacts",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'creditguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
