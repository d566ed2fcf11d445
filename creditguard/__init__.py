"""creditguard: stop paid Lensmor API calls the account cannot pay for.

Check ``totalBalance`` through a short-TTL cache before a paid action, run it, then refresh
so the balance reported after spending is accurate. Sync and async (asyncio and trio).
"""

from ._client import RetryPolicy, parse_retry_after
from ._errors import (
    AuthenticationError,
    BalanceUnavailable,
    CreditGuardError,
    InsecureTransportError,
    InsufficientCredits,
    InvalidResponse,
    RateLimited,
)
from ._guard import DEFAULT_BASE_URL, CreditGuard, GuardEvent, Spend, requires_credits
from ._models import CreditBalance
from ._state import MemoryBackend, StateBackend

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_URL",
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
    "RateLimited",
    "RetryPolicy",
    "Spend",
    "StateBackend",
    "__version__",
    "parse_retry_after",
    "requires_credits",
]
