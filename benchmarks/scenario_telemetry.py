"""``telemetry``: what the OpenTelemetry instruments cost a warm sequential guarded call:
the same decorated no-op on guards with ``telemetry=False`` (``creditguard``) and with
telemetry on (``creditguard_telemetry``) and with metrics alone (``creditguard_metrics``:
``telemetry="metrics"``), sync and async (asyncio), against a zero-latency
in-memory upstream, with the OpenTelemetry SDK configured as an application would: a
``MeterProvider`` with a reader (an ``InMemoryMetricReader``, so every measurement is
aggregated; nothing is exported) and a ``TracerProvider`` (no span processor, so no
span is exported) set as the global providers.

The global providers can be set once per process, and every other scenario runs with
none (the API's no-op): the scenario measures in a process of its own (``spawn``). A
second such process, with no SDK, measures telemetry on with the API alone
(``creditguard_api``: what every guard pays by default when the application configures
no SDK)."""

from __future__ import annotations

import functools
import multiprocessing
import statistics
from typing import Any

import anyio
from _harness import API_KEY, BASE_URL, TTL, Recorder, Settings, Targets, add_target, rotated
from _variants import AsyncCall, StaticUpstream, SyncCall, anoop, aper_call_us, noop, per_call_us

from creditguard import CreditGuard, MemoryBackend

SCENARIO = ("telemetry_sync", "telemetry_async")
USES_REDIS = False

MAX_ADDED_US = 5.0  # what telemetry with an SDK may add to the guard's own logic
ON = "creditguard_telemetry"
METRICS = "creditguard_metrics"  # telemetry="metrics": no spans
SDK_SPAN = "sdk_span"  # the SDK alone: one span as the guard makes it
SDK_POINT = "sdk_histogram_point"  # the SDK alone: one histogram point
ACTION = "creditguard.action"
BEFORE = "creditguard.balance.before"
API = "creditguard_api"


