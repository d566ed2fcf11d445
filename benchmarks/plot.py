#!/usr/bin/env python3
"""Charts of a ``benchmarks/run.py --json`` result, as one PNG (needs matplotlib).

Usage::

    python benchmarks/plot.py results.json -o docs/img/benchmarks.png

Three panels: upstream reads per guarded call against concurrency (log-log), the
sequential per-call time of each variant next to ``bare`` (overhead_sync and
overhead_async), and end-to-end throughput over loopback HTTP relative to the bare action
at each concurrency. The data extraction
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

    fig, (ax_reads, ax_over, ax_e2e) = plt.subplots(1, 3, figsize=(14, 4.4))
    machine = data.get("machine", {})
    run = data.get("run", {})
    fig.suptitle(
        f"creditguard benchmarks ({run.get('mode', '?')} run, {run.get('rounds', '?')} rounds;"
        f" Python {machine.get('python', '?')}, {machine.get('usable_cpus', '?')} CPUs)",
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
    ax_e2e.set_ylim(0, 1.1)
    ax_e2e.grid(True, axis="y", alpha=0.3)
    ax_e2e.legend(fontsize=7)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, pil_kwargs={"optimize": True})
    plt.close(fig)


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
