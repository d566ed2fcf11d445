"""Smoke test of the benchmark harness (``benchmarks/run.py --smoke``).

It checks that the harness runs every scenario and writes the documented JSON shape.
It never looks at how fast anything was: timings are not asserted here or anywhere.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

SCENARIOS = {
    "overhead_sync",
    "overhead_async",
    "reads_per_call",
    "e2e_throughput",
    "memory_10k_keys",
    "admission_efficiency",
}
GUARDED = ("naive", "cachetools", "creditguard")
ADMISSION_FIELDS = (
    "false_refusals",
    "overspent",
    "overspent_calls",
    "reads_per_call",
    "refused",
    "calls",
    "balance",
    "unspent",
    "cost",
    "seconds",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


def _load_plot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_plot", BENCHMARKS / "plot.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_json_shape(smoke: tuple[dict[str, Any], str]) -> None:
    data, _ = smoke
    assert isinstance(data["machine"], dict)
    assert data["machine"]["python"]
    assert set(data["scenarios"]) >= SCENARIOS
    for scenario, variants in data["scenarios"].items():
        assert variants, scenario
        for variant, entry in variants.items():
            where = f"{scenario}/{variant}"
            for stat in ("median", "min", "max"):
                assert isinstance(entry[stat], float | int), where
                assert math.isfinite(entry[stat]), where
            assert entry["min"] <= entry["median"] <= entry["max"], where
            assert isinstance(entry["unit"], str), where
            assert entry["unit"], where
            assert entry["rounds"] >= 2, where


def test_variants_named_as_documented(smoke: tuple[dict[str, Any], str]) -> None:
    scenarios = smoke[0]["scenarios"]
    for name in ("overhead_sync", "overhead_async"):
        expected = {"bare", "naive", "cachetools", "creditguard", "http_read"}
        assert expected | {"creditguard_logic"} <= set(scenarios[name])
    reads = scenarios["reads_per_call"]
    for variant in GUARDED:
        for level in ("async1", "async10", "async100", "async1000"):
            assert f"{variant}@{level}" in reads
        for level in ("threads1", "threads8", "threads32"):
            assert f"{variant}@{level}" in reads
    e2e = scenarios["e2e_throughput"]
    for variant in ("bare", "naive", "creditguard"):
        assert f"{variant}@async100" in e2e
        assert any(name.startswith(f"{variant}@threads") for name in e2e)
    for variant in (
        "bare",
        "one_read",
        "naive",
        "cachetools",
        "creditguard",
        "http_read",
        "bare_report",
        "creditguard_report",
    ):
        assert f"{variant}@async1" in e2e
        assert f"{variant}@threads1" in e2e
    assert "creditguard" in scenarios["memory_10k_keys"]


def test_units(smoke: tuple[dict[str, Any], str]) -> None:
    scenarios = smoke[0]["scenarios"]
    assert {e["unit"] for e in scenarios["overhead_sync"].values()} == {"us/call"}
    assert {e["unit"] for e in scenarios["reads_per_call"].values()} == {"reads/call"}
    assert {e["unit"] for e in scenarios["e2e_throughput"].values()} == {"calls/s"}
    assert {e["unit"] for e in scenarios["memory_10k_keys"].values()} == {"bytes/key"}


def test_the_harness_counts_reads(smoke: tuple[dict[str, Any], str]) -> None:
    """The hand-written naive guard reads twice per call by construction: a check of the
    harness's counting, not of anyone's speed."""
    reads = smoke[0]["scenarios"]["reads_per_call"]
    naive = {name: e for name, e in reads.items() if name.startswith("naive@")}
    assert naive
    for entry in naive.values():
        assert entry["min"] == entry["max"] == 2.0
    assert smoke[0]["scenarios"]["overhead_sync"]["naive"]["reads_per_call"] == 2.0
    e2e = smoke[0]["scenarios"]["e2e_throughput"]
    for kind in ("async1", "threads1"):
        assert e2e[f"naive@{kind}"]["reads_per_call"] == 2.0
        assert e2e[f"http_read@{kind}"]["reads_per_call"] == 1.0
        # Settled from the action's own report: no read after the warm-up's, but for one
        # when the balance's TTL runs out during the run (one read per call otherwise).
        assert e2e[f"creditguard_report@{kind}"]["reads_per_call"] < 0.5


def test_table_printed(smoke: tuple[dict[str, Any], str]) -> None:
    _, stdout = smoke
    for scenario in SCENARIOS:
        assert scenario in stdout
    assert "creditguard@async1000" in stdout
    assert "creditguard@threads4_c1_ttl_short_demand1x" in stdout


def test_plot_reads_the_json(smoke: tuple[dict[str, Any], str]) -> None:
    """The chart's data extraction (matplotlib itself is only in the ``bench`` extra)."""
    plot = _load_plot()
    data = smoke[0]
    reads = plot.reads_series(data)
    assert [p[0] for p in reads["creditguard"]["async"]] == [1, 10, 100, 1000]
    assert [p[0] for p in reads["naive"]["threads"]] == [1, 8, 32]
    overhead = plot.overhead_series(data)
    assert [row[0] for row in overhead["overhead_sync"]][:1] == ["bare"]
    assert "creditguard_logic" in [row[0] for row in overhead["overhead_async"]]
    assert "async100" in plot.throughput_series(data)
    relative = plot.relative_throughput(data)
    assert [level for level, _ in relative["creditguard"]][:2] == ["async1", "threads1"]
    assert "bare" not in relative


