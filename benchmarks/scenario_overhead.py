"""``overhead_sync``, ``overhead_async``, ``overhead_async_trio``: sequential per-call time
of a guarded no-op against a zero-latency in-memory upstream.

With the run's redis-server, also ``creditguard_redis`` (its ``_logic`` then includes its
Redis round trips) and what one round trip costs from this process: ``redis_ping`` and
``redis_evalsha`` (a trivial script; each operation of the Redis backend is one EVALSHA).
Redis variants count their round trips per call (``round_trips_per_call``, in a pass of
their own after the warm-up, so the counting is not timed) and the commands Redis executed
per timed call (``redis_cmds_per_call``, from ``INFO commandstats``, which also counts the
commands scripts run)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
from collections.abc import Sequence

import _redis
import anyio
import anyio.to_thread
import httpx
import sniffio
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
USES_REDIS = True

# What one Redis round trip costs, made as the guard's client makes it (a client built as
# RedisBackend builds its own): a PING, and a trivial script (each Redis backend operation
# is one EVALSHA).
TRIVIAL_SCRIPT = "return 1"
REDIS_RTT = ("redis_ping", "redis_evalsha")
# Targets for a warm sequential guarded call over Redis.
MAX_ROUND_TRIPS = 1.1  # the admission script; what the call's end tells Redis rides on later
LOGIC_BEYOND_ROUND_TRIPS_US = 15


@dataclasses.dataclass
class Round:
    """One round's measurements, per variant."""

    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # us/call
    reads: dict[str, float] = dataclasses.field(default_factory=dict)  # upstream, per call
    trips: dict[str, float] = dataclasses.field(default_factory=dict)  # Redis round trips
    commands: dict[str, float] = dataclasses.field(default_factory=dict)  # Redis executed

    def record(self, rec: Recorder, scenario: str, guards: Sequence[str]) -> None:
        for name, us in self.timings.items():
            extra = {"reads_per_call": self.reads[name]}
            if name in self.trips:
                extra["round_trips_per_call"] = self.trips[name]
                extra["redis_cmds_per_call"] = self.commands[name]
            rec.add(scenario, name, us, "us/call", **extra)
        bare, read = self.timings["bare"], self.timings["http_read"]
        for name in guards:
            # The guard's own logic: what is left once the action and its upstream reads
            # (priced at one plain httpx read on the same transport) are taken out. Over
            # Redis it includes the guard's Redis round trips.
            logic = self.timings[name] - bare - self.reads[name] * read
            rec.add(scenario, f"{name}_logic", logic, "us/call")


def _uses_redis(name: str) -> bool:
    return name in REDIS_RTT or name.removesuffix("_read") in REDIS_FLAVOURS


class _Commands:
    """The commands the run's Redis has executed (``INFO commandstats``)."""

    def __init__(self) -> None:
        import redis

        assert _redis.SERVER.url is not None
        self._client = redis.Redis.from_url(_redis.SERVER.url)

    def executed(self) -> int:
        return _redis.commands_executed(self._client)

    def close(self) -> None:
        self._client.close()


def _overhead_guards(upstream: StaticUpstream, names: Sequence[str]) -> dict[str, CreditGuard]:
    """One guard per library variant, all on the same in-memory upstream."""
    transport = upstream.transport
    return {
        name: GUARDS[name](api_key=API_KEY, base_url=BASE_URL, transport=transport, ttl=TTL)
        for name in names
    }


def _sync_rtt(stack: contextlib.ExitStack) -> dict[str, SyncCall]:
    assert _redis.SERVER.url is not None
    client = _redis.client(_redis.SERVER.url)
    stack.callback(client.close)
    script = client.register_script(TRIVIAL_SCRIPT)
    return {"redis_ping": client.ping, "redis_evalsha": functools.partial(script, (), ())}


