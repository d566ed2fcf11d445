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
        AuthenticationError,
        BalanceUnavailable,
        CreditGuardError,
        InsecureTransportError,
        InsufficientCredits,
        InvalidResponse,
        RateLimited,
    )
    from ._guard import (
        DEFAULT_BASE_URL,
        CreditGuard,
        GuardEvent,
        Precheck,
        Spend,
        current_spend,
        default_guard,
        requires_credits,
    )
    from ._models import CreditBalance, PrecheckResult
    from ._retry import RetryPolicy, parse_retry_after
    from ._state import MemoryBackend, StateBackend

__version__ = "0.1.0"
"""The version of the package."""

_EXPORTS = {
    "DEFAULT_BASE_URL": "._guard",
    "ActionNotAllowed": "._errors",
    "Precheck": "._guard",
    "PrecheckResult": "._models",
    "AuthenticationError": "._errors",
    "BalanceUnavailable": "._errors",
    "CreditBalance": "._models",
    "CreditGuard": "._guard",
    "CreditGuardError": "._errors",
    "GuardEvent": "._guard",
    "InsecureTransportError": "._errors",
    "InsufficientCredits": "._errors",
    "InvalidResponse": "._errors",
    "MemoryBackend": "._state",
    "RateLimited": "._errors",
    "RetryPolicy": "._retry",
    "Spend": "._guard",
    "StateBackend": "._state",
    "current_spend": "._guard",
    "default_guard": "._guard",
    "parse_retry_after": "._retry",
    "requires_credits": "._guard",
}

__all__ = [
    "DEFAULT_BASE_URL",
    "ActionNotAllowed",
    "AuthenticationError",
    "BalanceUnavailable",
    "CreditBalance",
    "CreditGuard",
    "CreditGuardError",
    "GuardEvent",
    "InsecureTransportError",
    "InsufficientCredits",
    "InvalidResponse",
    "MemoryBackend",
    "Precheck",
    "PrecheckResult",
    "RateLimited",
    "RetryPolicy",
    "Spend",
    "StateBackend",
    "__version__",
    "current_spend",
    "default_guard",
    "parse_retry_after",
    "requires_credits",
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
