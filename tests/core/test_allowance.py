"""Spending policy, the pure part: an ``Allowance``'s windows (every ``per``, weeks from
Monday, month ends, DST days, a midnight the clocks jumped over, fixed windows aligned to
the epoch, and a Hypothesis property over many zones), its checks, and ``Usage``,
``LowBalance``, subjects and ``resolve``.

Windows are compared in UTC: Python compares and subtracts two datetimes that share a
``tzinfo`` by wall time, so ``end - start`` of a 25-hour day would read 24 hours."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import pickle
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditguard.core.policy import (
    Allowance,
    LowBalance,
    Usage,
    check_subject,
    resolve,
    subject_key,
)
from tests.strategies import FUZZ

UTC = timezone.utc
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
SANTIAGO = ZoneInfo("America/Santiago")
HOUR = timedelta(hours=1)


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def span(window: tuple[datetime, datetime]) -> timedelta:
    start, end = window
    return utc(end) - utc(start)


def local(zone: tzinfo, *fields: int, fold: int = 0) -> datetime:
    year, month, day, hour, minute = (*fields, 0, 0)[:5]
    return datetime(year, month, day, hour, minute, tzinfo=zone, fold=fold)


def check_window(allowance: Allowance, at: datetime) -> tuple[datetime, datetime]:
    """The window holding ``at``, checked: it holds ``at``, is in the allowance's zone,
    the next one starts at its end, the previous one ends at its start, and ``bounds``
    says the same."""
    start, end = allowance.period(at)
    assert utc(start) <= utc(at) < utc(end)
    assert allowance.window(at) == (start, end)
    expected_tz = UTC if isinstance(allowance.per, timedelta) else allowance.tz
    assert start.tzinfo is expected_tz
    assert end.tzinfo is expected_tz
    assert utc(allowance.period(end)[0]) == utc(end)
    assert utc(allowance.period(start)[1]) == utc(end)
    assert utc(allowance.period(start)[0]) == utc(start)
    assert utc(allowance.period(utc(start) - timedelta(microseconds=1))[1]) == utc(start)
    assert allowance.bounds(at) == (start.timestamp(), end.timestamp())
    return start, end


# -- every per -----------------------------------------------------------------------------


def test_a_day_is_the_local_calendar_day() -> None:
    allowance = Allowance(10, "day", tz="Asia/Tokyo")
    start, end = check_window(allowance, datetime(2024, 5, 1, 20, 30, tzinfo=UTC))
    tokyo = ZoneInfo("Asia/Tokyo")
    assert (start, end) == (local(tokyo, 2024, 5, 2), local(tokyo, 2024, 5, 3))
    assert utc(start) == datetime(2024, 5, 1, 15, tzinfo=UTC)
    assert span((start, end)) == timedelta(days=1)


def test_the_default_is_the_calendar_month_in_utc() -> None:
    allowance = Allowance(10)
    assert allowance.per == "month"
    assert allowance.tz is ZoneInfo("UTC")
    start, end = check_window(allowance, datetime(2024, 5, 17, 9, tzinfo=PARIS))
    assert utc(start) == datetime(2024, 5, 1, tzinfo=UTC)
    assert utc(end) == datetime(2024, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize("day", range(4, 11))  # Monday 2024-03-04 .. Sunday 2024-03-10
def test_weeks_start_on_monday_at_local_midnight(day: int) -> None:
    allowance = Allowance(10, "week", tz=NEW_YORK)
    for hour, minute in [(0, 0), (12, 0), (23, 59)]:
        start, end = check_window(allowance, local(NEW_YORK, 2024, 3, day, hour, minute))
        assert start == local(NEW_YORK, 2024, 3, 4)
        assert start.weekday() == 0
        assert end == local(NEW_YORK, 2024, 3, 11)
        # 2024-03-10 is the spring-forward day: this week is an hour short.
        assert span((start, end)) == timedelta(days=7) - HOUR


def test_monday_midnight_starts_a_new_week() -> None:
    allowance = Allowance(10, "week", tz=PARIS)
    monday = local(PARIS, 2024, 1, 1)  # a Monday, and a new year
    assert check_window(allowance, monday)[0] == monday
    before = monday - timedelta(microseconds=1)
    assert check_window(allowance, before) == (local(PARIS, 2023, 12, 25), monday)


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        ((2024, 12, 31, 23, 59), (2024, 12, 1), (2025, 1, 1)),
        ((2025, 1, 1, 0, 0), (2025, 1, 1), (2025, 2, 1)),
        ((2024, 2, 29, 12, 0), (2024, 2, 1), (2024, 3, 1)),  # a leap year
        ((2024, 2, 29, 23, 59), (2024, 2, 1), (2024, 3, 1)),
        ((2024, 3, 1, 0, 0), (2024, 3, 1), (2024, 4, 1)),
        ((2023, 2, 28, 23, 59), (2023, 2, 1), (2023, 3, 1)),
        ((2000, 2, 29, 1, 0), (2000, 2, 1), (2000, 3, 1)),
        ((2024, 4, 30, 8, 0), (2024, 4, 1), (2024, 5, 1)),
    ],
)
def test_month_ends(at: tuple[int, ...], start: tuple[int, ...], end: tuple[int, ...]) -> None:
    zone = ZoneInfo("Australia/Sydney")
    allowance = Allowance(10, "month", tz=zone)
    assert check_window(allowance, local(zone, *at)) == (local(zone, *start), local(zone, *end))


def test_february_of_a_leap_year_lasts_29_days() -> None:
    allowance = Allowance(10, "month", tz="UTC")
    assert span(check_window(allowance, datetime(2024, 2, 10, tzinfo=UTC))) == timedelta(29)
    assert span(check_window(allowance, datetime(2023, 2, 10, tzinfo=UTC))) == timedelta(28)
    assert span(check_window(allowance, datetime(2100, 2, 10, tzinfo=UTC))) == timedelta(28)


# -- DST -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        (PARIS, (2024, 3, 31), 23),
        (PARIS, (2024, 10, 27), 25),
        (NEW_YORK, (2024, 3, 10), 23),
        (NEW_YORK, (2024, 11, 3), 25),
    ],
)
def test_a_dst_day_lasts_23_or_25_hours(
    zone: ZoneInfo, day: tuple[int, int, int], hours: int
) -> None:
    allowance = Allowance(10, "day", tz=zone)
    midnight = local(zone, *day)
    following = midnight + timedelta(days=1)  # wall-clock arithmetic: the next midnight
    # Every hour of the day, in UTC, both readings of a repeated hour included.
    moment = utc(midnight)
    while moment < utc(following):
        start, end = check_window(allowance, moment)
        assert (start, end) == (midnight, following)
        assert span((start, end)) == timedelta(hours=hours)
        moment += timedelta(minutes=30)
    assert utc(allowance.period(following)[0]) == utc(following)
    assert utc(allowance.period(utc(midnight) - timedelta(microseconds=1))[1]) == utc(midnight)


def test_the_repeated_hour_belongs_to_its_day() -> None:
    allowance = Allowance(10, "day", tz=PARIS)
    first = local(PARIS, 2024, 10, 27, 2, 30, fold=0)
    second = local(PARIS, 2024, 10, 27, 2, 30, fold=1)
    assert utc(second) - utc(first) == HOUR
    assert check_window(allowance, first) == check_window(allowance, second)


def test_a_month_with_a_dst_change_is_an_hour_short_or_long() -> None:
    allowance = Allowance(10, "month", tz=PARIS)
    march = check_window(allowance, datetime(2024, 3, 15, tzinfo=UTC))
    october = check_window(allowance, datetime(2024, 10, 15, tzinfo=UTC))
    assert span(march) == timedelta(days=31) - HOUR
    assert span(october) == timedelta(days=31) + HOUR


def test_a_midnight_the_clocks_jumped_over_starts_the_day_after_the_gap() -> None:
    """America/Santiago, 2022-09-11: clocks went from 00:00 (-04) to 01:00 (-03)."""
    allowance = Allowance(10, "day", tz=SANTIAGO)
    start, end = check_window(allowance, local(SANTIAGO, 2022, 9, 11, 12))
    assert utc(start) == datetime(2022, 9, 11, 4, tzinfo=UTC)
    assert (start.hour, start.minute, start.utcoffset()) == (1, 0, timedelta(hours=-3))
    assert end == local(SANTIAGO, 2022, 9, 12)
    assert span((start, end)) == timedelta(hours=23)
    # The day before ends exactly there, having lasted 24 hours.
    before = check_window(allowance, local(SANTIAGO, 2022, 9, 10, 23, 59))
    assert utc(before[1]) == utc(start)
    assert span(before) == timedelta(hours=24)
    # The first instant after the gap opens the day; the one before closes the last.
    assert utc(allowance.period(utc(start))[0]) == utc(start)
    assert allowance.period(utc(start) - timedelta(microseconds=1))[0] == before[0]
    # The week and the month that hold it are not disturbed.
    week = check_window(Allowance(10, "week", tz=SANTIAGO), utc(start))
    assert week[0] == local(SANTIAGO, 2022, 9, 5)
    assert span(week) == timedelta(days=7) - HOUR


def test_a_day_skipped_entirely_has_no_window() -> None:
    """Pacific/Apia skipped 2011-12-30: the 29th ends where the 31st starts."""
    apia = ZoneInfo("Pacific/Apia")
    allowance = Allowance(10, "day", tz=apia)
    day29 = check_window(allowance, local(apia, 2011, 12, 29, 23))
    day31 = check_window(allowance, local(apia, 2011, 12, 31, 1))
    assert utc(day29[1]) == utc(day31[0]) == datetime(2011, 12, 30, 10, tzinfo=UTC)
    assert day31[0] == local(apia, 2011, 12, 31)
    assert span(day29) == span(day31) == timedelta(days=1)


# -- fixed windows -------------------------------------------------------------------------


def test_fixed_windows_are_aligned_to_the_unix_epoch() -> None:
    per = timedelta(hours=5)
    at = datetime(2024, 5, 1, 13, 7, tzinfo=UTC)
    start, end = check_window(Allowance(10, per), at)
    assert start.tzinfo is UTC
    assert (start - datetime(1970, 1, 1, tzinfo=UTC)) % per == timedelta(0)
    assert end - start == per
    assert start == datetime(2024, 5, 1, 9, tzinfo=UTC)  # 476,256 hours after 1970 + 1
    # The time zone does not matter, nor the zone of ``at``.
    tokyo = Allowance(10, per, tz="Asia/Tokyo")
    assert check_window(tokyo, at.astimezone(ZoneInfo("Asia/Tokyo"))) == (start, end)


def test_fixed_windows_before_the_epoch_and_odd_lengths() -> None:
    allowance = Allowance(10, timedelta(days=7))
    # 1970-01-01 was a Thursday: seven-day windows run Thursday to Thursday.
    start, _ = check_window(allowance, datetime(2024, 5, 1, tzinfo=UTC))
    assert start == datetime(2024, 4, 25, tzinfo=UTC)
    assert start.weekday() == 3
    start, end = check_window(allowance, datetime(1969, 12, 31, 23, tzinfo=UTC))
    assert (start, end) == (datetime(1969, 12, 25, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC))
    odd = Allowance(10, timedelta(milliseconds=1234))
    start, end = check_window(odd, datetime(2024, 5, 1, 0, 0, 0, 999, tzinfo=UTC))
    assert (start - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(milliseconds=1234) == (
        timedelta(0)
    )
    assert end - start == timedelta(milliseconds=1234)


# -- the property --------------------------------------------------------------------------

ZONES = [
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "America/Santiago",
    "America/Havana",
    "Asia/Beirut",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",
    "Pacific/Apia",
    "Pacific/Chatham",
    "Asia/Kolkata",
    "Africa/Casablanca",
    "Europe/Dublin",
]
PERS: list[str | timedelta] = [
    "day",
    "week",
    "month",
    timedelta(hours=1),
    timedelta(days=1),
    timedelta(days=7),
    timedelta(seconds=90, milliseconds=7),
]


@FUZZ
@given(
    at=st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from([ZoneInfo(name) for name in ZONES]),
    ),
    zone=st.sampled_from(ZONES),
    per=st.sampled_from(PERS),
)
def test_every_window_holds_its_instant_and_meets_the_next(
    at: datetime, zone: str, per: str | timedelta
) -> None:
    allowance = Allowance(7, per, tz=zone)  # type: ignore[arg-type]
    start, end = allowance.period(at)
    assert utc(start) <= utc(at) < utc(end)
    assert allowance.period(start) == (start, end)
    assert [utc(t) for t in allowance.period(start)] == [utc(start), utc(end)]
    assert utc(allowance.period(end)[0]) == utc(end)
    assert utc(allowance.period(utc(start) - timedelta(microseconds=1))[1]) == utc(start)
    assert allowance.bounds(at) == (start.timestamp(), end.timestamp())
    assert allowance.bounds(at.timestamp())[0] <= at.timestamp() < allowance.bounds(at)[1]
    if isinstance(per, timedelta):
        assert end - start == per
    else:
        # A calendar window starts at the first instant of its first day (local).
        first = start.astimezone(allowance.tz)
        before = (utc(start) - timedelta(microseconds=1)).astimezone(allowance.tz)
        assert before.date() < first.date()
        if per == "month":
            assert first.day == 1
        if per == "week":
            assert first.weekday() == 0


# -- bounds --------------------------------------------------------------------------------


def test_bounds_take_a_unix_time_too() -> None:
    allowance = Allowance(10, "day", tz=PARIS)
    start, end = allowance.period(local(PARIS, 2024, 3, 31, 12))
    at = local(PARIS, 2024, 3, 31, 12).timestamp()
    assert allowance.bounds(at) == (start.timestamp(), end.timestamp())
    assert allowance.bounds(int(at)) == (start.timestamp(), end.timestamp())
    assert end.timestamp() - start.timestamp() == 23 * 3600


def test_bounds_of_a_float_round_down_so_the_window_holds_it() -> None:
    allowance = Allowance(10, timedelta(seconds=1))
    at = 1_700_000_000.9999995  # 1_700_000_000.99999952...: rounded, the next second
    assert datetime.fromtimestamp(at, UTC).microsecond == 0
    start, end = allowance.bounds(at)
    assert start <= at < end
    assert (start, end) == (1_700_000_000.0, 1_700_000_001.0)
    assert allowance.bounds(-0.5) == (-1.0, 0.0)


@pytest.mark.parametrize("at", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_bounds_refuse_what_is_no_time(at: float) -> None:
    with pytest.raises(ValueError, match="Unix time"):
        Allowance(10).bounds(at)


def test_bounds_refuse_what_is_not_a_time() -> None:
    with pytest.raises(TypeError, match="bool"):
        Allowance(10).bounds(True)
    with pytest.raises(TypeError, match="str"):
        Allowance(10).bounds("2024-01-01")  # type: ignore[arg-type]


# -- naive datetimes and bad arguments -----------------------------------------------------


@pytest.mark.parametrize("per", PERS)
def test_naive_datetimes_are_refused(per: str | timedelta) -> None:
    allowance = Allowance(10, per)  # type: ignore[arg-type]
    naive = datetime(2024, 5, 1, 12)
    with pytest.raises(ValueError, match="aware datetime"):
        allowance.period(naive)
    with pytest.raises(ValueError, match="aware datetime"):
        allowance.window(naive)
    with pytest.raises(ValueError, match="aware datetime"):
        allowance.bounds(naive)
    with pytest.raises(TypeError, match="date"):
        allowance.period(naive.date())  # type: ignore[arg-type]


def test_a_window_beyond_the_datetime_range_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="beyond the range of datetime"):
        Allowance(10, "month").period(datetime(9999, 12, 15, tzinfo=UTC))


@pytest.mark.parametrize(
    ("limit", "error", "message"),
    [
        (-1, ValueError, "limit must be >= 0 credits, got -1"),
        (True, TypeError, "limit must be an int, got bool"),
        (1.5, TypeError, "limit must be an int, got float"),
        ("10", TypeError, "limit must be an int, got str"),
        (None, TypeError, "limit must be an int, got NoneType"),
    ],
)
def test_a_bad_limit_is_refused(limit: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Allowance(limit)  # type: ignore[arg-type]


def test_a_limit_of_zero_is_allowed() -> None:
    assert Allowance(0).limit == 0


@pytest.mark.parametrize(
    ("per", "message"),
    [
        ("year", "per must be 'day', 'week', 'month' or a positive timedelta, got 'year'"),
        ("Day", "got 'Day'"),
        (86400, "got 86400"),
        (None, "got None"),
        (timedelta(0), "positive timedelta"),
        (timedelta(seconds=-1), "positive timedelta"),
        (timedelta(microseconds=1500), "whole number of milliseconds"),
        (timedelta(days=100 * 365), "at most 1000000000 seconds"),
    ],
)
def test_a_bad_per_is_refused(per: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Allowance(10, per)  # type: ignore[arg-type]


def test_a_bad_time_zone_is_refused() -> None:
    for name in ["Mars/Olympus_Mons", "America", "", "../etc/passwd", "Europe/Paris\x00"]:
        with pytest.raises(ValueError, match="unknown time zone") as raised:
            Allowance(10, tz=name)
        assert repr(name) in str(raised.value)
    with pytest.raises(TypeError, match="IANA time zone name or a tzinfo, got int"):
        Allowance(10, tz=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("warn_at", [0, 0.0, -0.1, 1.01, 2, float("nan"), float("inf")])
def test_a_bad_warn_at_is_refused(warn_at: float) -> None:
    with pytest.raises(ValueError, match=r"warn_at must be a fraction of the limit in \(0, 1\]"):
        Allowance(10, warn_at=warn_at)


@pytest.mark.parametrize("warn_at", [True, "0.5"])
def test_a_warn_at_of_another_type_is_refused(warn_at: object) -> None:
    with pytest.raises(ValueError, match="warn_at"):
        Allowance(10, warn_at=warn_at)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("limit", "warn_at", "credits"),
    [
        (100, None, None),
        (100, 0.8, 80),
        (30, 0.1, 3),  # one tenth as written, not 3.0000000000000004 rounded up
        (3, 0.5, 2),
        (7, 1, 7),
        (0, 0.5, 0),
        (10**18 + 1, 0.5, 5 * 10**17 + 1),
    ],
)
def test_warn_credits(limit: int, warn_at: float | None, credits: int | None) -> None:
    allowance = Allowance(limit, warn_at=warn_at)
    assert allowance.warn_credits == credits
    assert allowance.warn_at == (None if warn_at is None else float(warn_at))


# -- the value -----------------------------------------------------------------------------


def test_an_allowance_is_an_immutable_value() -> None:
    allowance = Allowance(100, "week", tz="Europe/Paris", warn_at=0.8)
    assert not hasattr(allowance, "__dict__")
    with pytest.raises(AttributeError, match="immutable"):
        allowance.limit = 5  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        allowance._limit = 5
    with pytest.raises(AttributeError, match="immutable"):
        del allowance._limit
    with pytest.raises(AttributeError, match="immutable"):
        allowance.other = 5
    same = Allowance(100, "week", tz=ZoneInfo("Europe/Paris"), warn_at=0.8)
    assert allowance == same
    assert hash(allowance) == hash(same)
    assert len({allowance, same}) == 1
    for other in [
        Allowance(101, "week", tz="Europe/Paris", warn_at=0.8),
        Allowance(100, "day", tz="Europe/Paris", warn_at=0.8),
        Allowance(100, "week", tz="Europe/Berlin", warn_at=0.8),
        Allowance(100, "week", tz="Europe/Paris", warn_at=0.9),
        Allowance(100, "week", tz="Europe/Paris"),
    ]:
        assert allowance != other
    assert allowance != "Allowance"
    assert Allowance(5, timedelta(hours=1)) == Allowance(5, timedelta(minutes=60))
    assert pickle.loads(pickle.dumps(allowance)) == allowance  # noqa: S301
    assert copy.deepcopy(allowance) == allowance
    assert copy.copy(allowance) == allowance


def test_an_allowance_has_a_readable_repr() -> None:
    assert repr(Allowance(100)) == "Allowance(limit=100, per='month', tz='UTC')"
    assert (
        repr(Allowance(100, "week", tz="Europe/Paris", warn_at=0.8))
        == "Allowance(limit=100, per='week', tz='Europe/Paris', warn_at=0.8)"
    )
    assert repr(Allowance(5, timedelta(hours=1), tz=UTC)) == (
        "Allowance(limit=5, per=datetime.timedelta(seconds=3600), tz=datetime.timezone.utc)"
    )


def test_a_fixed_offset_time_zone_works() -> None:
    zone = timezone(timedelta(hours=5, minutes=30))
    allowance = Allowance(10, "day", tz=zone)
    start, end = check_window(allowance, datetime(2024, 5, 1, 20, tzinfo=UTC))
    assert (start, end) == (datetime(2024, 5, 2, tzinfo=zone), datetime(2024, 5, 3, tzinfo=zone))


def test_usage_and_low_balance_are_frozen() -> None:
    resets = datetime(2024, 6, 1, tzinfo=UTC)
    usage = Usage("alice", limit=100, spent=30, reserved=5, remaining=65, resets_at=resets)
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.spent = 31  # type: ignore[misc]
    assert not hasattr(usage, "__dict__")
    assert usage == Usage("alice", 100, 30, 5, 65, resets)
    uncapped = Usage("bob", limit=None, spent=3, reserved=0, remaining=None, resets_at=None)
    assert uncapped.limit is None
    assert uncapped.remaining is None
    low = LowBalance(threshold=80, balance=75, kind="low")
    with pytest.raises(dataclasses.FrozenInstanceError):
        low.kind = "recovered"  # type: ignore[misc]
    assert not hasattr(low, "__dict__")
    assert low == LowBalance(80, 75, "low")
    assert hash(low) == hash(LowBalance(80, 75, "low"))
    assert LowBalance(80, 90, "recovered").kind == "recovered"


# -- subjects ------------------------------------------------------------------------------


def test_a_subject_key_is_a_short_stable_hash() -> None:
    key = subject_key("alice@example.com")
    assert key == hashlib.sha256(b"alice@example.com").hexdigest()[:16]
    assert len(key) == 16
    assert int(key, 16) >= 0
    assert subject_key("alice@example.com") == key
    assert subject_key("bob@example.com") != key
    assert "alice" not in key
    assert subject_key("José") == hashlib.sha256("José".encode()).hexdigest()[:16]


@pytest.mark.parametrize("subject", ["alice", "user 42", "José", "名前", "a" * 1000, "-"])
def test_a_subject_is_a_non_empty_string_without_control_characters(subject: str) -> None:
    assert check_subject(subject) == subject


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ("", "non-empty str"),
        (None, "non-empty str, got NoneType"),
        (42, "non-empty str, got int"),
        (b"alice", "non-empty str, got bytes"),
        ("alice\n", "control characters"),
        ("a\x00b", "control characters"),
        ("\x7f", "control characters"),
        ("\x85", "control characters"),
        ("\ud800", "control characters"),  # a lone surrogate: no UTF-8 for it
    ],
)
def test_a_bad_subject_is_refused(subject: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_subject(subject)
    with pytest.raises(ValueError, match=message):
        subject_key(subject)  # type: ignore[arg-type]


# -- resolve -------------------------------------------------------------------------------


def test_resolve_gives_the_allowance_that_applies() -> None:
    shared = Allowance(100)
    vip = Allowance(1000, "day")
    assert resolve(None, "alice") is None
    assert resolve(shared, "alice") is shared

    def per_subject(subject: str) -> Allowance | None:
        return {"vip": vip, "free": None}.get(subject, shared)

    assert resolve(per_subject, "vip") is vip
    assert resolve(per_subject, "free") is None
    assert resolve(per_subject, "alice") is shared


def test_resolve_refuses_what_is_no_allowance() -> None:
    with pytest.raises(TypeError, match="must return an Allowance or None") as raised:
        resolve(lambda subject: 100, "alice@example.com")  # type: ignore[arg-type,return-value]
    assert "got int" in str(raised.value)
    assert "alice" not in str(raised.value)  # the subject's key, never the subject

    async def later(subject: str) -> Allowance:
        return Allowance(1)

    with pytest.raises(TypeError, match="must not be async"):
        resolve(later, "alice")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="an Allowance, a function of the subject or None"):
        resolve(100, "alice")  # type: ignore[arg-type]


def test_resolve_checks_the_subject() -> None:
    with pytest.raises(ValueError, match="control characters"):
        resolve(Allowance(1), "alice\r\n")
    with pytest.raises(ValueError, match="non-empty"):
        resolve(None, "")
