"""``creditguard report``: what the ledger says was spent, per subject, action or day; the
refusals; the credits spent outside the guard. A table, JSON, or a PNG bar chart
(matplotlib, ``pip install 'creditguard[report]'``)."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from creditguard.core.errors import CreditGuardError
from creditguard.ledger import LedgerError, LedgerTotal, open_ledger

__all__ = ["add_parser", "chart", "since_arg"]

UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def since_arg(text: str) -> timedelta | datetime:
    """``30d``, ``12h``, ``90m``, ``2w`` (back from now), or a date or time in ISO 8601
    (``2026-01-01``; UTC when it names no offset)."""
    match = re.fullmatch(r"(\d+)([mhdw])", text.strip())
    if match:
        return timedelta(**{UNITS[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30d, 12h, 90m, 2w or an ISO date, got {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def add_parser(sub: Any) -> None:
    """Register ``report`` on the command's subparsers."""
    p = sub.add_parser(
        "report",
        help="credits charged per subject, action or day, refusals and credits spent outside"
        " the guard, from a ledger",
    )
    p.add_argument(
        "--ledger",
        required=True,
        metavar="URL",
        help="the ledger: sqlite:///spend.db (sqlite:////absolute/path) or postgresql://...",
    )
    p.add_argument(
        "--by",
        choices=("subject", "action", "day"),
        default="subject",
        help="one row per subject (default), action or day (UTC)",
    )
    p.add_argument(
        "--since",
        type=since_arg,
        default=timedelta(days=30),
        metavar="WHEN",
        help="how far back: 30d (default), 12h, 90m, 2w, or an ISO date such as 2026-01-01",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--chart",
        default=None,
        metavar="PNG",
        help="also draw the credits charged as a bar chart into this PNG file (needs"
        " matplotlib: pip install 'creditguard[report]')",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    since = args.since
    start = datetime.now(timezone.utc) - since if isinstance(since, timedelta) else since
    try:
        ledger = open_ledger(args.ledger, must_exist=True)
    except (LedgerError, ValueError) as exc:
        raise CreditGuardError(f"--ledger: {exc}") from None
    try:
        rows = ledger.totals(by=args.by, since=start)
        outside = ledger.outside(since=start)
    except LedgerError as exc:
        raise CreditGuardError(f"{ledger.where}: {exc}") from None
    except Exception as exc:  # the database's own errors (sqlite3, psycopg)
        raise CreditGuardError(f"cannot read the ledger at {ledger.where}: {exc}") from None
    finally:
        ledger.close()
    if args.chart:
        chart(rows, args.by, start, args.chart, outside)
    if args.json:
        print(json.dumps(as_json(ledger.where, args.by, start, rows, outside), indent=2), file=out)
    else:
        print(table(ledger.where, args.by, start, rows, outside), file=out)
        if args.chart:
            print(f"chart written to {args.chart}", file=out)
    return 0


def as_json(
    where: str, by: str, start: datetime, rows: list[LedgerTotal], outside: int
) -> dict[str, Any]:
    return {
        "ledger": where,
        "by": by,
        "since": start.isoformat(timespec="seconds"),
        "rows": [
            {"key": r.key, "charged": r.charged, "calls": r.calls, "refusals": r.refusals}
            for r in rows
        ],
        "total": {
            "charged": sum(r.charged for r in rows),
            "calls": sum(r.calls for r in rows),
            "refusals": sum(r.refusals for r in rows),
        },
        "outside": outside,
    }


def table(where: str, by: str, start: datetime, rows: list[LedgerTotal], outside: int) -> str:
    names = [_name(r.key) for r in rows]
    width = max([len(by), 7, *(len(n) for n in names)])
    lines = [
        f"credits charged by {by} since {start:%Y-%m-%d %H:%M} UTC ({where})",
        f"  {by:<{width}}  {'charged':>12}  {'calls':>8}  {'refusals':>8}",
    ]
    lines += [
        f"  {name:<{width}}  {r.charged:>12,}  {r.calls:>8,}  {r.refusals:>8,}"
        for name, r in zip(names, rows, strict=True)
    ]
    charged = sum(r.charged for r in rows)
    calls = sum(r.calls for r in rows)
    refusals = sum(r.refusals for r in rows)
    lines.append(f"  {'total':<{width}}  {charged:>12,}  {calls:>8,}  {refusals:>8,}")
    lines.append(f"  spent outside the guard: {outside:,} credits")
    return "\n".join(lines)


SHOWN = 60  # the most characters of a name a table or chart shows (an ellipsis after)


def _name(key: str | None) -> str:
    """A subject, action or day as one line of plain text: what a terminal would act on
    (control characters, and anything else unprintable) escaped as in a Python string
    literal, at most :data:`SHOWN` characters. The JSON keeps names whole."""
    if key is None:
        return "(none)"
    if not key.isprintable():
        key = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)
    return key if len(key) <= SHOWN else key[:SHOWN] + "…"


def _label(key: str | None) -> str:
    """:func:`_name` for the chart: its dollar signs escaped, so that matplotlib draws
    them rather than reading the text between two of them as mathtext."""
    return _name(key).replace("$", r"\$")


def chart(rows: list[LedgerTotal], by: str, start: datetime, path: str, outside: int = 0) -> None:
    """A bar chart of the credits charged per key (refusals above each bar), and a grey
    bar for the credits spent outside the guard, into ``path`` (PNG), with matplotlib's
    Agg canvas (no display, no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CreditGuardError(
            "--chart needs matplotlib: pip install 'creditguard[report]'"
        ) from None
    shown = sorted(rows, key=lambda r: r.key or "") if by == "day" else rows[:20]
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = [_label(r.key) for r in shown]
    bars = axes.bar(names, [r.charged for r in shown], color="#3b6ea5")
    if outside:
        axes.bar(["outside the guard"], [outside], color="#9a9a9a")
    for bar, row in zip(bars, shown, strict=True):
        if row.refusals:
            axes.annotate(
                f"{row.refusals} refused",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#a53b3b",
            )
    axes.set_ylabel("credits charged")
    axes.set_xlabel(by)
    axes.set_title(f"Lensmor credits charged by {by} since {start:%Y-%m-%d} (UTC)")
    if len(names) > 5:
        axes.tick_params(axis="x", labelrotation=45)
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise CreditGuardError(f"--chart: cannot write {path}: {exc.strerror or exc}") from None
