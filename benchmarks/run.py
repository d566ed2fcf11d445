#!/usr/bin/env python3
"""creditguard benchmark harness.

Every scenario measures its variants side by side in the same process and run, over
several rounds (the variant order rotates from round to round), and reports the median
with the min and max over rounds. Variants:

* ``bare``: the action called directly, with no guard (the floor);
* ``naive``: the guard a user writes by hand with httpx: GET the balance, compare, run
  the action, GET the balance again;
* ``cachetools``: a ``cachetools.cached(TTLCache, lock=...)`` balance read before the
  action, invalidated after it (no single flight, no reservations);
* ``creditguard``: ``@guard.requires_credits(1)`` with the in-memory state backend.

Every guard flavour in :data:`_harness.GUARDS` is benchmarked as a variant of that name:
the in-memory ones in every scenario, ``creditguard_redis`` (a ``RedisBackend``) in the
scenarios whose module sets ``USES_REDIS = True`` (the overhead scenarios,
``reads_per_call``; ``processes``, ``gate`` and ``web`` name their Redis variants their
own way). For those this file starts a throwaway redis-server on a free loopback port for
the run and stops it at the end; without one (``redis-server`` not found, redis-py not
installed) the Redis variants are left out and reported missing.

Layout: ``_harness.py`` (settings, recorder, targets helpers, machine description,
tables), ``_variants.py`` (upstreams, readers, hand-written guards, variant builders,
drivers, the sandbox process), and one ``scenario_<name>.py`` module per scenario. A
scenario module defines ``SCENARIO`` (its name, or a tuple of names when it runs
several), ``run(settings, rec)`` (``run(settings, rec, scenario=name)`` when it runs
several) and optionally ``targets(rec, settings)``, returning target entries. This file
finds them (:data:`ORDER` first, then any other ``scenario_*.py`` by name) and is the
command line.

Usage::

    python benchmarks/run.py                 # full run (several minutes), prints a table
    python benchmarks/run.py --quick         # fewer rounds and calls: a few minutes
    python benchmarks/run.py --json out.json # also write the results as JSON
    python benchmarks/run.py --smoke         # a few iterations: checks the harness only
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _redis  # noqa: E402 - the modules next to this file
from _harness import (  # noqa: E402
    MODES,
    REDIS_VARIANTS,
    Recorder,
    Settings,
    Targets,
    flavours,
    format_markdown,
    format_table,
    log,
    machine_info,
)

# Scenario modules in the order they run; absent ones are skipped, and any other
# ``scenario_*.py`` in this directory runs after them, in name order.
ORDER = (
    "scenario_overhead",
    "scenario_reads_per_call",
    "scenario_e2e_throughput",
    "scenario_memory_10k_keys",
    "scenario_admission_efficiency",
    "scenario_adapters",
    "scenario_processes",
    "scenario_web",
    "scenario_policy",
    "scenario_telemetry",
)

Runner = Callable[[Settings, Recorder], None]


def scenario_modules() -> list[ModuleType]:
    """The scenario modules found next to this file, in run order."""
    found = {path.stem for path in HERE.glob("scenario_*.py")}
    names = [name for name in ORDER if name in found] + sorted(found - set(ORDER))
    return [importlib.import_module(name) for name in names]


def scenario_names(module: ModuleType) -> tuple[str, ...]:
    names = module.SCENARIO
    return (names,) if isinstance(names, str) else tuple(names)


def uses_redis(modules: Sequence[ModuleType]) -> set[str]:
    """The scenarios that benchmark Redis variants (their module sets ``USES_REDIS``)."""
    return {
        name
        for module in modules
        if getattr(module, "USES_REDIS", False)
        for name in scenario_names(module)
    }


def discover() -> tuple[dict[str, Runner], list[ModuleType]]:
    """Every scenario name with its runner, in run order, and the modules."""
    modules = scenario_modules()
    runners: dict[str, Runner] = {}
    for module in modules:
        for name in scenario_names(module):
            if name in runners:
                raise RuntimeError(f"scenario {name!r} is defined twice ({module.__name__})")
            if isinstance(module.SCENARIO, str):
                runners[name] = module.run
            else:
                runners[name] = functools.partial(module.run, scenario=name)
    return runners, modules


def evaluate_targets(
    rec: Recorder, settings: Settings, modules: Sequence[ModuleType]
) -> dict[str, dict[str, Any]]:
    """Every scenario module's targets; a target whose figures were not measured is left
    out."""
    out: Targets = {}
    for module in modules:
        targets = getattr(module, "targets", None)
        if targets is not None:
            out.update(targets(rec, settings))
    return out


def run(
    settings: Settings,
    scenarios: Sequence[str],
    runners: dict[str, Runner] | None = None,
    modules: Sequence[ModuleType] | None = None,
) -> dict[str, Any]:
    if runners is None or modules is None:
        runners, modules = discover()
    rec = Recorder()
    machine = machine_info()
    started = time.perf_counter()
    durations: dict[str, float] = {}
    redis_scenarios = uses_redis(modules) & set(scenarios)
    with _redis.server_for_run(bool(redis_scenarios)) as server:
        if server.missing:
            log(f"warning: the Redis variants ({', '.join(REDIS_VARIANTS)}) will not run:")
            log(f"  {server.missing}")
        elif server.url:
            log(f"redis-server {server.version} for this run at {server.url}")
        redis_info = server.info() if redis_scenarios else None
        measured = flavours(redis=bool(redis_scenarios))
        for scenario in scenarios:
            log(f"running {scenario} ({settings.mode}, {settings.rounds} rounds)...")
            t0 = time.perf_counter()
            runners[scenario](settings, rec)
            durations[scenario] = round(time.perf_counter() - t0, 2)
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "scenarios": rec.to_json(),
        "targets": evaluate_targets(rec, settings, modules),
        "machine": machine,
        "run": {
            "mode": settings.mode,
            "rounds": settings.rounds,
            "settings": dataclasses.asdict(settings),
            "guards": measured,
            "redis": redis_info,
            "scenario_seconds": durations,
            "total_seconds": round(time.perf_counter() - started, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    runners, modules = discover()
    scenario_names = tuple(runners)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    size.add_argument("--smoke", action="store_true", help="a few iterations: harness check only")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument(
        "--only",
        action="append",
        choices=scenario_names,
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(scenario_names)}",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--from-json", metavar="PATH", help="print the tables of a saved result; run nothing"
    )
    args = parser.parse_args(argv)
    show = format_markdown if args.markdown else format_table

    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            print(show(json.load(f)))
        return 0

    settings = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        settings = dataclasses.replace(settings, rounds=args.rounds)
    scenarios = [s for s in scenario_names if not args.only or s in args.only]

    results = run(settings, scenarios, runners, modules)
    print(show(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