def _configure_sdk() -> object:
    """The SDK as an application sets it up, without exporters (in this process only)."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    trace.set_tracer_provider(TracerProvider())
    return reader


def _guards(upstream: StaticUpstream, on: str) -> dict[str, CreditGuard]:
    common: dict[str, Any] = {
        "api_key": API_KEY,
        "base_url": BASE_URL,
        "transport": upstream.transport,
    }
    guards = {
        "creditguard": CreditGuard(backend=MemoryBackend(), ttl=TTL, telemetry=False, **common),
        on: CreditGuard(backend=MemoryBackend(), ttl=TTL, telemetry=True, **common),
    }
    if on == ON:  # with the SDK: metrics alone too
        guards[METRICS] = CreditGuard(
            backend=MemoryBackend(), ttl=TTL, telemetry="metrics", **common
        )
    return guards


def _sync(settings: Settings) -> list[dict[str, float]]:
    upstream = StaticUpstream()
    n = settings.overhead_calls
    warmup = max(5, n // 10)
    guards = _guards(upstream, ON if _configured else API)
    variants: dict[str, SyncCall] = {"bare": noop}
    for name, guard in guards.items():
        variants[name] = guard.requires_credits(1)(noop)
    if _configured:
        variants.update(_sdk_floor())
    rounds = []
    for r in range(settings.rounds):
        timings: dict[str, float] = {}
        for name in rotated(list(variants), r):
            call = variants[name]
            for _ in range(warmup):
                call()
            timings[name] = per_call_us(call, n)
        rounds.append(timings)
    for guard in guards.values():
        guard.close()
    return rounds


def _sdk_floor() -> dict[str, SyncCall]:
    """The SDK's own work per guarded call, timed alone: the span the guard makes of a warm
    decorated call (three attributes at its start, three at its end), and the histogram
    point of its admission (two attributes)."""
    from opentelemetry import metrics, trace

    tracer = trace.get_tracer("floor")
    histogram = metrics.get_meter("floor").create_histogram("floor.duration", unit="s")
    start = {"creditguard.account": "fingerprint", "creditguard.cost": 1, ACTION: "noop"}
    end = {"creditguard.outcome": "spent", "creditguard.charged": 1, BEFORE: 30050}
    point = {"creditguard.account": "fingerprint", "creditguard.outcome": "admitted"}

    def span() -> None:
        made = tracer.start_span("floor.spend", attributes=start)
        made.set_attributes(end)
        made.end()

    def histogram_point() -> None:
        histogram.record(0.000004, point)

    return {SDK_SPAN: span, SDK_POINT: histogram_point}


async def _async(settings: Settings) -> list[dict[str, float]]:
    upstream = StaticUpstream()
    n = settings.overhead_calls
    warmup = max(5, n // 10)
    guards = _guards(upstream, ON if _configured else API)
    variants: dict[str, AsyncCall] = {"bare": anoop}
    for name, guard in guards.items():
        variants[name] = guard.requires_credits(1)(anoop)
    rounds = []
    for r in range(settings.rounds):
        timings: dict[str, float] = {}
        for name in rotated(list(variants), r):
            call = variants[name]
            for _ in range(warmup):
                await call()
            timings[name] = await aper_call_us(call, n)
        rounds.append(timings)
    for guard in guards.values():
        await guard.aclose()
    return rounds


_configured = False


def _measure(kind: str, settings: Settings, sdk: bool) -> list[dict[str, float]]:
    """In the spawned process: configure the SDK (or not), then time the variants."""
    global _configured
    if sdk:
        _configure_sdk()
        _configured = True
    if kind == "sync":
        return _sync(settings)
    result: list[dict[str, float]] = anyio.run(_async, settings, backend="asyncio")
    return result


def _record(rec: Recorder, scenario: str, rounds: list[dict[str, float]], on: str) -> None:
    for timings in rounds:
        for name, us in timings.items():
            rec.add(scenario, name, us, "us/call")
        rec.add(scenario, f"{on}_added", timings[on] - timings["creditguard"], "us/call")


def run(settings: Settings, rec: Recorder, scenario: str) -> None:
    kind = scenario.removeprefix("telemetry_")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        with_sdk = pool.apply(_measure, (kind, settings, True))
    with context.Pool(1) as pool:
        api_only = pool.apply(_measure, (kind, settings, False))
    _record(rec, scenario, with_sdk, ON)
    for timings in with_sdk:
        added = timings[METRICS] - timings["creditguard"]
        rec.add(scenario, f"{METRICS}_added", added, "us/call")
        if SDK_SPAN in timings:  # what is left of the added time once the SDK's is taken off
            floor = timings[SDK_SPAN] + timings[SDK_POINT]
            beyond = timings[ON] - timings["creditguard"] - floor
            rec.add(scenario, f"{ON}_beyond_sdk", beyond, "us/call")
    # The API-only process has its own telemetry-off figures: kept under their own names.
    for timings in api_only:
        rec.add(scenario, API, timings[API], "us/call")
        rec.add(scenario, f"{API}_added", timings[API] - timings["creditguard"], "us/call")


def _median(rec: Recorder, scenario: str, variant: str) -> float | None:
    values = rec.values(scenario, variant)
    return statistics.median(values) if values else None


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    for kind in ("sync", "async"):
        target(
            f"creditguard.telemetry_added_{kind}_us",
            f"what telemetry with the OpenTelemetry SDK configured adds per warm {kind} call"
            " (us; median of per-round differences)",
            _median(rec, f"telemetry_{kind}", f"{ON}_added"),
            "<=",
            MAX_ADDED_US,
        )
        target(
            f"creditguard.metrics_added_{kind}_us",
            f"what telemetry='metrics' (no spans) with the SDK configured adds per warm {kind}"
            " call (us; median of per-round differences)",
            _median(rec, f"telemetry_{kind}", f"{METRICS}_added"),
            "<=",
            MAX_ADDED_US,
        )
    return out