def test_admission_efficiency_shape(smoke: tuple[dict[str, Any], str]) -> None:
    """One variant per guard and case, named ``<guard>@<async|threads><N>_c<cost>_ttl_<short|
    long>`` (twice the demand the balance pays for) or with a ``_demand<D>x`` suffix, with
    every documented figure; the counts add up (no figure is judged here)."""
    data = smoke[0]
    entries = data["scenarios"]["admission_efficiency"]
    settings = data["run"]["settings"]
    levels = (f"async{settings['admission_async']}", f"threads{settings['admission_threads']}")
    expected = {
        f"{guard}@{level}_c{cost}_ttl_{ttl}" + ("" if demand == 2 else f"_demand{demand}x")
        for guard in ("cachetools", "creditguard")
        for level in levels
        for cost in settings["admission_costs"]
        for ttl in ("short", "long")
        for demand in settings["admission_demands"]
    }
    assert set(entries) == expected
    for variant, entry in entries.items():
        assert entry["unit"] == "spent/available", variant
        assert 0 <= entry["min"] <= entry["max"] <= 1, variant
        for name in ADMISSION_FIELDS:
            assert math.isfinite(entry[name]), (variant, name)
            assert entry[name] >= 0, (variant, name)
        cost = int(variant.split("_c")[1].split("_")[0])
        assert entry["cost"] == cost, variant
        assert entry["balance"] == settings["admission_calls_paid"] * cost, variant
        demand = int(variant.split("_demand")[1][:-1]) if "_demand" in variant else 2
        assert entry["calls"] >= demand * settings["admission_calls_paid"], variant
        assert entry["overspent"] == entry["overspent_calls"] * cost, variant
        if entry["refused"] > 0:  # the refusal latencies exist when something was refused
            assert entry["refused_p50_ms"] <= entry["refused_p99_ms"], variant


def test_targets_reported(smoke: tuple[dict[str, Any], str]) -> None:
    """Every target of the issue has a measured value in the JSON (met or not)."""
    targets = smoke[0]["targets"]
    for key in (
        "logic_sync_us",
        "logic_async_us",
        "sequential_vs_naive_sync",
        "sequential_vs_naive_async",
        "reads_per_call_async1000",
        "e2e_async100_vs_bare",
        "e2e_sequential_async_extra_reads",
        "e2e_sequential_threads_extra_reads",
    ):
        entry = targets[f"creditguard.{key}"]
        assert math.isfinite(entry["value"])
        assert isinstance(entry["met"], bool)
    admission = targets["creditguard.admission_efficiency"]
    assert 0 <= admission["value"] <= 1
    assert isinstance(admission["met"], bool)
