"""``overhead_sync``, ``overhead_async``, ``overhead_async_trio``: sequential per-call time
of a guarded no-op against a zero-latency in-memory upstream."""

from __future__ import annotations

import functools

import anyio
import httpx
from _harness import (
    API_KEY,
    BASE_URL,
    GUARDS,
    TTL,
    Recorder,
    Settings,
    Targets,
    add_target,
    median_of,
    median_ratio,
    rotated,
)
from _variants import (
    AsyncBalanceReader,
    AsyncCachetoolsGuard,
    AsyncCall,
    AsyncFloorReader,
    AsyncNaiveGuard,
    AsyncSendReader,
    BalanceReader,
    CachetoolsGuard,
    FloorReader,
    NaiveGuard,
    SendReader,
    StaticUpstream,
    SyncCall,
    anoop,
    aper_call_us,
    noop,
    per_call_us,
)

from creditguard import CreditGuard

SCENARIO = ("overhead_sync", "overhead_async", "overhead_async_trio")


def _record_overhead(
    rec: Recorder,
    scenario: str,
    timings: dict[str, float],
    reads: dict[str, float],
) -> None:
    for name, us in timings.items():
        rec.add(scenario, name, us, "us/call", reads_per_call=reads[name])
    for name in GUARDS:
        # The guard's own logic: what is left once the action and its upstream reads
        # (priced at one plain httpx read on the same transport) are taken out.
        logic = timings[name] - timings["bare"] - reads[name] * timings["http_read"]
        rec.add(scenario, f"{name}_logic", logic, "us/call")


def _overhead_guards(upstream: StaticUpstream) -> dict[str, CreditGuard]:
    """One guard per library variant, all on the same in-memory upstream."""
    return {
        name: factory(api_key=API_KEY, base_url=BASE_URL, transport=upstream.transport, ttl=TTL)
        for name, factory in GUARDS.items()
    }


def bench_overhead_sync(settings: Settings, rec: Recorder) -> None:
    upstream = StaticUpstream()
    client = httpx.Client(transport=upstream.transport)
    reader = BalanceReader(client, BASE_URL)
    variants: dict[str, SyncCall] = {
        "bare": noop,
        "http_read": FloorReader(upstream.transport, BASE_URL).read,
        "http_send": SendReader(client, BASE_URL).read,
        "http_get": reader.read,
        "naive": NaiveGuard(reader).requires_credits(1)(noop),
        "cachetools": CachetoolsGuard(reader).requires_credits(1)(noop),
    }
    guards = _overhead_guards(upstream)
    for name, guard in guards.items():
        variants[name] = guard.requires_credits(1)(noop)
        # The guard's own balance read (no admission): its read path vs a plain httpx GET.
        variants[f"{name}_read"] = functools.partial(guard.balance, refresh=True)
    n = settings.overhead_calls
    warmup = max(5, n // 10)
    try:
        for r in range(settings.rounds):
            timings: dict[str, float] = {}
            reads: dict[str, float] = {}
            for name in rotated(list(variants), r):
                call = variants[name]
                for _ in range(warmup):
                    call()
                before = upstream.requests
                timings[name] = per_call_us(call, n)
                reads[name] = (upstream.requests - before) / n
            _record_overhead(rec, "overhead_sync", timings, reads)
    finally:
        for guard in guards.values():
            guard.close()
        client.close()


async def _overhead_async(settings: Settings, rec: Recorder, scenario: str) -> None:
    upstream = StaticUpstream()
    async with httpx.AsyncClient(transport=upstream.transport) as client:
        reader = AsyncBalanceReader(client, BASE_URL)
        variants: dict[str, AsyncCall] = {
            "bare": anoop,
            "http_read": AsyncFloorReader(upstream.transport, BASE_URL).read,
            "http_send": AsyncSendReader(client, BASE_URL).read,
            "http_get": reader.read,
            "naive": AsyncNaiveGuard(reader).requires_credits(1)(anoop),
            "cachetools": AsyncCachetoolsGuard(reader).requires_credits(1)(anoop),
        }
        guards = _overhead_guards(upstream)
        for name, guard in guards.items():
            variants[name] = guard.requires_credits(1)(anoop)
            variants[f"{name}_read"] = functools.partial(guard.abalance, refresh=True)
        n = settings.overhead_calls
        warmup = max(5, n // 10)
        try:
            for r in range(settings.rounds):
                timings: dict[str, float] = {}
                reads: dict[str, float] = {}
                for name in rotated(list(variants), r):
                    call = variants[name]
                    for _ in range(warmup):
                        await call()
                    before = upstream.requests
                    timings[name] = await aper_call_us(call, n)
                    reads[name] = (upstream.requests - before) / n
                _record_overhead(rec, scenario, timings, reads)
        finally:
            for guard in guards.values():
                await guard.aclose()


def bench_overhead_async(settings: Settings, rec: Recorder) -> None:
    anyio.run(_overhead_async, settings, rec, "overhead_async", backend="asyncio")


def bench_overhead_async_trio(settings: Settings, rec: Recorder) -> None:
    anyio.run(_overhead_async, settings, rec, "overhead_async_trio", backend="trio")


def run(settings: Settings, rec: Recorder, scenario: str) -> None:
    {
        "overhead_sync": bench_overhead_sync,
        "overhead_async": bench_overhead_async,
        "overhead_async_trio": bench_overhead_async_trio,
    }[scenario](settings, rec)


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    for g in GUARDS:
        target(
            f"{g}.logic_sync_us",
            "guard's own logic per sequential sync call (us)",
            median_of(rec, "overhead_sync", f"{g}_logic"),
            "<",
            8,
        )
        target(
            f"{g}.logic_async_us",
            "guard's own logic per sequential async call (us, asyncio)",
            median_of(rec, "overhead_async", f"{g}_logic"),
            "<",
            15,
        )
        target(
            f"{g}.sequential_vs_naive_sync",
            "sequential sync guarded call / naive guard's (median of per-round ratios)",
            median_ratio(rec, "overhead_sync", g, "naive"),
            "<=",
            0.6,
        )
        target(
            f"{g}.sequential_vs_naive_async",
            "sequential async guarded call / naive guard's (median of per-round ratios)",
            median_ratio(rec, "overhead_async", g, "naive"),
            "<=",
            0.6,
        )
    return out
