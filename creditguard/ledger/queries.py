"""Reading the ledger: totals per subject, action or day; the entries; the credits spent
outside the guard. Portable SQL over a DB-API cursor (``?`` turned into the dialect's
placeholder). Only constants and checked keys are put into the SQL text (hence the
``noqa: S608``); values are always parameters."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from datetime import datetime, timedelta, timezone
from typing import Any

from creditguard.core.observe import Entry
from creditguard.ledger.schema import Dialect

__all__ = ["LedgerTotal", "entries", "outside", "since_of", "totals"]

# What a row charged: ``charged`` when the call said, else its ``cost`` when it was spent.
CHARGED = "COALESCE(charged, CASE WHEN outcome = 'spent' THEN cost ELSE 0 END)"
BY = ("subject", "action", "day")


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerTotal:
    """One row of :meth:`Ledger.totals`: ``key`` (a subject, an action, or a day as
    ``YYYY-MM-DD``; ``None`` for calls with no subject or action), the credits
    ``charged``, the ``calls`` that ran and ended, and the ``refusals`` (refused or busy
    calls)."""

    key: str | None
    charged: int
    calls: int
    refusals: int


def since_of(since: datetime | timedelta | None) -> datetime | None:
    """``since`` as an aware UTC datetime: a timedelta counts back from now."""
    if since is None:
        return None
    if isinstance(since, timedelta):
        return datetime.now(timezone.utc) - since
    if isinstance(since, datetime):
        if since.tzinfo is None or since.utcoffset() is None:
            raise ValueError("since must be an aware datetime (with a tzinfo) or a timedelta")
        return since.astimezone(timezone.utc)
    raise TypeError(f"since must be a datetime or a timedelta, got {type(since).__name__}")


def _where(
    dialect: Dialect, column: str, since: datetime | None, **equal: str | None
) -> tuple[str, list[object]]:
    clauses, params = [], []
    if since is not None:
        clauses.append(f"{column} >= ?")
        params.append(dialect.to_db(since))
    for name, value in equal.items():
        if value is not None:
            clauses.append(f"{name} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _hour(since: datetime | None) -> datetime | None:
    return None if since is None else since.replace(minute=0, second=0, microsecond=0)


def totals(
    cursor: Any, dialect: Dialect, by: str, since: datetime | None, account: str | None
) -> list[LedgerTotal]:
    """Rows by ``by``: the largest charge first (by day: oldest first)."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, got {by!r}")
    key = dialect.day_of("at") if by == "day" else by
    where, params = _where(dialect, "at", since, account=account)
    sql = f"SELECT {key}, SUM({CHARGED}), COUNT(*) FROM entries{where} GROUP BY {key}"  # noqa: S608
    cursor.execute(dialect.sql(sql), params)
    found: dict[str | None, list[int]] = {}
    for k, charged, calls in cursor.fetchall():
        found[k] = [int(charged or 0), int(calls), 0]
    key = dialect.day_of("hour") if by == "day" else by
    where, params = _where(dialect, "hour", _hour(since), account=account)
    sql = f"SELECT {key}, SUM(count) FROM refusals{where} GROUP BY {key}"  # noqa: S608
    cursor.execute(dialect.sql(sql), params)
    for k, refused in cursor.fetchall():
        name = k or None  # '' in the refusals table: no subject or action
        found.setdefault(name, [0, 0, 0])[2] += int(refused)
    rows = [LedgerTotal(k, *v) for k, v in found.items()]
    if by == "day":
        return sorted(rows, key=lambda r: r.key or "")
    return sorted(rows, key=lambda r: (-r.charged, -r.calls, -r.refusals, r.key or ""))


COLUMNS = (
    "id, at, account, subject, action, cost, charged, balance_before, balance_after,"
    " outcome, trace_id, duration"
)


