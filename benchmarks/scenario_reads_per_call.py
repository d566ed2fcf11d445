"""``reads_per_call``: upstream balance reads per guarded call under concurrency (asyncio
tasks and threads), against the in-memory sandbox with 5 ms latency."""

from __future__ import annotations

import functools
import math

import anyio
import httpx
from _harness import (
    BASE_URL,
    GUARDS,
    Recorder,
    Settings,
    Targets,
    add_target,
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


def _per_worker(settings: Settings, workers: int) -> int:
    wanted = math.ceil(settings.rpc_calls / workers)
    return max(settings.rpc_min_per_worker, min(settings.rpc_max_per_worker, wanted))


def _reads_threads(settings: Settings, name: str, workers: int) -> tuple[float, int, float, int]:
    fake = new_fake(settings.latency)
    with httpx.Client(transport=fake.transport, base_url=BASE_URL) as client:
        variant = build_sync(
            name, charge_action(client), client=client, base_url=BASE_URL, transport=fake.transport
        )
        try:
            variant.call()  # warm-up: the first read of a cold cache is not counted
            before, charges = fake.balance_requests, fake.charges
            per_worker = _per_worker(settings, workers)
            elapsed = run_threads(variant.call, workers, per_worker)
            calls = workers * per_worker
            assert fake.charges - charges == calls
            return (fake.balance_requests - before) / calls, calls, elapsed, per_worker
        finally:
            variant.close()


async def _reads_tasks(
    settings: Settings, name: str, workers: int
) -> tuple[float, int, float, int]:
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
            elapsed = await run_tasks(variant.call, workers, per_worker)
            calls = workers * per_worker
            assert fake.charges - charges == calls
            return (fake.balance_requests - before) / calls, calls, elapsed, per_worker
        finally:
            await variant.aclose()


def run(settings: Settings, rec: Recorder) -> None:
    names = ["naive", "cachetools", *GUARDS]
    levels = [("async", n) for n in settings.async_levels]
    levels += [("threads", n) for n in settings.thread_levels]
    for r in range(settings.rounds):
        for kind, workers in levels:
            for name in rotated(names, r):
                if kind == "async":
                    result = anyio.run(_reads_tasks, settings, name, workers, backend="asyncio")
                else:
                    result = _reads_threads(settings, name, workers)
                reads, calls, elapsed, per_worker = result
                rec.add(
                    "reads_per_call",
                    f"{name}@{kind}{workers}",
                    reads,
                    "reads/call",
                    calls=calls,
                    calls_per_worker=per_worker,
                    calls_per_s=calls / elapsed,
                )


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    for g in GUARDS:
        target(
            f"{g}.reads_per_call_async1000",
            "upstream reads per guarded call, 1000 concurrent tasks",
            median_of(rec, "reads_per_call", f"{g}@async1000"),
            "<",
            0.01,
        )
    return out
