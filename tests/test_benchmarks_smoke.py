"""Smoke test of the benchmark harness (``benchmarks/run.py --smoke``).

It checks that the harness runs every scenario and writes the documented JSON shape.
It never looks at how fast anything was: timings are not asserted here or anywhere.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
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
    "processes",
    "web",
}
GUARDED = ("naive", "cachetools", "creditguard")
ADMISSION_FIELDS = (
    "false_refusals",
    "overspent",
    "overspent_calls",
    "reads_per_call",
    "refused",
    "busy",
    "failed",
    "calls",
    "balance",
    "unspent",
    "cost",
    "seconds",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One smoke run per test session, shared by the pytest-xdist workers: the first worker
    to need it runs it under a lock; the others wait for it and read what it wrote."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "bench-smoke-results.json"
    done = shared / "bench-smoke-done.json"
    with (shared / "bench-smoke.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not done.exists():
            proc = subprocess.run(
                [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--json", str(out)],
                capture_output=True,
                text=True,
                timeout=900,  # against a hang only: about a minute, more on a busy machine
                cwd=ROOT,
                check=False,
            )
            outcome = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
            done.write_text(json.dumps(outcome), encoding="utf-8")
    outcome = json.loads(done.read_text(encoding="utf-8"))
    assert outcome["returncode"] == 0, outcome["stderr"][-4000:]
    return json.loads(out.read_text(encoding="utf-8")), str(outcome["stdout"])


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
    for name in ("overhead_sync", "overhead_async", "overhead_async_trio"):
        expected = {"bare", "naive", "cachetools", "creditguard", "http_read"}
        expected |= {"creditguard_redis", "creditguard_redis_read", "redis_ping", "redis_evalsha"}
        assert expected | {"creditguard_logic", "creditguard_redis_logic"} <= set(scenarios[name])
    reads = scenarios["reads_per_call"]
    for variant in GUARDED:
        for level in ("async1", "async10", "async100", "async1000"):
            assert f"{variant}@{level}" in reads
        for level in ("threads1", "threads8", "threads32"):
            assert f"{variant}@{level}" in reads
    # CI installs redis-server (.ci/run), so the run has one: the Redis flavour runs too
    # (in a smoke run at fewer levels, to keep it short).
    settings = smoke[0]["run"]["settings"]
    redis_levels = [f"async{n}" for n in settings["redis_async_levels"]]
    redis_levels += [f"threads{n}" for n in settings["redis_thread_levels"]]
    assert redis_levels
    assert {v for v in reads if v.startswith("creditguard_redis@")} == {
        f"creditguard_redis@{level}" for level in redis_levels
    }
    e2e = scenarios["e2e_throughput"]
    for variant in ("bare", "naive", "creditguard"):
        assert f"{variant}@async100" in e2e
        assert any(name.startswith(f"{variant}@threads") for name in e2e)
    for variant in ("bare", "creditguard", "creditguard_spend"):
        for level in ("async1", "threads1", "async10", "async100", "threads8"):
            assert f"{variant}@{level}" in e2e
    for variant in (
        "bare",
        "one_read",
        "naive",
        "cachetools",
        "creditguard",
        "creditguard_spend",
        "http_read",
        "bare_report",
        "creditguard_report",
    ):
        assert f"{variant}@async1" in e2e
        assert f"{variant}@threads1" in e2e
    assert "creditguard" in scenarios["memory_10k_keys"]
    # Redis runs where it is meant to (the overhead scenarios, reads_per_call, processes,
    # gate, web).
    for name in ("e2e_throughput", "memory_10k_keys", "admission_efficiency"):
        assert not any("redis" in variant for variant in scenarios[name]), name


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


def test_redis_counts(smoke: tuple[dict[str, Any], str]) -> None:
    """The run had its own redis-server, and the Redis variants count their round trips
    and the commands Redis executed (no figure is judged here)."""
    data = smoke[0]
    assert data["run"]["redis"]["server"]
    assert "creditguard_redis" in data["run"]["guards"]
    scenarios = data["scenarios"]
    for name in ("overhead_sync", "overhead_async"):
        entries = scenarios[name]
        for variant in ("creditguard_redis", "creditguard_redis_read", "redis_evalsha"):
            assert entries[variant]["round_trips_per_call"] >= 1, (name, variant)
            assert entries[variant]["redis_cmds_per_call"] >= 1, (name, variant)
        assert entries["redis_ping"]["round_trips_per_call"] == 1.0
        assert "round_trips_per_call" not in entries["creditguard"]
    for variant, entry in scenarios["reads_per_call"].items():
        assert ("round_trips_per_call" in entry) == variant.startswith("creditguard_redis@")


def test_processes_shape(smoke: tuple[dict[str, Any], str]) -> None:
    """bare, memory and redis side by side; the counts add up (no figure is judged)."""
    data = smoke[0]
    entries = data["scenarios"]["processes"]
    settings = data["run"]["settings"]
    assert list(entries) == ["bare", "memory", "redis"]
    calls = settings["processes_workers"] * settings["processes_tasks"]
    calls *= settings["processes_calls"]
    for variant, entry in entries.items():
        assert entry["unit"] == "calls/s", variant
        assert entry["min"] > 0, variant
        assert entry["calls"] == calls, variant
        assert entry["balance"] == calls // settings["processes_demand"], variant
        assert 0 <= entry["spent"] <= 1, variant
        assert entry["overspent"] == entry["overspent_calls"], variant
        assert entry["overspent"] + entry["refused"] <= calls, variant
        for name in ("reads_per_call", "paid_reads_per_call", "short_seconds"):
            assert math.isfinite(entry[name]), (variant, name)
            assert entry[name] >= 0, (variant, name)
        assert entry["paid_refused"] == 0, variant
    # Unguarded, every call is made: the calls beyond the balance are all overspent.
    assert entries["bare"]["overspent"] == calls - entries["bare"]["balance"]
    assert entries["bare"]["refused"] == 0
    for variant in ("memory", "redis"):
        assert entries[variant]["vs_bare"] > 0
    redis = entries["redis"]
    for name in ("round_trips_per_call", "paid_round_trips_per_call"):
        assert redis[name] >= 1, name
    for name in ("redis_cmds_per_call", "paid_redis_cmds_per_call"):
        assert redis[name] >= redis[name.replace("redis_cmds", "round_trips")], name


def test_without_redis_server(tmp_path: Path) -> None:
    """No redis-server: the Redis variants are reported missing, the others still run."""
    out = tmp_path / "results.json"
    env = {**os.environ, "REDIS_SERVER": str(tmp_path / "no-redis-server")}
    args = ["--smoke", "--only", "overhead_sync", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert "no-redis-server" in data["run"]["redis"]["missing"]
    assert data["run"]["guards"] == ["creditguard"]
    entries = data["scenarios"]["overhead_sync"]
    assert "creditguard" in entries
    assert not any("redis" in variant for variant in entries)
    assert "missing: the Redis variants" in proc.stdout
    assert "Redis variants" in proc.stderr


def test_run_without_a_redis_scenario(tmp_path: Path) -> None:
    """A run none of whose scenarios wants Redis (``--only adapters``, ``--only
    memory_10k_keys``) has no Redis entry (``run.redis`` is ``None``): its tables print, as
    text and as Markdown, with no note of missing Redis variants."""
    out = tmp_path / "results.json"
    args = ["--smoke", "--only", "memory_10k_keys", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["run"]["redis"] is None
    assert list(data["scenarios"]) == ["memory_10k_keys"]
    assert "memory_10k_keys" in proc.stdout
    assert "missing:" not in proc.stdout
    shown = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--from-json", str(out), "--markdown"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr[-4000:]
    assert "**memory_10k_keys**" in shown.stdout
    assert "missing:" not in shown.stdout


def test_table_printed(smoke: tuple[dict[str, Any], str]) -> None:
    _, stdout = smoke
    for scenario in SCENARIOS:
        assert scenario in stdout
    assert "creditguard@async1000" in stdout
    assert "creditguard_redis@async100" in stdout
    assert "missing:" not in stdout
    assert "creditguard@threads4_c1_ttl_short_demand1x" in stdout
    assert "creditguard_spend@async1" in stdout
    assert "fastapi_redis@seq" in stdout
    assert "flask_memory@conc50" in stdout


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
    admission = plot.admission_series(data)
    assert set(admission) == {"cachetools", "creditguard"}
    assert all(0 <= spent <= 1 for rows in admission.values() for _, spent, _, _ in rows)
    assert [row[0] for row in plot.processes_series(data)] == ["bare", "memory", "redis"]
    assert [row[0] for row in plot.gate_series(data)] == ["no_gate", "gate_1", "gate_1_redis"]
    assert "fastapi" in [row[0] for row in plot.adapters_series(data)]


def test_admission_efficiency_shape(smoke: tuple[dict[str, Any], str]) -> None:
    """One variant per guard and case, named ``<guard>@<async|threads><N>_c<cost>_ttl_<short|
    long>`` (twice the demand the balance pays for) or with a ``_demand<D>x`` suffix, and at
    twice the demand also with ``_fail33`` (one admitted call in three fails upstream), with
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
    expected |= {f"{variant}_fail33" for variant in expected if "_demand" not in variant}
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
        assert entry["failed"] == 0 or variant.endswith("_fail33"), variant
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
    for key in (
        "e2e_async1_vs_bare",
        "e2e_threads1_vs_bare",
        "e2e_async10_vs_bare",
        "e2e_threads8_vs_bare",
        "e2e_async100_vs_bare",
        "e2e_sequential_async_extra_reads",
        "e2e_sequential_threads_extra_reads",
    ):
        entry = targets[f"creditguard_spend.{key}"]
        assert math.isfinite(entry["value"]), key
        assert isinstance(entry["met"], bool), key
    for framework in ("fastapi", "flask"):
        for key in ("memory_seq_vs_unguarded", "memory_seq_reads_per_request"):
            entry = targets[f"web.{framework}_{key}"]
            assert math.isfinite(entry["value"]), key
            assert isinstance(entry["met"], bool), key
        entry = targets[f"web.{framework}_redis_seq_p50_over_memory_ms"]
        assert math.isfinite(entry["value"])
        assert isinstance(entry["met"], bool)
    for key in (
        "creditguard_redis.round_trips_sync",
        "creditguard_redis.round_trips_async",
        "creditguard_redis.logic_sync_beyond_rt_us",
        "creditguard_redis.logic_async_beyond_rt_us",
        "processes.redis_overspent",
        "processes.redis_reads_per_call",
        "processes.redis_paid_round_trips",
    ):
        assert math.isfinite(targets[key]["value"]), key
        assert isinstance(targets[key]["met"], bool), key
    admission = targets["creditguard.admission_efficiency"]
    assert 0 <= admission["value"] <= 1
    assert isinstance(admission["met"], bool)


