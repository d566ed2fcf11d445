"""Checks of the guard's configuration: the key, seconds and costs; and the account's
fingerprint (a hash of base URL and key, never the key).

Each raises a clear error before any request. (The base URL and the HTTP timeout are
checked by ``creditguard.lensmor.checks``.)
"""

from __future__ import annotations

import hashlib
import math
import os

from creditguard.core.errors import CreditGuardError

__all__ = [
    "_check_cost",
    "_check_key",
    "_check_seconds",
    "_fingerprint",
]


def _check_cost(cost: object) -> int:
    if type(cost) is not int:
        raise TypeError(f"a credit cost must be an int, got {type(cost).__name__}")
    if cost < 0:
        raise ValueError(f"a credit cost must be >= 0, got {cost}")
    return cost


def _fingerprint(base_url: str, api_key: str) -> str:
    digest = hashlib.sha256(f"{base_url}\n{api_key}".encode()).hexdigest()
    return f"acct_{digest[:20]}"


# The longest duration (seconds) any setting or call takes: about 31.7 years. Durations
# reach Redis scripts as milliseconds, which Lua keeps exact (and prints with %d) only
# well below 2**53; a duration beyond this bound is a mistake, refused at the edge.
MAX_SECONDS = 1_000_000_000.0


def _check_seconds(name: str, value: object, *, positive: bool = False) -> float:
    """A finite number of seconds (>= 0, or > 0 with ``positive``; at most
    ``MAX_SECONDS``), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:.0f} seconds, got {value!r}")
    return seconds


def _check_key(api_key: str | None, *, from_env: bool = True) -> str:
    if api_key is None and from_env:
        api_key = os.environ.get("LENSMOR_API_KEY") or None
    if api_key is None:
        raise CreditGuardError(
            "no API key: pass api_key=... or set the LENSMOR_API_KEY environment variable"
            if from_env
            else "no API key given"
        )
    if not isinstance(api_key, str):
        raise TypeError(f"api_key must be a str, got {type(api_key).__name__}")
    if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        raise CreditGuardError("the API key is malformed (empty, whitespace or non-ASCII)")
    return api_key
