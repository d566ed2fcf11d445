"""Shared pieces of the benchmark harness: settings, the guard flavours, the results
recorder, targets helpers, the machine description and the output tables."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import _redis

from creditguard import CreditGuard, MemoryBackend

if TYPE_CHECKING:
    from creditguard.redis import RedisBackend

T = TypeVar("T")

API_KEY = "bench-key"
BASE_URL = "https://lensmor.bench.invalid"  # in-memory transports answer any host
BALANCE_PATH = "/external/credits/balance"  # documented Lensmor endpoint
CHARGE_PATH = "/sandbox/charge"  # FakeLensmor's sandbox-only paid call
TTL = 5.0  # the library default; the cachetools variant uses the same
PLENTY = 10**12  # credits: no benchmark ever runs out
UPSTREAM_LATENCY = 0.005


# --------------------------------------------------------------------------------------
# Guard flavours: each entry is benchmarked as a variant of that name. The in-memory ones
# run in every scenario; those on Redis (REDIS_FLAVOURS) in the scenarios that declare
# ``USES_REDIS = True``, for which run.py starts a redis-server (see flavours()).


def memory_guard(**kwargs: Any) -> CreditGuard:
    return CreditGuard(backend=MemoryBackend(), **kwargs)


class RedisBenchGuard(CreditGuard):
    """A guard on a RedisBackend of its own, which closing the guard closes too (a guard
    leaves a backend it was given open: it may be shared)."""

    __slots__ = ("_redis_backend",)

    def __init__(self, backend: RedisBackend, **kwargs: Any) -> None:
        super().__init__(backend=backend, **kwargs)
        self._redis_backend = backend

    def close(self) -> None:
        super().close()
        self._redis_backend.close()

    async def aclose(self) -> None:
        await super().aclose()
        await self._redis_backend.aclose()


def redis_guard(**kwargs: Any) -> CreditGuard:
    """A guard on the run's redis-server, with a key prefix of its own: every guard built
    starts on a fresh account state, as a memory guard does."""
    from creditguard.redis import RedisBackend

    if _redis.SERVER.url is None:
        raise RuntimeError(f"no redis-server for this run: {_redis.SERVER.missing}")
    backend = RedisBackend(_redis.SERVER.url, prefix=f"bench-{uuid.uuid4().hex[:12]}:")
    return RedisBenchGuard(backend, **kwargs)


GUARDS: dict[str, Callable[..., CreditGuard]] = {
    "creditguard": memory_guard,
    "creditguard_redis": redis_guard,
}
REDIS_FLAVOURS = frozenset({"creditguard_redis"})


def flavours(*, redis: bool = False) -> list[str]:
    """The guard flavours a scenario benchmarks: the in-memory ones, and with ``redis``
    (a scenario with ``USES_REDIS = True``) those on Redis too, when the run has a
    redis-server (when not, run.py reports them missing)."""
    with_redis = redis and _redis.SERVER.url is not None
    return [name for name in GUARDS if with_redis or name not in REDIS_FLAVOURS]


# --------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    rounds: int
    overhead_calls: int  # sequential guarded calls per variant and round
    rpc_calls: int  # target number of calls per reads_per_call measurement
    rpc_min_per_worker: int
    rpc_max_per_worker: int
    e2e_async_calls: int
    e2e_sync_calls: int
    e2e_sequential_calls: int  # per variant and round at concurrency 1 (async1, threads1)
    memory_keys: int
    async_levels: tuple[int, ...] = (1, 10, 100, 1000)
    thread_levels: tuple[int, ...] = (1, 8, 32)
    # reads_per_call levels of the Redis flavours (None: the levels above)
    redis_async_levels: tuple[int, ...] | None = None
    redis_thread_levels: tuple[int, ...] | None = None
    e2e_concurrency: int = 100  # the level the e2e target is checked at
    # Also async10: below the point where the client process is CPU-bound, so the
    # latency a guard adds to each call shows in the throughput.
    e2e_async_levels: tuple[int, ...] = (10, 100)
    e2e_threads: int = 8
    latency: float = UPSTREAM_LATENCY
    # admission_efficiency: the starting balance pays for this many calls of each cost;
    # the demand is that many times as many calls (rounded up to whole calls per worker).
    admission_calls_paid: int = 400
    admission_demands: tuple[int, ...] = (2, 1)
    admission_async: int = 200  # concurrent tasks
    admission_threads: int = 16
    admission_costs: tuple[int, ...] = (1, 10)  # credits per call
    admission_ttl_short: float = 0.05  # s: far below a burst's duration
    admission_ttl_long: float = 60.0  # s: outlives a burst
    # processes: worker processes (spawned), each with this many asyncio tasks, each task
    # making this many calls per burst; the short burst's balance pays for 1/demand of it.
    processes_workers: int = 4
    processes_tasks: int = 25
    processes_calls: int = 10
    processes_demand: int = 2
    # web: requests per app and round, one at a time and from web_concurrency clients
    web_sequential_requests: int = 300
    web_concurrent_requests: int = 3000
    web_concurrency: int = 50


MODES: dict[str, Settings] = {
    "full": Settings(
        "full",
        rounds=5,
        overhead_calls=5000,
        rpc_calls=2000,
        rpc_min_per_worker=3,
        rpc_max_per_worker=50,
        e2e_async_calls=2000,
        e2e_sync_calls=1200,
        e2e_sequential_calls=300,
        memory_keys=10_000,
        processes_calls=20,
    ),
    "quick": Settings(
        "quick",
        rounds=3,
        overhead_calls=1500,
        rpc_calls=300,
        rpc_min_per_worker=2,
        rpc_max_per_worker=12,
        e2e_async_calls=600,
        e2e_sync_calls=300,
        e2e_sequential_calls=60,
        memory_keys=10_000,
        processes_calls=8,
        web_sequential_requests=100,
        web_concurrent_requests=1000,
    ),
    "smoke": Settings(
        "smoke",
        rounds=2,
        overhead_calls=20,
        rpc_calls=10,
        rpc_min_per_worker=1,
        rpc_max_per_worker=2,
        e2e_async_calls=100,
        e2e_sync_calls=16,
        e2e_sequential_calls=6,
        memory_keys=100,
        admission_calls_paid=10,
        admission_async=20,
        admission_threads=4,
        admission_costs=(1,),
        processes_workers=2,
        processes_tasks=4,
        processes_calls=2,
        redis_async_levels=(1, 100),
        redis_thread_levels=(8,),
        web_sequential_requests=10,
        web_concurrent_requests=50,
    ),
}


# --------------------------------------------------------------------------------------
# Results


class Recorder:
    """Per-round samples of every (scenario, variant), summarised at the end."""

    def __init__(self) -> None:
        self._samples: dict[str, dict[str, list[float]]] = {}
        self._units: dict[tuple[str, str], str] = {}
        self._extra: dict[tuple[str, str], dict[str, list[float]]] = {}

    def add(self, scenario: str, variant: str, value: float, unit: str, **extra: float) -> None:
        self._samples.setdefault(scenario, {}).setdefault(variant, []).append(value)
        self._units[scenario, variant] = unit
        fields = self._extra.setdefault((scenario, variant), {})
        for name, x in extra.items():
            fields.setdefault(name, []).append(x)

    def variants(self, scenario: str) -> list[str]:
        """The variants recorded under ``scenario``, in the order first recorded."""
        return list(self._samples.get(scenario, {}))

    def values(self, scenario: str, variant: str) -> list[float]:
        return self._samples.get(scenario, {}).get(variant, [])

    def extras(self, scenario: str, variant: str, name: str) -> list[float]:
        """Per-round values of an extra field."""
        return self._extra.get((scenario, variant), {}).get(name, [])

    def to_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for scenario, variants in self._samples.items():
            for variant, values in variants.items():
                entry: dict[str, Any] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "unit": self._units[scenario, variant],
                    "rounds": len(values),
                    "samples": values,
                }
                for name, xs in self._extra[scenario, variant].items():
                    entry[name] = statistics.median(xs)
                out.setdefault(scenario, {})[variant] = entry
        return out


def rotated(items: Sequence[T], k: int) -> list[T]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Targets the library aims at (reported, never asserted)

Targets = dict[str, dict[str, Any]]


def median_ratio(rec: Recorder, scenario: str, num: str, den: str) -> float | None:
    a, b = rec.values(scenario, num), rec.values(scenario, den)
    if not a or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def median_of(rec: Recorder, scenario: str, variant: str) -> float | None:
    values = rec.values(scenario, variant)
    return statistics.median(values) if values else None


def add_target(
    out: Targets, key: str, what: str, value: float | None, op: str, limit: float
) -> None:
    """Record ``value`` against ``op limit`` (``<``, ``<=`` or ``>=``); no value, no entry."""
    if value is None:
        return
    met = value < limit if op == "<" else value <= limit if op == "<=" else value >= limit
    out[key] = {"what": what, "value": value, "target": f"{op} {limit:g}", "met": met}


# --------------------------------------------------------------------------------------
# Machine description and output


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        result = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [git, *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _git_commit() -> str | None:
    return (_git("rev-parse", "--short", "HEAD") or "").strip() or None


def _library_changes() -> list[str] | None:
    """Files of the package changed since the commit (what was measured is not HEAD)."""
    status = _git("status", "--porcelain", "--", "../creditguard")
    return None if status is None else [line[3:] for line in status.splitlines()]


def machine_info() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {
            dist: _version(dist)
            for dist in (
                "creditguard",
                "httpx",
                "anyio",
                "trio",
                "uvicorn",
                "cachetools",
                "redis",
            )
        },
        "git_commit": _git_commit(),
        "uncommitted_library_changes": _library_changes(),
    }


def _fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


# Extra fields shown as columns of a scenario's table: (field, column title).
_OVERHEAD_EXTRAS = (("reads_per_call", "reads/call"), ("round_trips_per_call", "Redis RT"))
TABLE_EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "overhead_sync": _OVERHEAD_EXTRAS,
    "overhead_async": _OVERHEAD_EXTRAS,
    "overhead_async_trio": _OVERHEAD_EXTRAS,
    "reads_per_call": (("round_trips_per_call", "Redis RT"),),
    "processes": (
        ("vs_bare", "vs bare"),
        ("overspent", "overspent"),
        ("refused", "refused"),
        ("reads_per_call", "reads/call"),
        ("round_trips_per_call", "Redis RT"),
        ("paid_reads_per_call", "paid reads"),
        ("paid_round_trips_per_call", "paid RT"),
    ),
    "web": (
        ("vs_unguarded", "vs ungd."),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("reads_per_request", "reads/req"),
        ("round_trips_per_request", "Redis RT"),
    ),
    "admission_efficiency": (
        ("false_refusals", "false ref."),
        ("overspent", "overspent"),
        ("reads_per_call", "reads/call"),
        ("refused_p50_ms", "ref. p50 ms"),
        ("refused_p99_ms", "ref. p99 ms"),
    ),
}


# The variants a run without Redis leaves out (for the note below).
REDIS_VARIANTS = (*sorted(REDIS_FLAVOURS), "processes/redis")


def _missing_note(results: dict[str, Any]) -> str | None:
    """Why the Redis variants are not in the tables, when they were wanted but missing."""
    # ``run.redis`` is None when no scenario of the run wanted Redis (``--only adapters``).
    redis = (results.get("run") or {}).get("redis") or {}
    reason = redis.get("missing")
    if not reason:
        return None
    return f"missing: the Redis variants ({', '.join(REDIS_VARIANTS)}) did not run: {reason}"


def format_table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for scenario, variants in results["scenarios"].items():
        width = max(26, *(len(variant) for variant in variants))
        extras = TABLE_EXTRAS.get(scenario, ())
        unit_width = max(len(e["unit"]) for e in variants.values()) if extras else 0
        header = (
            f"{'scenario':<20} {'variant':<{width}} {'median':>10} {'min':>10} {'max':>10}  unit"
        )
        if extras:
            header = header.ljust(len(header) - 4 + unit_width)
            header += "".join(f" {title:>11}" for _, title in extras)
        lines += ["", header, "-" * len(header)]
        for variant, e in variants.items():
            line = (
                f"{scenario:<20} {variant:<{width}} {_fmt(e['median']):>10} {_fmt(e['min']):>10}"
                f" {_fmt(e['max']):>10}  {e['unit']}"
            )
            if extras:
                line = line.ljust(len(line) - len(e["unit"]) + unit_width)
                line += "".join(
                    f" {'' if e.get(name) is None else _fmt(e[name]):>11}" for name, _ in extras
                )
            lines.append(line)
    missing = _missing_note(results)
    if missing:
        lines += ["", missing]
    if results.get("targets"):
        lines += ["", "targets (not asserted; medians from this run)"]
        for key, t in results["targets"].items():
            status = "met" if t["met"] else "NOT met"
            lines.append(f"  {key:<40} {_fmt(t['value']):>10}  {t['target']:<8} {status}")
    return "\n".join(lines).lstrip("\n")


def format_markdown(results: dict[str, Any]) -> str:
    """The same results as Markdown tables (for docs/benchmarks.md)."""
    lines: list[str] = []
    for scenario, variants in results["scenarios"].items():
        extras = TABLE_EXTRAS.get(scenario)
        if extras is None:
            reads = any("reads_per_call" in e for e in variants.values())
            extras = (("reads_per_call", "reads/call"),) if reads else ()
        lines += [
            "",
            f"**{scenario}**",
            "",
            "| variant | median | min | max | unit |" + "".join(f" {t} |" for _, t in extras),
            "|---|--:|--:|--:|---|" + "--:|" * len(extras),
        ]
        for variant, e in variants.items():
            row = (
                f"| `{variant}` | {_fmt(e['median'])} | {_fmt(e['min'])} | {_fmt(e['max'])}"
                f" | {e['unit']} |"
            )
            for name, _ in extras:
                value = e.get(name)
                row += f" {'' if value is None else _fmt(value)} |"
            lines.append(row)
    missing = _missing_note(results)
    if missing:
        lines += ["", missing]
    if results.get("targets"):
        lines += ["", "**targets**", "", "| target | value | goal | status |", "|---|--:|---|---|"]
        for key, t in results["targets"].items():
            status = "met" if t["met"] else "**not met**"
            lines.append(f"| `{key}` | {_fmt(t['value'])} | {t['target']} | {status} |")
    return "\n".join(lines).lstrip("\n")
