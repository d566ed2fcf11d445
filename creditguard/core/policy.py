"""Spending policy, the pure part: an ``Allowance`` (a limit of credits per day, week,
month or fixed window) and the window that holds an instant; what a subject has used
(``Usage``); a low-balance notice (``LowBalance``); subjects checked and hashed for the
backends' keys; ``resolve``, the allowance that applies to a subject.

No I/O and no clock: every window is computed from the instant it is given.

Calendar windows (``"day"``, ``"week"``, ``"month"``) follow the allowance's time zone:
each starts at local midnight of its first day, so across a DST change a day lasts 23 or
25 hours. Where local midnight does not exist (clocks jumped over it, as in
America/Santiago on 2022-09-11), the window starts at the first instant after the gap.
Fixed windows (a ``timedelta``) are aligned to the Unix epoch and ignore the time zone.

Python compares and subtracts two datetimes that share a ``tzinfo`` by wall time, not
by instant (a 25-hour day's ``end - start`` is 24 hours): convert to UTC, or use
:meth:`Allowance.bounds`, before doing arithmetic on the windows.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import inspect
import math
import unicodedata
from collections.abc import Callable
from fractions import Fraction
from typing import Literal, TypeAlias, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from creditguard.core.checks import MAX_SECONDS

__all__ = [
    "Allowance",
    "AllowanceSource",
    "LowBalance",
    "Usage",
    "check_subject",
    "resolve",
    "subject_key",
]

Period = Literal["day", "week", "month"]
_PERIODS: tuple[str, ...] = ("day", "week", "month")

_UTC = _dt.timezone.utc
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
_MICRO = _dt.timedelta(microseconds=1)
_MILLI = _dt.timedelta(milliseconds=1)
_DAY = _dt.timedelta(days=1)


class Allowance:
    """At most ``limit`` credits per window (``per``), counted in the time zone ``tz``.

    ``per`` is ``"day"``, ``"week"`` (weeks start on Monday at 00:00 local time),
    ``"month"`` (the calendar month, local time) or a positive ``timedelta`` (a whole
    number of milliseconds, at most ``MAX_SECONDS``): fixed windows aligned to the Unix
    epoch, in UTC. ``tz`` is an IANA name or a ``tzinfo``. ``warn_at``, when given, is a
    fraction of the limit in (0, 1]; :attr:`warn_credits` is that many credits.

    Immutable, hashable, compared by value.
    """

    __slots__ = ("_limit", "_per", "_tz", "_tz_id", "_warn_at")

    _limit: int
    _per: Period | _dt.timedelta
    _tz: _dt.tzinfo
    _tz_id: object
    _warn_at: float | None

    def __init__(
        self,
        limit: int,
        per: Period | _dt.timedelta = "month",
        *,
        tz: str | _dt.tzinfo = "UTC",
        warn_at: float | None = None,
    ) -> None:
        zone = _check_tz(tz)
        object.__setattr__(self, "_limit", _check_limit(limit))
        object.__setattr__(self, "_per", _check_per(per))
        object.__setattr__(self, "_tz", zone)
        # ZoneInfo compares by identity; two built from the same key are the same zone.
        key = getattr(zone, "key", None) if isinstance(zone, ZoneInfo) else None
        object.__setattr__(self, "_tz_id", ("zoneinfo", key) if key else zone)
        object.__setattr__(self, "_warn_at", _check_warn_at(warn_at))

    # -- the value ---------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The credits a subject may be charged per window."""
        return self._limit

    @property
    def per(self) -> Period | _dt.timedelta:
        """The window: ``"day"``, ``"week"``, ``"month"`` or a fixed ``timedelta``."""
        return self._per

    @property
    def tz(self) -> _dt.tzinfo:
        """The time zone calendar windows start at midnight in."""
        return self._tz

    @property
    def warn_at(self) -> float | None:
        """The fraction of ``limit`` past which one ``allowance_warning`` is emitted per
        subject per window (``None``: none)."""
        return self._warn_at

    @property
    def warn_credits(self) -> int | None:
        """``warn_at`` of the limit in credits, rounded up (``None`` without ``warn_at``).
        The fraction is taken as written: ``0.1`` of 30 is 3, not 4."""
        if self._warn_at is None:
            return None
        return math.ceil(Fraction(repr(self._warn_at)) * self._limit)

    def _key(self) -> tuple[object, ...]:
        return (self._limit, self._per, self._tz_id, self._warn_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Allowance):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        tz = self._tz_id[1] if isinstance(self._tz_id, tuple) else self._tz
        text = f"Allowance(limit={self._limit}, per={self._per!r}, tz={tz!r}"
        if self._warn_at is not None:
            text += f", warn_at={self._warn_at!r}"
        return text + ")"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Allowance is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Allowance is immutable: cannot delete {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_restore, (self._limit, self._per, self._tz, self._warn_at))

    # -- windows -----------------------------------------------------------------------

    def period(self, at: _dt.datetime) -> tuple[_dt.datetime, _dt.datetime]:
        """The window ``[start, end)`` that holds ``at`` (an aware datetime).

        ``start`` and ``end`` are aware datetimes in the allowance's time zone (in UTC
        for fixed windows); the next window starts exactly at ``end``.
        """
        start, end = self._window(_instant(at))
        if isinstance(self._per, _dt.timedelta):
            return start, end
        return start.astimezone(self._tz), end.astimezone(self._tz)

    window = period

    def bounds(self, at: _dt.datetime | float) -> tuple[float, float]:
        """The window that holds ``at`` (an aware datetime, or a Unix time in seconds) as
        Unix times in seconds: ``(start, end)``. Times are taken to the microsecond, a
        float ``at`` rounded down, so ``start <= at < end``."""
        instant = _instant(at) if isinstance(at, _dt.datetime) else _from_unix(at)
        start, end = self._window(instant)
        return start.timestamp(), end.timestamp()

    def _window(self, instant: _dt.datetime) -> tuple[_dt.datetime, _dt.datetime]:
        """``[start, end)`` holding ``instant``, both in UTC (``instant`` is in UTC)."""
        try:
            if isinstance(self._per, _dt.timedelta):
                return _fixed_window(instant, self._per)
            return _calendar_window(instant, self._per, self._tz)
        except OverflowError:
            raise ValueError(
                f"the window holding {instant.isoformat()} lies beyond the range of datetime"
            ) from None


