#!/usr/bin/env python3
"""Charts of a ``benchmarks/run.py --json`` result, as one PNG (needs matplotlib).

Usage::

    python benchmarks/plot.py results.json -o docs/img/benchmarks.png

Seven panels, each drawn when its scenario is in the result. Top row: upstream reads per
guarded call against concurrency (log-log), the sequential per-call time of each variant
next to ``bare`` (overhead_sync and overhead_async), and end-to-end throughput over
loopback HTTP relative to the bare action at each concurrency. Bottom row: admission
efficiency (credits spent of those available, per case, creditguard beside cachetools),
worker processes (bare, memory, Redis: throughput and overspent calls), the gate (guarded
calls and searches served per second, the share answered 409) and the framework adapters
(each one's own work per request against the 10 µs target). The data extraction
functions do not need matplotlib (the smoke test uses them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Variants drawn in the overhead panel, in this order, when present.
OVERHEAD_VARIANTS = ("bare", "http_read", "naive", "cachetools", "creditguard", "creditguard_logic")
OVERHEAD_SCENARIOS = ("overhead_sync", "overhead_async")
_LEVEL = re.compile(r"^(?P<variant>.+)@(?P<kind>async|threads)(?P<n>\d+)$")
READS_FLOOR = 1e-4  # log axis: a measured 0 is drawn here

Point = tuple[int, float, float, float]  # concurrency, median, min, max


def reads_series(data: dict[str, Any]) -> dict[str, dict[str, list[Point]]]:
    """``{variant: {"async"|"threads": [(concurrency, median, min, max), ...]}}``."""
    out: dict[str, dict[str, list[Point]]] = {}
    for name, entry in data["scenarios"].get("reads_per_call", {}).items():
        match = _LEVEL.match(name)
        if match is None:
            continue
        series = out.setdefault(match["variant"], {}).setdefault(match["kind"], [])
        series.append((int(match["n"]), entry["median"], entry["min"], entry["max"]))
    for kinds in out.values():
        for points in kinds.values():
            points.sort()
    return out


def overhead_series(data: dict[str, Any]) -> dict[str, list[tuple[str, float, float, float]]]:
    """``{scenario: [(variant, median, min, max), ...]}`` in :data:`OVERHEAD_VARIANTS`
    order, plus any other guard flavour's ``<flavour>`` and ``<flavour>_logic``."""
    out: dict[str, list[tuple[str, float, float, float]]] = {}
    for scenario in OVERHEAD_SCENARIOS:
        entries = data["scenarios"].get(scenario)
        if not entries:
            continue
        names = [v for v in OVERHEAD_VARIANTS if v in entries]
        names += [
            v
            for v in entries
            if v not in names and v.startswith("creditguard") and not v.endswith("_read")
        ]
        out[scenario] = [
            (v, entries[v]["median"], entries[v]["min"], entries[v]["max"]) for v in names
        ]
    return out


def throughput_series(data: dict[str, Any]) -> dict[str, list[tuple[str, float, float, float]]]:
    """``{"async100"|"threads8"|...: [(variant, median, min, max), ...]}``."""
    out: dict[str, list[tuple[str, float, float, float]]] = {}
    for name, entry in data["scenarios"].get("e2e_throughput", {}).items():
        match = _LEVEL.match(name)
        if match is None:
            continue
        level = f"{match['kind']}{match['n']}"
        out.setdefault(level, []).append(
            (match["variant"], entry["median"], entry["min"], entry["max"])
        )
    return out


E2E_VARIANTS = ("naive", "cachetools", "one_read")