def test_web_shape(smoke: tuple[dict[str, Any], str]) -> None:
    """Each framework's app unguarded, on the memory and on the Redis backend, one request
    at a time and from many clients, with every documented figure; the counts add up (no
    figure is judged here)."""
    data = smoke[0]
    entries = data["scenarios"]["web"]
    settings = data["run"]["settings"]
    conc = settings["web_concurrency"]
    levels = {"seq": settings["web_sequential_requests"], f"conc{conc}": None}
    assert set(entries) == {
        f"{framework}_{kind}@{level}"
        for framework in ("fastapi", "flask")
        for kind in ("unguarded", "memory", "redis")
        for level in levels
    }
    block = 10
    for variant, entry in entries.items():
        assert entry["unit"] == "req/s", variant
        assert entry["min"] > 0, variant
        level = variant.split("@")[1]
        if level == "seq":
            expected = math.ceil(settings["web_sequential_requests"] / block) * block
        else:
            expected = math.ceil(settings["web_concurrent_requests"] / conc) * conc
        assert entry["requests"] == expected, variant
        assert 0 < entry["p50_ms"] <= entry["p99_ms"], variant
        assert math.isfinite(entry["reads_per_request"]), variant
        assert entry["reads_per_request"] >= 0, variant
        assert entry["vs_unguarded"] > 0, variant
        if "_unguarded@" in variant:
            assert entry["vs_unguarded"] == 1.0, variant
        if "_redis@" in variant:
            assert entry["round_trips_per_request"] >= 0, variant
        else:
            assert "round_trips_per_request" not in entry, variant