def bench_overhead_sync(settings: Settings, rec: Recorder) -> None:
    upstream = StaticUpstream()
    n = settings.overhead_calls
    warmup = max(5, n // 10)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(transport=upstream.transport))
        reader = BalanceReader(client, BASE_URL)
        variants: dict[str, SyncCall] = {
            "bare": noop,
            "http_read": FloorReader(upstream.transport, BASE_URL).read,
            "http_send": SendReader(client, BASE_URL).read,
            "http_get": reader.read,
            "naive": NaiveGuard(reader).requires_credits(1)(noop),
            "cachetools": CachetoolsGuard(reader).requires_credits(1)(noop),
        }
        names = flavours(redis=True)
        for name, guard in _overhead_guards(upstream, names).items():
            stack.callback(guard.close)
            variants[name] = guard.requires_credits(1)(noop)
            # The guard's own balance read (no admission): its read path vs a plain GET.
            variants[f"{name}_read"] = functools.partial(guard.balance, refresh=True)
        commands = None
        if REDIS_FLAVOURS & set(names):
            variants.update(_sync_rtt(stack))
            commands = _Commands()
            stack.callback(commands.close)
        for r in range(settings.rounds):
            measured = Round()
            for name in rotated(list(variants), r):
                call = variants[name]
                for _ in range(warmup):
                    call()
                counted = commands is not None and _uses_redis(name)
                if counted:
                    with _redis.count_round_trips() as trips:
                        for _ in range(warmup):
                            call()
                    measured.trips[name] = trips.count / warmup
                    executed = commands.executed()
                before = upstream.requests
                measured.timings[name] = per_call_us(call, n)
                measured.reads[name] = (upstream.requests - before) / n
                if counted:
                    measured.commands[name] = (commands.executed() - executed) / n
            measured.record(rec, "overhead_sync", names)


def _async_rtt(stack: contextlib.AsyncExitStack) -> dict[str, AsyncCall]:
    """PING and a trivial EVALSHA as the guard makes them on this event loop: with
    redis.asyncio under asyncio, with the sync client in a worker thread under trio."""
    url = _redis.SERVER.url
    assert url is not None
    if sniffio.current_async_library() == "asyncio":
        aclient = _redis.async_client(url)
        stack.push_async_callback(aclient.aclose)
        ascript = aclient.register_script(TRIVIAL_SCRIPT)
        return {"redis_ping": aclient.ping, "redis_evalsha": functools.partial(ascript, (), ())}
    client = _redis.client(url)
    stack.callback(client.close)
    evalsha = functools.partial(client.register_script(TRIVIAL_SCRIPT), (), ())
    return {
        "redis_ping": functools.partial(anyio.to_thread.run_sync, client.ping),
        "redis_evalsha": functools.partial(anyio.to_thread.run_sync, evalsha),
    }


async def _overhead_async(settings: Settings, rec: Recorder, scenario: str) -> None:
    upstream = StaticUpstream()
    n = settings.overhead_calls
    warmup = max(5, n // 10)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(httpx.AsyncClient(transport=upstream.transport))
        reader = AsyncBalanceReader(client, BASE_URL)
        variants: dict[str, AsyncCall] = {
            "bare": anoop,
            "http_read": AsyncFloorReader(upstream.transport, BASE_URL).read,
            "http_send": AsyncSendReader(client, BASE_URL).read,
            "http_get": reader.read,
            "naive": AsyncNaiveGuard(reader).requires_credits(1)(anoop),
            "cachetools": AsyncCachetoolsGuard(reader).requires_credits(1)(anoop),
        }
        names = flavours(redis=True)
        for name, guard in _overhead_guards(upstream, names).items():
            stack.push_async_callback(guard.aclose)
            variants[name] = guard.requires_credits(1)(anoop)
            variants[f"{name}_read"] = functools.partial(guard.abalance, refresh=True)
        commands = None
        if REDIS_FLAVOURS & set(names):
            variants.update(_async_rtt(stack))
            commands = _Commands()
            stack.callback(commands.close)
        for r in range(settings.rounds):
            measured = Round()
            for name in rotated(list(variants), r):
                call = variants[name]
                for _ in range(warmup):
                    await call()
                counted = commands is not None and _uses_redis(name)
                if counted:
                    with _redis.count_round_trips() as trips:
                        for _ in range(warmup):
                            await call()
                    measured.trips[name] = trips.count / warmup
                    executed = commands.executed()
                before = upstream.requests
                measured.timings[name] = await aper_call_us(call, n)
                measured.reads[name] = (upstream.requests - before) / n
                if counted:
                    measured.commands[name] = (commands.executed() - executed) / n
            measured.record(rec, scenario, names)


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


def _beyond_round_trips(rec: Recorder, scenario: str, guard: str) -> float | None:
    """Per round, the guard's own logic minus as many trivial EVALSHAs as it made round
    trips per call (counted; MAX_ROUND_TRIPS when not); the median."""
    logic, rtt = rec.values(scenario, f"{guard}_logic"), rec.values(scenario, "redis_evalsha")
    if not logic or len(logic) != len(rtt):
        return None
    trips = _median_extra(rec, scenario, guard, "round_trips_per_call") or MAX_ROUND_TRIPS
    return statistics.median(x - trips * t for x, t in zip(logic, rtt, strict=True))


def _median_extra(rec: Recorder, scenario: str, variant: str, name: str) -> float | None:
    values = rec.extras(scenario, variant, name)
    return statistics.median(values) if values else None


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    for g in flavours():
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
    for g in sorted(REDIS_FLAVOURS):
        for kind, scenario in (("sync", "overhead_sync"), ("async", "overhead_async")):
            target(
                f"{g}.round_trips_{kind}",
                f"Redis round trips per warm sequential {kind} guarded call"
                + (" (asyncio)" if kind == "async" else ""),
                _median_extra(rec, scenario, g, "round_trips_per_call"),
                "<=",
                MAX_ROUND_TRIPS,
            )
            target(
                f"{g}.logic_{kind}_beyond_rt_us",
                f"guard's own time per warm sequential {kind} call over Redis (its _logic)"
                " minus its Redis round trips per call (each a redis_evalsha: a trivial"
                " EVALSHA), us; median of per-round differences",
                _beyond_round_trips(rec, scenario, g),
                "<=",
                LOGIC_BEYOND_ROUND_TRIPS_US,
            )
    return out