def entries(
    cursor: Any,
    dialect: Dialect,
    since: datetime | None,
    subject: str | None,
    account: str | None,
    limit: int | None,
) -> list[Entry]:
    where, params = _where(dialect, "at", since, subject=subject, account=account)
    tail = ""
    if limit is not None:
        if type(limit) is not int or limit < 0:
            raise ValueError(f"limit must be an int >= 0, got {limit!r}")
        tail = f" LIMIT {limit}"
    sql = f"SELECT {COLUMNS} FROM entries{where} ORDER BY at, id{tail}"  # noqa: S608
    cursor.execute(dialect.sql(sql), params)
    return [
        Entry(
            id=row[0],
            at=dialect.from_db(row[1]),
            account=row[2],
            subject=row[3],
            action=row[4],
            cost=int(row[5]),
            charged=None if row[6] is None else int(row[6]),
            balance_before=None if row[7] is None else int(row[7]),
            balance_after=None if row[8] is None else int(row[8]),
            outcome=row[9],
            trace_id=row[10],
            duration=float(row[11]),
        )
        for row in cursor.fetchall()
    ]


def outside(cursor: Any, dialect: Dialect, since: datetime | None, account: str | None) -> int:
    """Credits that left the pool other than through the guard, from the samples.

    For each account, its balance samples since ``since``, in time order, are cut into
    *runs* where the balance never rose: a sample higher than the one before it (a top-up,
    a subscription reset) ends a run and starts the next. For each run, from its first
    sample (``t0``, ``b0``) to its last (``t1``, ``b1``): the drop ``b0 - b1``, less what
    the ledger recorded charged on that account by calls that ended in ``(t0, t1]``
    (``charged``, else ``cost`` for a ``spent`` row). The result is the sum, over runs and
    accounts, of the positive parts.

    What this does not see: credits spent outside in an interval where the balance rose
    (the rise hides them, up to its size); what calls charged across a run's first sample
    (charged before it, ended after it) lowers that run's figure by their charge. Inside a
    run, a call that charged before a sample and ended after it moves nothing: the run
    is counted whole."""
    where, params = _where(dialect, "at", since, account=account)
    sql = f"SELECT account, at, total FROM balances{where} ORDER BY account, at"  # noqa: S608
    cursor.execute(dialect.sql(sql), params)
    samples: dict[str, list[tuple[datetime, int]]] = {}
    for acct, at, total in cursor.fetchall():
        samples.setdefault(acct, []).append((dialect.from_db(at), int(total)))
    spent_where, params = _where(dialect, "at", since, account=account)
    joiner = " AND " if spent_where else " WHERE "
    sql = (
        f"SELECT account, at, {CHARGED} FROM entries{spent_where}{joiner}"  # noqa: S608
        "(charged IS NOT NULL OR outcome = 'spent') ORDER BY account, at"
    )
    cursor.execute(dialect.sql(sql), params)
    charges: dict[str, tuple[list[datetime], list[int]]] = {}
    for acct, at, charged in cursor.fetchall():
        times, running = charges.setdefault(acct, ([], []))
        times.append(dialect.from_db(at))
        running.append((running[-1] if running else 0) + int(charged))
    total = 0
    for acct, points in samples.items():
        times, running = charges.get(acct, ([], []))
        for (t0, b0), (t1, b1) in _runs(points):
            gone = (b0 - b1) - (_until(times, running, t1) - _until(times, running, t0))
            if gone > 0:
                total += gone
    return total


Sample = tuple[datetime, int]


def _runs(points: list[Sample]) -> list[tuple[Sample, Sample]]:
    """The first and last sample of each run of ``points`` where the balance never rose."""
    runs = []
    start = points[0] if points else None
    for before, after in itertools.pairwise(points):
        if after[1] > before[1]:  # a rise: the run before it ends
            assert start is not None
            if before is not start:
                runs.append((start, before))
            start = after
    if start is not None and points and points[-1] is not start:
        runs.append((start, points[-1]))
    return runs


def _until(times: list[datetime], running: list[int], t: datetime) -> int:
    """What was charged by calls that ended at or before ``t`` (``running``: cumulative)."""
    i = bisect.bisect_right(times, t)
    return running[i - 1] if i else 0
