"""``reads_per_call``: upstream balance reads per guarded call under concurrency (asyncio
tasks and threads), against the in-memory sandbox with 5 ms latency. The Redis flavours
also count their Redis round trips per call (``round_trips_per_call``)."""

from __future__ import annotations

import functools
import math

import _redis
import anyio
import httpx
from _harness import (
    BASE_URL,
    GUARDS,
    REDIS_FLAVOURS,
    Recorder,
    Settings,
    Targets,
    add_target,
    flavours,
    median_of,
    rotated,
)
from _variants import (
    async_charge_action,
    build_async,
    build_sync,
    charge_action,
    new_fake,
    run_tasks,
    run_threads,
)

SCENARIO = "reads_per_call"
USES_REDIS = True

# reads per call, calls, seconds, calls per worker, Redis round trips per call
Result = tuple[float, int, float, int, float]


def _per_worker(settings: Settings, workers: int) -> int:
    wanted = math.ceil(settings.rpc_calls / workers)
    return max(settings.rpc_min_per_worker, min(settings.rpc_max_per_worker, wanted))


def _reads_threads(settings: Settings, name: str, workers: int) -> Result:
    fake = new_fake(settings.latency)
    with httpx.Client(transport=fake.transport, base_url=BASE_URL) as client:
        variant = build_sync(
            name, charge_action(client), client=client, base_url=BASE_URL, transport=fake.transport
        )
        try:
            variant.call()  # warm-up: the first read of a cold cache is not counted
            before, charges = fake.balance_requests, fake.charges
            per_worker = _per_worker(settings, workers)
            with _redis.count_round_trips() as trips:
                elapsed = run_threads(variant.call, workers, per_worker)
            calls = workers * per_worker
            assert fake.charges - charges == calls
            reads = (fake.balance_requests - before) / calls
            return reads, calls, elapsed, per_worker, trips.count / calls
        finally:
            variant.close()


async def _reads_tasks(settings: Settings, name: str, workers: int) -> Result:
    fake = new_fake(settings.latency)
    async with httpx.AsyncClient(transport=fake.transport, base_url=BASE_URL) as client:
        variant = build_async(
            name,
            async_charge_action(client),
            client=client,
            base_url=BASE_URL,
            transport=fake.transport,
        )
        try:
            await variant.call()
            before, charges = fake.balance_requests, fake.charges
            per_worker = _per_worker(settings, workers)
            with _redis.count_round_trips() as trips:
                elapsed = await run_tasks(variant.call, workers, per_worker)
            calls = workers * per_worker
            assert fake.charges - charges == calls
            reads = (fake.balance_requests - before) / calls
            return reads, calls, elapsed, per_worker, trips.count / calls
        finally:
            await variant.aclose()


def _runs_at(settings: Settings, name: str, kind: str, workers: int) -> bool:
    """Whether ``name`` runs at this level (Redis flavours: maybe fewer levels)."""
    if name not in REDIS_FLAVOURS:
        return True
    if kind == "async":
        return workers in (settings.redis_async_levels or settings.async_levels)
    return workers in (settings.redis_thread_levels or settings.thread_levels)


def run(settings: Settings, rec: Recorder) -> None:
    names = ["naive", "cachetools", *flavours(redis=True)]
    levels = [("async", n) for n in settings.async_levels]
    levels += [("threads", n) for n in settings.thread_levels]
    for r in range(settings.rounds):
        for kind, workers in levels:
            for name in rotated(names, r):
                if not _runs_at(settings, name, kind, workers):
                    continue
                if kind == "async":
                    result = anyio.run(_reads_tasks, settings, name, workers, backend="asyncio")
                else:
                    result = _reads_threads(settings, name, workers)
                reads, calls, elapsed, per_worker, trips = result
                extra = {"round_trips_per_call": trips} if name in REDIS_FLAVOURS else {}
                rec.add(
                    "reads_per_call",
                    f"{name}@{kind}{workers}",
                    reads,
                    "reads/call",
                    calls=calls,
                    calls_per_worker=per_worker,
                    calls_per_s=calls / elapsed,
                    **extra,
                )


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    for g in GUARDS:  # a flavour not measured has no value, so no entry
        target(
            f"{g}.reads_per_call_async1000",
            "upstream reads per guarded call, 1000 concurrent tasks",
            median_of(rec, "reads_per_call", f"{g}@async1000"),
            "<",
            0.01,
        )
    return out
