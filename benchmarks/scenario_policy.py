"""``policy``: what the spending policy costs a warm sequential guarded call: the same
decorated no-op with no policy (``<flavour>``) and with a floor and an allowance on every
call (``<flavour>_policy``: ``keep=100``, ``Allowance(10**12)`` per subject, one subject
per call out of 100), sync and async (asyncio), against a zero-latency in-memory
upstream. Redis variants count their round trips per call (in a pass of their own after
the warm-up, so the counting is not timed): the allowance is checked in the admission
script, so the policy adds none."""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics

import _redis
import anyio
from _harness import (
    API_KEY,
    BASE_URL,
    GUARDS,
    REDIS_FLAVOURS,
    TTL,
    Recorder,
    Settings,
    Targets,
    add_target,
    flavours,
    rotated,
)
from _variants import AsyncCall, StaticUpstream, SyncCall, anoop, aper_call_us, noop, per_call_us

from creditguard import Allowance, CreditGuard

SCENARIO = ("policy_sync", "policy_async")
USES_REDIS = True

SUBJECTS = 100  # calls cycle through this many subjects (each its own window)
MAX_ADDED_US = 2.0  # what the policy may add to the guard's own logic (memory)
MAX_ADDED_ROUND_TRIPS = 0.0


def _guards(upstream: StaticUpstream, names: list[str]) -> dict[str, CreditGuard]:
    out = {}
    for name in names:
        make = GUARDS[name]
        common = {"api_key": API_KEY, "base_url": BASE_URL, "transport": upstream.transport}
        out[name] = make(ttl=TTL, **common)
        out[f"{name}_policy"] = make(ttl=TTL, keep=100, allowance=Allowance(10**12), **common)
    return out


def _subject(counter: itertools.count[int]) -> str:
    return f"user-{next(counter) % SUBJECTS}"


def _measure(
    rec: Recorder, scenario: str, timings: dict[str, float], trips: dict[str, float]
) -> None:
    for name, us in timings.items():
        extra = {"round_trips_per_call": trips[name]} if name in trips else {}
        rec.add(scenario, name, us, "us/call", **extra)
    for name in list(timings):
        if name.endswith("_policy"):
            base = name.removesuffix("_policy")
            rec.add(scenario, f"{base}_policy_added", timings[name] - timings[base], "us/call")


def bench_sync(settings: Settings, rec: Recorder) -> None:
    upstream = StaticUpstream()
    n = settings.overhead_calls
    warmup = max(5, n // 10)
    with contextlib.ExitStack() as stack:
        variants: dict[str, SyncCall] = {"bare": noop}
        for name, guard in _guards(upstream, flavours(redis=True)).items():
            stack.callback(guard.close)
            if name.endswith("_policy"):
                subjects = itertools.count()
                variants[name] = guard.requires_credits(
                    1, subject=lambda subjects=subjects: _subject(subjects)
                )(noop)
            else:
                variants[name] = guard.requires_credits(1)(noop)
        for r in range(settings.rounds):
            timings: dict[str, float] = {}
            trips: dict[str, float] = {}
            for name in rotated(list(variants), r):
                call = variants[name]
                for _ in range(warmup):
                    call()
                if name.removesuffix("_policy") in REDIS_FLAVOURS:
                    with _redis.count_round_trips() as counted:
                        for _ in range(warmup):
                            call()
                    trips[name] = counted.count / warmup
                timings[name] = per_call_us(call, n)
            _measure(rec, "policy_sync", timings, trips)


async def _async(settings: Settings, rec: Recorder) -> None:
    upstream = StaticUpstream()
    n = settings.overhead_calls
    warmup = max(5, n // 10)
    async with contextlib.AsyncExitStack() as stack:
        variants: dict[str, AsyncCall] = {"bare": anoop}
        for name, guard in _guards(upstream, flavours(redis=True)).items():
            stack.push_async_callback(guard.aclose)
            if name.endswith("_policy"):
                subjects = itertools.count()
                variants[name] = guard.requires_credits(
                    1, subject=lambda subjects=subjects: _subject(subjects)
                )(anoop)
            else:
                variants[name] = guard.requires_credits(1)(anoop)
        for r in range(settings.rounds):
            timings: dict[str, float] = {}
            trips: dict[str, float] = {}
            for name in rotated(list(variants), r):
                call = variants[name]
                for _ in range(warmup):
                    await call()
                if name.removesuffix("_policy") in REDIS_FLAVOURS:
                    with _redis.count_round_trips() as counted:
                        for _ in range(warmup):
                            await call()
                    trips[name] = counted.count / warmup
                timings[name] = await aper_call_us(call, n)
            _measure(rec, "policy_async", timings, trips)


def bench_async(settings: Settings, rec: Recorder) -> None:
    anyio.run(_async, settings, rec, backend="asyncio")


def run(settings: Settings, rec: Recorder, scenario: str) -> None:
    {"policy_sync": bench_sync, "policy_async": bench_async}[scenario](settings, rec)


def _median(rec: Recorder, scenario: str, variant: str) -> float | None:
    values = rec.values(scenario, variant)
    return statistics.median(values) if values else None


def _trips_added(rec: Recorder, scenario: str, flavour: str) -> float | None:
    with_policy = rec.extras(scenario, f"{flavour}_policy", "round_trips_per_call")
    without = rec.extras(scenario, flavour, "round_trips_per_call")
    if not with_policy or not without:
        return None
    return statistics.median(with_policy) - statistics.median(without)


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    for kind in ("sync", "async"):
        scenario = f"policy_{kind}"
        for g in flavours():
            target(
                f"{g}.policy_added_{kind}_us",
                f"what a floor and an allowance on every call add per warm {kind} call (us;"
                " median of per-round differences)",
                _median(rec, scenario, f"{g}_policy_added"),
                "<=",
                MAX_ADDED_US,
            )
        for g in sorted(REDIS_FLAVOURS):
            target(
                f"{g}.policy_round_trips_{kind}",
                f"Redis round trips a floor and an allowance add per warm {kind} call",
                _trips_added(rec, scenario, g),
                "<=",
                MAX_ADDED_ROUND_TRIPS,
            )
    return out
