"""The facade's spending-policy helpers: checking ``keep`` and ``allowance``, and what a
subject has used of its allowance (``guard.usage``)."""

from __future__ import annotations

from datetime import datetime

from creditguard.core.engine import Engine
from creditguard.core.policy import Allowance, Usage, check_subject
from creditguard.core.spending import AllowanceSpec
from creditguard.core.steps import Steps, Window

__all__ = ["_check_allowance", "_check_keep", "_usage", "usage_steps"]


def _check_keep(keep: object) -> int:
    if type(keep) is not int or keep < 0:
        raise ValueError(f"keep must be an int >= 0 (credits never spent), got {keep!r}")
    return keep


def _check_allowance(allowance: object) -> AllowanceSpec:
    if allowance is None or isinstance(allowance, Allowance):
        return allowance
    if callable(allowance):
        return allowance  # checked on each use
    raise TypeError(
        "allowance must be an Allowance, a callable subject -> Allowance | None, or None;"
        f" got {type(allowance).__name__}"
    )


def usage_steps(engine: Engine, subject: str) -> Steps[tuple[Window | None, tuple[int, int]]]:
    """The subject's window now and what it holds (charged, reserved)."""
    window = engine.settings.policy.window(check_subject(subject))
    if window is None:
        return None, (0, 0)
    books = yield from engine.account.window_usage(window)
    return window, books


def _usage(engine: Engine, subject: str, found: tuple[Window | None, tuple[int, int]]) -> Usage:
    window, (spent, reserved) = found
    if window is None:
        return Usage(subject, None, 0, 0, None, None)
    limit = window.limit
    resets_at: datetime = window.resets_at
    return Usage(subject, limit, spent, reserved, max(0, limit - spent - reserved), resets_at)
