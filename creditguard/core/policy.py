"""Placeholder, replaced by the allowance module (branch allow)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = ["Allowance", "LowBalance", "Usage", "check_subject", "resolve", "subject_key"]


class Allowance:
    __slots__ = ("limit", "per", "tz", "warn_at")

    def __init__(
        self,
        limit: int,
        per: str | timedelta = "month",
        *,
        tz: str | tzinfo = "UTC",
        warn_at: float | None = None,
    ) -> None:
        self.limit = limit
        self.per = per
        self.tz = ZoneInfo(tz) if isinstance(tz, str) else tz
        self.warn_at = warn_at

    def __hash__(self) -> int:
        return hash((self.limit, self.per, str(self.tz), self.warn_at))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Allowance) and (
            self.limit,
            self.per,
            str(self.tz),
            self.warn_at,
        ) == (other.limit, other.per, str(other.tz), other.warn_at)

    @property
    def warn_credits(self) -> int | None:
        return None if self.warn_at is None else math.ceil(self.warn_at * self.limit)

    def period(self, at: datetime) -> tuple[datetime, datetime]:
        if isinstance(self.per, timedelta):
            step = self.per.total_seconds()
            start = math.floor(at.timestamp() / step) * step
            return (
                datetime.fromtimestamp(start, timezone.utc),
                datetime.fromtimestamp(start + step, timezone.utc),
            )
        local = at.astimezone(self.tz)
        if self.per == "day":
            s = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
            e = s + timedelta(days=1)
        elif self.per == "week":
            s = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
            s -= timedelta(days=s.weekday())
            e = s + timedelta(days=7)
        else:
            s = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
            e = (
                s.replace(year=s.year + 1, month=1)
                if s.month == 12
                else s.replace(month=s.month + 1)
            )
        return s.replace(tzinfo=self.tz), e.replace(tzinfo=self.tz)


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    subject: str
    limit: int | None
    spent: int
    reserved: int
    remaining: int | None
    resets_at: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class LowBalance:
    threshold: int
    balance: int
    kind: Literal["low", "recovered"]


def check_subject(subject: object) -> str:
    if not isinstance(subject, str) or not subject or not subject.isprintable():
        raise ValueError(f"a subject must be a non-empty str, got {subject!r}")
    return subject


def subject_key(subject: str) -> str:
    return hashlib.sha256(subject.encode()).hexdigest()[:16]


def resolve(
    allowance: Allowance | Callable[[str], Allowance | None] | None, subject: str
) -> Allowance | None:
    if allowance is None or isinstance(allowance, Allowance):
        return allowance
    got = allowance(subject)
    if got is not None and not isinstance(got, Allowance):
        raise TypeError("the allowance callable must return an Allowance or None")
    return got
