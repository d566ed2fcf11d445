"""Checks of the HTTP side of the configuration: the base URL (brought to one normal form,
so that equivalent spellings name one account; plain HTTP only to loopback unless allowed)
and the request timeout. Each raises a clear error before any request."""

from __future__ import annotations

import ipaddress

import httpx

from creditguard.core.checks import _check_seconds
from creditguard.core.errors import CreditGuardError, InsecureTransportError

__all__ = ["_check_base_url", "_check_timeout"]


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


def _check_timeout(timeout: object) -> httpx.Timeout:
    """Per-request timeouts: each phase a finite number of seconds > 0 (or ``None`` in
    an ``httpx.Timeout``: that phase is then bounded by the retry deadline alone)."""
    if isinstance(timeout, httpx.Timeout):
        for phase, value in timeout.as_dict().items():
            if value is not None:
                _check_seconds(f"timeout.{phase}", value, positive=True)
        return timeout
    return httpx.Timeout(_check_seconds("timeout", timeout, positive=True))
