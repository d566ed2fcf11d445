"""Checks of the guard's configuration: the key, the base URL, seconds and costs.

Each raises a clear error before any request. The base URL is brought to one normal form,
so that equivalent spellings name one account; accounts are named by a hash of base URL
and key (never the key).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os

import httpx

from creditguard.core.errors import CreditGuardError, InsecureTransportError

__all__ = [
    "_check_base_url",
    "_check_cost",
    "_check_key",
    "_check_seconds",
    "_check_timeout",
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_base_url(base_url: str, allow_insecure_http: bool) -> str:
    """The base URL in one normal form (lower-case scheme and host, no default port, no
    trailing slash), so that equivalent spellings name one account."""
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, got {type(base_url).__name__}")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        raise CreditGuardError("invalid base_url: not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise CreditGuardError("base_url must be an http(s) URL with a host")
    if url.scheme == "http" and not allow_insecure_http and not _is_loopback(url.host):
        raise InsecureTransportError(
            f"refusing to send the API key over plain http:// to {url.host}; use https://,"
            " a loopback address, or pass allow_insecure_http=True"
        )
    if url.userinfo:
        # Never echoed: it holds credentials.
        raise CreditGuardError("base_url must not contain credentials (user:password@)")
    if url.query or url.fragment:
        raise CreditGuardError("base_url must have no query or fragment")
    return str(url.copy_with(path=url.path.rstrip("/") or "/")).rstrip("/")


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


def _check_timeout(timeout: object) -> httpx.Timeout:
    """Per-request timeouts: each phase a finite number of seconds > 0 (or ``None`` in
    an ``httpx.Timeout``: that phase is then bounded by the retry deadline alone)."""
    if isinstance(timeout, httpx.Timeout):
        for phase, value in timeout.as_dict().items():
            if value is not None:
                _check_seconds(f"timeout.{phase}", value, positive=True)
        return timeout
    return httpx.Timeout(_check_seconds("timeout", timeout, positive=True))


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