def _restore(
    limit: int, per: Period | _dt.timedelta, tz: _dt.tzinfo, warn_at: float | None
) -> Allowance:
    return Allowance(limit, per, tz=tz, warn_at=warn_at)


# -- checks of the arguments -------------------------------------------------------------


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"an allowance's limit must be an int, got {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"an allowance's limit must be >= 0 credits, got {limit}")
    return int(limit)


def _check_per(per: object) -> Period | _dt.timedelta:
    if isinstance(per, _dt.timedelta):
        if per <= _dt.timedelta(0):
            raise ValueError(f"an allowance's per must be a positive timedelta, got {per!r}")
        if per % _MILLI:
            raise ValueError(
                f"an allowance's per must be a whole number of milliseconds, got {per!r}"
            )
        if per.total_seconds() > MAX_SECONDS:
            raise ValueError(
                f"an allowance's per must be at most {MAX_SECONDS:.0f} seconds, got {per!r}"
            )
        return per
    if isinstance(per, str) and per in _PERIODS:
        return cast(Period, per)
    raise ValueError(
        f"an allowance's per must be 'day', 'week', 'month' or a positive timedelta, got {per!r}"
    )


def _check_tz(tz: object) -> _dt.tzinfo:
    if isinstance(tz, _dt.tzinfo):
        return tz
    if not isinstance(tz, str):
        raise TypeError(
            f"an allowance's tz must be an IANA time zone name or a tzinfo, got {type(tz).__name__}"
        )
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        if tz == "UTC":  # no time zone database (Windows without tzdata)
            return _UTC
        raise ValueError(f"unknown time zone {tz!r}: expected an IANA name") from None


def _check_warn_at(warn_at: object) -> float | None:
    if warn_at is None:
        return None
    if isinstance(warn_at, bool) or not isinstance(warn_at, (int, float)):
        raise ValueError(
            f"an allowance's warn_at must be a fraction of the limit in (0, 1], "
            f"got {type(warn_at).__name__}"
        )
    fraction = float(warn_at)
    if not 0 < fraction <= 1:  # NaN fails this too
        raise ValueError(
            f"an allowance's warn_at must be a fraction of the limit in (0, 1], got {warn_at!r}"
        )
    return fraction


