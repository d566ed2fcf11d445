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
    from creditguard.backends.memory.backend import MemoryBackend
    from creditguard.core.balance import AllowanceExceeded, BudgetExceeded, InsufficientCredits
    from creditguard.core.errors import (
        ActionNotAllowed,
        AdmissionTimeout,
        AuthenticationError,
        BalanceUnavailable,
        CreditGuardError,
        GateTimeout,
        InsecureTransportError,
        InvalidResponse,
        RateLimited,
        TaskPending,
        UnknownHold,
    )
    from creditguard.core.models import AccountSnapshot, CreditBalance, OpenHold, PrecheckResult
    from creditguard.core.policy import Allowance, LowBalance, Usage
    from creditguard.core.roles import StateBackend
    from creditguard.core.spending import Budget
    from creditguard.guard.guard import (
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
    from creditguard.lensmor.retry import RetryPolicy, parse_retry_after
    from creditguard.lensmor.tasks import (
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
    "DEFAULT_BASE_URL": "creditguard.guard.guard",
    "ActionNotAllowed": "creditguard.core.errors",
    "ContactUnlock": "creditguard.lensmor.tasks",
    "POLL_BACKOFF": "creditguard.lensmor.tasks",
    "TaskPending": "creditguard.core.errors",
    "apoll_unlock_task": "creditguard.lensmor.tasks",
    "asubmit_contact_unlock": "creditguard.lensmor.tasks",
    "aunlock_contacts": "creditguard.lensmor.tasks",
    "poll_unlock_task": "creditguard.lensmor.tasks",
    "submit_contact_unlock": "creditguard.lensmor.tasks",
    "unlock_contacts": "creditguard.lensmor.tasks",
    "Precheck": "creditguard.lensmor.precheck",
    "PrecheckResult": "creditguard.core.models",
    "AccountSnapshot": "creditguard.core.models",
    "AdmissionTimeout": "creditguard.core.errors",
    "AuthenticationError": "creditguard.core.errors",
    "BalanceUnavailable": "creditguard.core.errors",
    "CreditBalance": "creditguard.core.models",
    "CreditGuard": "creditguard.guard.guard",
    "CreditGuardError": "creditguard.core.errors",
    "GateTimeout": "creditguard.core.errors",
    "GuardEvent": "creditguard.core.events",
    "Hold": "creditguard.guard.hold",
    "InsecureTransportError": "creditguard.core.errors",
    "InsufficientCredits": "creditguard.core.balance",
    "AllowanceExceeded": "creditguard.core.balance",
    "BudgetExceeded": "creditguard.core.balance",
    "Allowance": "creditguard.core.policy",
    "LowBalance": "creditguard.core.policy",
    "Usage": "creditguard.core.policy",
    "Budget": "creditguard.core.spending",
    "InvalidResponse": "creditguard.core.errors",
    "MemoryBackend": "creditguard.backends.memory.backend",
    "OpenHold": "creditguard.core.models",
    "RateLimited": "creditguard.core.errors",
    "RetryPolicy": "creditguard.lensmor.retry",
    "Spend": "creditguard.guard.spend",
    "StateBackend": "creditguard.core.roles",
    "UnknownHold": "creditguard.core.errors",
    "current_spend": "creditguard.guard.spend",
    "default_guard": "creditguard.guard.guard",
    "parse_retry_after": "creditguard.lensmor.retry",
    "requires_credits": "creditguard.guard.guard",
}

__all__ = [
    "DEFAULT_BASE_URL",
    "POLL_BACKOFF",
    "AccountSnapshot",
    "ActionNotAllowed",
    "AdmissionTimeout",
    "Allowance",
    "AllowanceExceeded",
    "AuthenticationError",
    "BalanceUnavailable",
    "Budget",
    "BudgetExceeded",
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
    "LowBalance",
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
    "Usage",
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
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