def relative_throughput(data: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """``{variant: [(level, median throughput / bare's median at that level), ...]}`` for
    the hand-written guards, ``one_read`` and every guard flavour, levels in run order."""
    flavours = data.get("run", {}).get("guards") or ["creditguard"]
    out: dict[str, list[tuple[str, float]]] = {}
    for level, rows in throughput_series(data).items():
        medians = {variant: median for variant, median, _, _ in rows}
        bare = medians.get("bare")
        if not bare:
            continue
        for variant in (*E2E_VARIANTS, *flavours):
            if variant in medians:
                out.setdefault(variant, []).append((level, medians[variant] / bare))
    return out


def admission_series(data: dict[str, Any]) -> dict[str, list[tuple[str, float, float, float]]]:
    """``{guard: [(case, spent/available median, overspent calls, false refusals), ...]}``
    for ``admission_efficiency``, the case being the variant's name after ``@`` (the cases
    with failing calls, ``_fail<N>``, left out: their spend is not meant to reach 1)."""
    out: dict[str, list[tuple[str, float, float, float]]] = {}
    for name, entry in data["scenarios"].get("admission_efficiency", {}).items():
        guard, _, case = name.partition("@")
        if "_fail" in case:
            continue
        out.setdefault(guard, []).append(
            (
                case,
                entry["median"],
                entry.get("overspent_calls", 0.0),
                entry.get("false_refusals", 0.0),
            )
        )
    return out


def processes_series(data: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """``[(variant, calls/s, overspent calls, calls), ...]`` of ``processes``."""
    return [
        (name, e["median"], e.get("overspent_calls", 0.0), e.get("calls", 0.0))
        for name, e in data["scenarios"].get("processes", {}).items()
    ]


def gate_series(data: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """``[(variant, guarded calls/s, searches served/s, share answered 409), ...]``."""
    return [
        (name, e["median"], e.get("ok_per_s", 0.0), e.get("share_409", 0.0))
        for name, e in data["scenarios"].get("gate", {}).items()
    ]


def adapters_series(data: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``[(adapter, own µs per request, added µs per request), ...]`` of ``adapters``."""
    return [
        (name, e.get("own_us", 0.0), e["median"])
        for name, e in data["scenarios"].get("adapters", {}).items()
    ]


ADAPTER_TARGET_US = 10.0


def render(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "bare": "#7f7f7f",
        "naive": "#d62728",
        "cachetools": "#ff7f0e",
        "one_read": "#c7c7c7",
    }
    flavours = data.get("run", {}).get("guards") or ["creditguard"]
    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf"]
    colours.update({f: palette[i % len(palette)] for i, f in enumerate(flavours)})

    def colour(variant: str) -> str:
        return colours.get(variant.removesuffix("_logic"), "#bcbd22")

    fig = plt.figure(figsize=(17, 10), layout="constrained")
    grid = fig.add_gridspec(2, 12)
    ax_reads = fig.add_subplot(grid[0, 0:4])
    ax_over = fig.add_subplot(grid[0, 4:8])
    ax_e2e = fig.add_subplot(grid[0, 8:12])
    ax_adm = fig.add_subplot(grid[1, 0:4])
    ax_proc = fig.add_subplot(grid[1, 4:6])
    ax_gate = fig.add_subplot(grid[1, 6:9])
    ax_adapt = fig.add_subplot(grid[1, 9:12])
    machine = data.get("machine", {})
    run = data.get("run", {})
    commit = machine.get("git_commit") or "?"
    when = str(run.get("finished_at", "?"))[:10]
    fig.suptitle(
        f"creditguard benchmarks ({run.get('mode', '?')} run, {run.get('rounds', '?')} rounds;"
        f" library at {str(commit)[:7]}, {when}; Python {machine.get('python', '?')},"
        f" {machine.get('usable_cpus', '?')} shared CPUs)",
        fontsize=10,
    )

    # 1. reads per call against concurrency
    for variant, kinds in sorted(reads_series(data).items()):
        for kind, points in kinds.items():
            xs = [p[0] for p in points]
            ys = [max(p[1], READS_FLOOR) for p in points]
            lo = [max(p[1], READS_FLOOR) - max(p[2], READS_FLOOR) for p in points]
            hi = [max(p[3], READS_FLOOR) - max(p[1], READS_FLOOR) for p in points]
            ax_reads.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                label=f"{variant} ({kind})",
                color=colour(variant),
                linestyle="-" if kind == "async" else "--",
                marker="o" if kind == "async" else "s",
                markersize=4,
                capsize=2,
            )
    ax_reads.set_xscale("log")
    ax_reads.set_yscale("log")
    ax_reads.set_xlabel("concurrent callers (tasks / threads)")
    ax_reads.set_ylabel("upstream balance reads per guarded call")
    latency = run.get("settings", {}).get("latency")
    suffix = f", {latency * 1000:g} ms upstream" if latency else ""
    ax_reads.set_title(f"reads per call{suffix}", fontsize=10)
    ax_reads.grid(True, which="both", alpha=0.3)
    ax_reads.legend(fontsize=7)

    # 2. sequential per-call time against bare
    series = overhead_series(data)
    width = 0.8 / max(1, len(series))
    for i, (scenario, rows) in enumerate(series.items()):
        ys = [j + i * width for j in range(len(rows))]
        medians = [r[1] for r in rows]
        err = [[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]
        ax_over.barh(
            ys,
            medians,
            height=width,
            xerr=err,
            capsize=2,
            label=scenario.removeprefix("overhead_"),
            color="#1f77b4" if i == 0 else "#aec7e8",
        )
        for y, row in zip(ys, rows, strict=True):
            ax_over.text(row[3], y, f"  {row[1]:.3g}", va="center", fontsize=7)
    if series:
        first = next(iter(series.values()))
        ax_over.set_yticks([j + width * (len(series) - 1) / 2 for j in range(len(first))])
        ax_over.set_yticklabels([r[0] for r in first], fontsize=8)
    ax_over.invert_yaxis()
    ax_over.set_xlabel("microseconds per sequential call (median, min-max)")
    ax_over.set_title("guarded no-op, zero-latency in-memory upstream", fontsize=10)
    ax_over.grid(True, axis="x", alpha=0.3)
    ax_over.legend(fontsize=8, loc="lower right")

    # 3. e2e throughput, relative to the bare action at each concurrency
    relative = relative_throughput(data)
    levels = list(dict.fromkeys(level for rows in relative.values() for level, _ in rows))
    width = 0.8 / max(1, len(relative))
    for i, (variant, rows) in enumerate(relative.items()):
        by_level = dict(rows)
        xs = [j + i * width for j, level in enumerate(levels) if level in by_level]
        ys = [by_level[level] for level in levels if level in by_level]
        ax_e2e.bar(xs, ys, width=width, label=variant, color=colour(variant))
    ax_e2e.axhline(1.0, color=colours["bare"], linewidth=1, linestyle=":", label="bare")
    ax_e2e.set_xticks([j + width * (len(relative) - 1) / 2 for j in range(len(levels))])
    ax_e2e.set_xticklabels(levels, fontsize=8)
    ax_e2e.set_ylabel("throughput / bare action's (median)")
    ax_e2e.set_title("end to end, loopback HTTP sandbox", fontsize=10)
    highest = max((y for rows in relative.values() for _, y in rows), default=1.0)
    ax_e2e.set_ylim(0, max(1.1, highest * 1.08))
    ax_e2e.grid(True, axis="y", alpha=0.3)
    ax_e2e.legend(fontsize=7)

    _admission_panel(ax_adm, data, colour)
    _processes_panel(ax_proc, data, colours)
    _gate_panel(ax_gate, data)
    _adapters_panel(ax_adapt, data)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, pil_kwargs={"optimize": True})
    plt.close(fig)


def _absent(ax: Any, scenario: str) -> None:
    ax.text(0.5, 0.5, f"{scenario}: not in this run", ha="center", va="center", fontsize=9)
    ax.set_axis_off()


def _admission_panel(ax: Any, data: dict[str, Any], colour: Any) -> None:
    """Credits spent of those available per case (1.0: exact), one bar per guard."""
    series = admission_series(data)
    if not series:
        _absent(ax, "admission_efficiency")
        return
    cases = list(dict.fromkeys(case for rows in series.values() for case, *_ in rows))
    width = 0.8 / len(series)
    for i, (guard, rows) in enumerate(series.items()):
        by_case = {case: rest for case, *rest in rows}
        xs = [j + i * width for j, case in enumerate(cases) if case in by_case]
        ys = [by_case[case][0] for case in cases if case in by_case]
        ax.bar(xs, ys, width=width, label=guard, color=colour(guard))
        for x, case in zip(xs, [c for c in cases if c in by_case], strict=True):
            over = by_case[case][1]
            if over:
                ax.text(x, 1.01, f"+{over:g}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.axhline(1.0, color="#7f7f7f", linewidth=1, linestyle=":")
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(
        [c.replace("_ttl_", " ").replace("_demand1x", " 1x") for c in cases],
        fontsize=6,
        rotation=60,
        ha="right",
    )
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("credits spent / available (median)")
    ax.set_title("admission efficiency (+N: calls overspent)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)


def _processes_panel(ax: Any, data: dict[str, Any], colours: dict[str, str]) -> None:
    """Four worker processes: calls per second per variant, overspent calls written in."""
    rows = processes_series(data)
    if not rows:
        _absent(ax, "processes")
        return
    names = [r[0] for r in rows]
    palette = {"bare": colours["bare"], "memory": "#ff7f0e", "redis": "#2ca02c"}
    ax.bar(names, [r[1] for r in rows], color=[palette.get(n, "#1f77b4") for n in names])
    top = max(r[1] for r in rows)
    for x, (_, per_s, over, calls) in enumerate(rows):
        ax.text(x, per_s + top * 0.02, f"{over:g} of {calls:g}\noverspent", ha="center", fontsize=7)
    ax.set_ylim(0, top * 1.3)
    ax.set_ylabel("calls per second (paid burst)")
    ax.set_title("4 worker processes", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)


def _gate_panel(ax: Any, data: dict[str, Any]) -> None:
    """max_concurrent=1: guarded calls and searches served per second, share answered 409."""
    rows = gate_series(data)
    if not rows:
        _absent(ax, "gate")
        return
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="guarded calls/s")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="searches served/s")
    top = max(max(r[1], r[2]) for r in rows)
    for x, row in zip(xs, rows, strict=True):
        ax.text(x, max(row[1], row[2]) + top * 0.02, f"409: {row[3]:.0%}", ha="center", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r[0] for r in rows], fontsize=8)
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel("per second")
    ax.set_title("the gate: paid calls one at a time", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def _adapters_panel(ax: Any, data: dict[str, Any]) -> None:
    """Each adapter's own work per request, against the target."""
    rows = adapters_series(data)
    if not rows:
        _absent(ax, "adapters")
        return
    ys = range(len(rows))
    own = [r[1] for r in rows]
    ax.barh(list(ys), own, color=["#2ca02c" if v <= ADAPTER_TARGET_US else "#d62728" for v in own])
    for y, row in zip(ys, rows, strict=True):
        label = f"  {row[1]:.1f} (+{row[2]:.0f} µs over bare)"
        ax.text(max(row[1], 0), y, label, va="center", fontsize=7)
    ax.axvline(ADAPTER_TARGET_US, color="#7f7f7f", linestyle=":", linewidth=1)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    right = max(max(own), ADAPTER_TARGET_US) * 2.2
    ax.set_xlim(min(min(own), 0) * 1.2, right)
    ax.set_xlabel("own µs per request (target <= 10)")
    ax.set_title("framework adapters", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a benchmarks/run.py --json result.")
    parser.add_argument("results", type=Path, help="JSON written by run.py --json")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("docs/img/benchmarks.png"), help="PNG path"
    )
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text(encoding="utf-8"))
    render(data, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