def _instant(at: object) -> _dt.datetime:
    """An aware datetime, in UTC."""
    if not isinstance(at, _dt.datetime):
        raise TypeError(f"expected an aware datetime, got {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"expected an aware datetime (with a time zone), got naive {at!r}")
    try:
        return at.astimezone(_UTC)
    except OverflowError:
        raise ValueError(f"{at!r} lies beyond the range of datetime in UTC") from None


def _from_unix(at: object) -> _dt.datetime:
    """A Unix time in seconds as a UTC datetime, rounded down to the microsecond."""
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise TypeError(f"expected an aware datetime or a Unix time, got {type(at).__name__}")
    if not math.isfinite(at):
        raise ValueError(f"expected a finite Unix time, got {at!r}")
    micros = math.floor(Fraction(at) * 1_000_000)
    try:
        return _EPOCH + _dt.timedelta(microseconds=micros)
    except OverflowError:
        raise ValueError(f"Unix time {at!r} lies beyond the range of datetime") from None


# -- windows -------------------------------------------------------------------------------


def _fixed_window(instant: _dt.datetime, per: _dt.timedelta) -> tuple[_dt.datetime, _dt.datetime]:
    since = (instant - _EPOCH) // _MICRO
    length = per // _MICRO
    start = _EPOCH + _dt.timedelta(microseconds=since - since % length)
    return start, start + per


def _first_day(day: _dt.date, per: Period) -> _dt.date:
    """The first day of the calendar window holding ``day``."""
    if per == "day":
        return day
    if per == "week":
        return day - _dt.timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_first_day(first: _dt.date, per: Period) -> _dt.date:
    if per == "day":
        return first + _DAY
    if per == "week":
        return first + _dt.timedelta(days=7)
    if first.month == 12:
        if first.year == _dt.MAXYEAR:
            raise OverflowError("date value out of range")
        return _dt.date(first.year + 1, 1, 1)
    return _dt.date(first.year, first.month + 1, 1)


def _local_start(day: _dt.date, zone: _dt.tzinfo) -> _dt.datetime:
    """The first instant (in UTC) of ``day`` in ``zone``: local midnight, or, where the
    clocks jumped over midnight, the first instant after the gap."""
    wall = _dt.datetime(day.year, day.month, day.day)
    first = wall.replace(tzinfo=zone).astimezone(_UTC)  # fold=0: the earlier, if twice
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # Midnight falls in a gap. fold=0 reads it with the offset before the jump, fold=1
    # with the offset after; the jump lies between the two readings. Find, to the
    # microsecond, the first instant whose local wall time is midnight or later.
    other = wall.replace(tzinfo=zone, fold=1).astimezone(_UTC)
    low, high = min(first, other), max(first, other)
    if low == high or low.astimezone(zone).replace(tzinfo=None) >= wall:
        return first  # a tzinfo that ignores fold: no better answer than fold=0's
    below, above = 0, (high - low) // _MICRO  # wall(low + below) < wall <= wall(high)
    while above - below > 1:
        middle = (below + above) // 2
        moment = low + _dt.timedelta(microseconds=middle)
        if moment.astimezone(zone).replace(tzinfo=None) >= wall:
            above = middle
        else:
            below = middle
    return low + _dt.timedelta(microseconds=above)


def _calendar_window(
    instant: _dt.datetime, per: Period, zone: _dt.tzinfo
) -> tuple[_dt.datetime, _dt.datetime]:
    first = _first_day(instant.astimezone(zone).date(), per)
    start = _local_start(first, zone)
    # Where the clocks went back across midnight the local date can step back a day;
    # the windows' starts still rise with their first days, so walk to the one that
    # holds the instant (at most a step or two).
    while instant < start:
        first = _first_day(first - _DAY, per)
        start = _local_start(first, zone)
    following = _next_first_day(first, per)
    end = _local_start(following, zone)
    while instant >= end:
        first, start = following, end
        following = _next_first_day(first, per)
        end = _local_start(following, zone)
    return start, end


# -- what the backends report --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """What a subject has used in its current window. ``limit`` (and so ``remaining``)
    is ``None`` when no allowance caps the subject; ``resets_at`` is when the window
    ends (``None`` without one)."""

    subject: str
    limit: int | None
    spent: int
    reserved: int
    remaining: int | None
    resets_at: _dt.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class LowBalance:
    """A balance crossed a warning threshold: ``"low"`` when it fell to ``threshold`` or
    below, ``"recovered"`` when it rose above it again."""

    threshold: int
    balance: int
    kind: Literal["low", "recovered"]


# -- subjects ------------------------------------------------------------------------------


def check_subject(subject: object) -> str:
    """``subject`` if it is a valid subject id: a non-empty str without control
    characters (or lone surrogates); ``ValueError`` otherwise."""
    if not isinstance(subject, str):
        raise ValueError(f"a subject must be a non-empty str, got {type(subject).__name__}")
    if not subject:
        raise ValueError("a subject must be a non-empty str, got ''")
    for char in subject:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"a subject must not contain control characters, got {char!r} in it")
    return str(subject)


def subject_key(subject: str) -> str:
    """A short stable hash of a subject id (16 hex digits of its SHA-256), for backends'
    keys: a subject id (a user id, an email) is never written into a key in clear."""
    return hashlib.sha256(check_subject(subject).encode("utf-8")).hexdigest()[:16]


AllowanceSource: TypeAlias = Allowance | Callable[[str], Allowance | None] | None
"""What a guard is given: no allowance, one for every subject, or a function of the
subject that returns its allowance (or ``None``: no cap)."""


def resolve(allowance: AllowanceSource, subject: str) -> Allowance | None:
    """The allowance that applies to ``subject`` (checked with :func:`check_subject`)."""
    subject = check_subject(subject)
    if allowance is None or isinstance(allowance, Allowance):
        return allowance
    if not callable(allowance):
        raise TypeError(
            "an allowance must be an Allowance, a function of the subject or None, "
            f"got {type(allowance).__name__}"
        )
    found: object = allowance(subject)
    if found is None or isinstance(found, Allowance):
        return found
    hint = ""
    if inspect.isawaitable(found):
        hint = " (an awaitable: the function must not be async)"
        if inspect.iscoroutine(found):
            found.close()  # no "never awaited" warning
    raise TypeError(
        f"the allowance function {_name(allowance)} must return an Allowance or None for "
        f"subject key {subject_key(subject)}, got {type(found).__name__}{hint}"
    )


def _name(function: object) -> str:
    return getattr(function, "__qualname__", None) or repr(function)
