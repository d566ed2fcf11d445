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

Every guard flavour in :data:`GUARDS` is benchmarked in every scenario, so a
``creditguard_redis`` variant is one more entry there.

Usage::

    python benchmarks/run.py                 # full run (several minutes), prints a table
    python benchmarks/run.py --quick         # under 2 minutes on 2 cores
    python benchmarks/run.py --json out.json # also write the results as JSON
    python benchmarks/run.py --smoke         # a few iterations: checks the harness only
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import anyio
import cachetools
import httpx

from creditguard import CreditGuard, InsufficientCredits, MemoryBackend
from creditguard.testing import FakeLensmor, serve

T = TypeVar("T")
R = TypeVar("R")

API_KEY = "bench-key"
BASE_URL = "https://lensmor.bench.invalid"  # in-memory transports answer any host
BALANCE_PATH = "/external/credits/balance"  # documented Lensmor endpoint
CHARGE_PATH = "/sandbox/charge"  # FakeLensmor's sandbox-only paid call
TTL = 5.0  # the library default; the cachetools variant uses the same
PLENTY = 10**12  # credits: no benchmark ever runs out
UPSTREAM_LATENCY = 0.005
_raw_decode = json.JSONDecoder().raw_decode

SyncCall = Callable[[], object]
AsyncCall = Callable[[], Awaitable[object]]

# --------------------------------------------------------------------------------------
# Guard flavours: every scenario benchmarks each entry as a variant of that name.
# A Redis backend adds one line, e.g.
#     GUARDS["creditguard_redis"] = lambda **kw: CreditGuard(backend=RedisBackend(url), **kw)


def memory_guard(**kwargs: Any) -> CreditGuard:
    return CreditGuard(backend=MemoryBackend(), **kwargs)


GUARDS: dict[str, Callable[..., CreditGuard]] = {"creditguard": memory_guard}


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
    e2e_concurrency: int = 100  # the level the e2e target is checked at
    # Also async10: below the point where the client process is CPU-bound, so the
    # latency a guard adds to each call shows in the throughput.
    e2e_async_levels: tuple[int, ...] = (10, 100)
    e2e_threads: int = 8
    latency: float = UPSTREAM_LATENCY


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
    ),
}

SCENARIOS = (
    "overhead_sync",
    "overhead_async",
    "overhead_async_trio",
    "reads_per_call",
    "e2e_throughput",
    "memory_10k_keys",
)


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
# Upstreams


# A realistic balance (FakeLensmor's default account). The static upstream never
# charges, and every guarded call releases its reservation, so it never runs out.
BALANCE_BODY = json.dumps(
    {
        "totalAmount": 30050,
        "totalBalance": 30050,
        "subscriptionAmount": 30000,
        "subscriptionBalance": 30000,
        "giftAmount": 50,
        "giftBalance": 50,
        "resetAt": 1767225600000,
    }
).encode()
JSON_HEADERS = {"content-type": "application/json"}


class StaticUpstream:
    """A minimal in-memory credits service: the documented balance JSON for any key.

    Zero latency; counts requests (used from one thread at a time). ``transport`` serves
    sync and async httpx clients.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(200, content=BALANCE_BODY, headers=JSON_HEADERS)


def auth_headers(api_key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


# --------------------------------------------------------------------------------------
# The hand-written guards the library is compared with


class BalanceReader:
    """A balance read as application code writes it (``client.get`` + ``.json()``): what
    the ``naive`` guard does twice per call and ``cachetools`` once per cache miss."""

    def __init__(self, client: httpx.Client, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._url = base_url + BALANCE_PATH
        self._headers = auth_headers(api_key)

    def read(self) -> int:
        response = self._client.get(self._url, headers=self._headers)
        response.raise_for_status()
        return int(response.json()["totalBalance"])


class AsyncBalanceReader:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._url = base_url + BALANCE_PATH
        self._headers = auth_headers(api_key)

    async def read(self) -> int:
        response = await self._client.get(self._url, headers=self._headers)
        response.raise_for_status()
        return int(response.json()["totalBalance"])


class FloorReader:
    """The cheapest balance read httpx allows: a request built once and handed to the
    transport (``transport.handle_request``, httpx's transport API), the body streamed with
    ``iter_bytes`` and parsed with ``json.JSONDecoder.raw_decode`` (what ``json.loads``
    does once it has sniffed the encoding and skipped whitespace). creditguard reads the
    same way, so the guard's own logic is what a guarded call costs beyond the action and
    this many reads: the floor gets every shortcut the guard's own read takes.
    """

    def __init__(self, transport: httpx.BaseTransport, base_url: str, api_key: str = API_KEY):
        self._transport = transport
        self._request = httpx.Request("GET", base_url + BALANCE_PATH, headers=auth_headers(api_key))

    def read(self) -> int:
        response = self._transport.handle_request(self._request)
        try:
            body = b"".join(response.iter_bytes())
        finally:
            response.close()
        if response.status_code != 200:
            raise RuntimeError(f"balance read answered {response.status_code}")
        return int(_raw_decode(body.decode())[0]["totalBalance"])


class AsyncFloorReader:
    def __init__(
        self, transport: httpx.AsyncBaseTransport, base_url: str, api_key: str = API_KEY
    ) -> None:
        self._transport = transport
        self._request = httpx.Request("GET", base_url + BALANCE_PATH, headers=auth_headers(api_key))

    async def read(self) -> int:
        response = await self._transport.handle_async_request(self._request)
        try:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise RuntimeError(f"balance read answered {response.status_code}")
        return int(_raw_decode(body.decode())[0]["totalBalance"])


class SendReader:
    """A balance read through ``httpx.Client.send`` with a request built once: the
    cheapest read through the client layer (cookies, auth, redirects, event hooks)."""

    def __init__(self, client: httpx.Client, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._request = client.build_request(
            "GET", base_url + BALANCE_PATH, headers=auth_headers(api_key)
        )

    def read(self) -> int:
        response = self._client.send(self._request)
        response.raise_for_status()
        return int(json.loads(response.content)["totalBalance"])


class AsyncSendReader:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str = API_KEY) -> None:
        self._client = client
        self._request = client.build_request(
            "GET", base_url + BALANCE_PATH, headers=auth_headers(api_key)
        )

    async def read(self) -> int:
        response = await self._client.send(self._request)
        response.raise_for_status()
        return int(json.loads(response.content)["totalBalance"])


class NaiveGuard:
    """GET the balance, compare, call, GET the balance again."""

    def __init__(self, reader: BalanceReader) -> None:
        self._read = reader.read
        self.balance_after: int | None = None

    def requires_credits(self, cost: int) -> Callable[[Callable[[], R]], Callable[[], R]]:
        def decorate(action: Callable[[], R]) -> Callable[[], R]:
            def guarded() -> R:
                balance = self._read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                result = action()
                self.balance_after = self._read()
                return result

            return guarded

        return decorate


class AsyncNaiveGuard:
    def __init__(self, reader: AsyncBalanceReader) -> None:
        self._read = reader.read
        self.balance_after: int | None = None

    def requires_credits(
        self, cost: int
    ) -> Callable[[Callable[[], Awaitable[R]]], Callable[[], Awaitable[R]]]:
        def decorate(action: Callable[[], Awaitable[R]]) -> Callable[[], Awaitable[R]]:
            async def guarded() -> R:
                balance = await self._read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                result = await action()
                self.balance_after = await self._read()
                return result

            return guarded

        return decorate


class CachetoolsGuard:
    """A ``cachetools.cached(TTLCache, lock=...)`` balance read before the call, cleared
    after it: concurrent misses each read (no single flight), nothing is reserved."""

    def __init__(self, reader: BalanceReader, ttl: float = TTL) -> None:
        self._read = cachetools.cached(
            cachetools.TTLCache(maxsize=1, ttl=ttl), lock=threading.Lock()
        )(reader.read)

    def requires_credits(self, cost: int) -> Callable[[Callable[[], R]], Callable[[], R]]:
        def decorate(action: Callable[[], R]) -> Callable[[], R]:
            def guarded() -> R:
                balance = self._read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                try:
                    return action()
                finally:
                    self._read.cache_clear()

            return guarded

        return decorate


class AsyncCachetoolsGuard:
    """The async twin of :class:`CachetoolsGuard`. ``cachetools.cached`` cannot wrap a
    coroutine function, so this is its locked wrapper written out: look up under the
    lock, read outside it on a miss (no single flight), store with ``setdefault``."""

    _KEY = "balance"

    def __init__(self, reader: AsyncBalanceReader, ttl: float = TTL) -> None:
        self._reader = reader
        self._cache: cachetools.TTLCache[str, int] = cachetools.TTLCache(maxsize=1, ttl=ttl)
        self._lock = threading.Lock()

    async def read(self) -> int:
        with self._lock:
            cached = self._cache.get(self._KEY)
        if cached is not None:
            return cached
        value = await self._reader.read()
        with self._lock:
            return self._cache.setdefault(self._KEY, value)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def requires_credits(
        self, cost: int
    ) -> Callable[[Callable[[], Awaitable[R]]], Callable[[], Awaitable[R]]]:
        def decorate(action: Callable[[], Awaitable[R]]) -> Callable[[], Awaitable[R]]:
            async def guarded() -> R:
                balance = await self.read()
                if balance < cost:
                    raise InsufficientCredits(cost, balance)
                try:
                    return await action()
                finally:
                    self.clear()

            return guarded

        return decorate


# --------------------------------------------------------------------------------------
# Building a variant around an action


@dataclasses.dataclass
class SyncVariant:
    call: SyncCall
    close: Callable[[], None]


@dataclasses.dataclass
class AsyncVariant:
    call: AsyncCall
    aclose: Callable[[], Awaitable[None]]


def _nothing() -> None:
    return None


async def _anothing() -> None:
    return None


def build_sync(
    name: str,
    action: SyncCall,
    *,
    client: httpx.Client,
    base_url: str,
    transport: httpx.BaseTransport | None,
) -> SyncVariant:
    """``name`` guarding ``action``; naive and cachetools read through ``client`` (the
    app's own), creditguard through its own client on ``transport`` (None: real HTTP).
    ``one_read`` is no guard: the action, then one balance read as cheap as httpx allows
    on a transport of its own, as creditguard reads (the least a guard that reads once
    after the action can cost)."""
    if name == "bare":
        return SyncVariant(action, _nothing)
    if name == "naive":
        naive = NaiveGuard(BalanceReader(client, base_url))
        return SyncVariant(naive.requires_credits(1)(action), _nothing)
    if name == "cachetools":
        cached = CachetoolsGuard(BalanceReader(client, base_url))
        return SyncVariant(cached.requires_credits(1)(action), _nothing)
    if name == "one_read":
        own = transport or httpx.HTTPTransport()
        read = FloorReader(own, base_url).read

        def action_then_read() -> None:
            action()
            read()

        return SyncVariant(action_then_read, own.close if transport is None else _nothing)
    guard = GUARDS[name](api_key=API_KEY, base_url=base_url, transport=transport, ttl=TTL)
    return SyncVariant(guard.requires_credits(1)(action), guard.close)


def build_async(
    name: str,
    action: AsyncCall,
    *,
    client: httpx.AsyncClient,
    base_url: str,
    transport: httpx.AsyncBaseTransport | None,
) -> AsyncVariant:
    if name == "bare":
        return AsyncVariant(action, _anothing)
    if name == "naive":
        naive = AsyncNaiveGuard(AsyncBalanceReader(client, base_url))
        return AsyncVariant(naive.requires_credits(1)(action), _anothing)
    if name == "cachetools":
        cached = AsyncCachetoolsGuard(AsyncBalanceReader(client, base_url))
        return AsyncVariant(cached.requires_credits(1)(action), _anothing)
    if name == "one_read":
        own = transport or httpx.AsyncHTTPTransport()
        aread = AsyncFloorReader(own, base_url).read

        async def action_then_read() -> None:
            await action()
            await aread()

        return AsyncVariant(action_then_read, own.aclose if transport is None else _anothing)
    guard = GUARDS[name](api_key=API_KEY, base_url=base_url, transport=transport, ttl=TTL)
    return AsyncVariant(guard.requires_credits(1)(action), guard.aclose)


def charge_action(client: httpx.Client) -> SyncCall:
    """The paid action: spend one credit through the sandbox's charge endpoint."""
    headers = auth_headers()

    def charge() -> None:
        client.post(CHARGE_PATH, params={"credits": "1"}, headers=headers).raise_for_status()

    return charge


def async_charge_action(client: httpx.AsyncClient) -> AsyncCall:
    headers = auth_headers()

    async def charge() -> None:
        response = await client.post(CHARGE_PATH, params={"credits": "1"}, headers=headers)
        response.raise_for_status()

    return charge


# --------------------------------------------------------------------------------------
# Drivers


def run_threads(call: SyncCall, workers: int, per_worker: int) -> float:
    """``workers`` threads each making ``per_worker`` calls, released together; seconds."""
    barrier = threading.Barrier(workers + 1)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(per_worker):
                call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


async def run_tasks(call: AsyncCall, workers: int, per_worker: int) -> float:
    """``workers`` tasks each making ``per_worker`` calls; seconds."""

    async def work() -> None:
        for _ in range(per_worker):
            await call()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(work)
    return time.perf_counter() - start


def per_call_us(call: SyncCall, n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


async def aper_call_us(call: AsyncCall, n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - start) / n * 1e6


# --------------------------------------------------------------------------------------
# 1. overhead_sync / overhead_async: sequential per-call time of a guarded no-op


def _noop() -> None:
    return None


async def _anoop() -> None:
    return None


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
        "bare": _noop,
        "http_read": FloorReader(upstream.transport, BASE_URL).read,
        "http_send": SendReader(client, BASE_URL).read,
        "http_get": reader.read,
        "naive": NaiveGuard(reader).requires_credits(1)(_noop),
        "cachetools": CachetoolsGuard(reader).requires_credits(1)(_noop),
    }
    guards = _overhead_guards(upstream)
    for name, guard in guards.items():
        variants[name] = guard.requires_credits(1)(_noop)
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
            "bare": _anoop,
            "http_read": AsyncFloorReader(upstream.transport, BASE_URL).read,
            "http_send": AsyncSendReader(client, BASE_URL).read,
            "http_get": reader.read,
            "naive": AsyncNaiveGuard(reader).requires_credits(1)(_anoop),
            "cachetools": AsyncCachetoolsGuard(reader).requires_credits(1)(_anoop),
        }
        guards = _overhead_guards(upstream)
        for name, guard in guards.items():
            variants[name] = guard.requires_credits(1)(_anoop)
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


# --------------------------------------------------------------------------------------
# 2. reads_per_call: upstream reads per guarded call under concurrency, 5 ms latency


def _per_worker(settings: Settings, workers: int) -> int:
    wanted = math.ceil(settings.rpc_calls / workers)
    return max(settings.rpc_min_per_worker, min(settings.rpc_max_per_worker, wanted))


def _new_fake(latency: float) -> FakeLensmor:
    return FakeLensmor(api_key=API_KEY, subscription_balance=PLENTY, latency=latency)


def _reads_threads(settings: Settings, name: str, workers: int) -> tuple[float, int, float, int]:
    fake = _new_fake(settings.latency)
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
    fake = _new_fake(settings.latency)
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


def bench_reads_per_call(settings: Settings, rec: Recorder) -> None:
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


# --------------------------------------------------------------------------------------
# 3. e2e_throughput: real loopback HTTP against the sandbox served by uvicorn


def _sandbox_main(conn: Connection, latency: float) -> None:
    """Child process: serve a FakeLensmor over loopback HTTP; answer stats requests."""
    fake = _new_fake(latency)
    with serve(fake.app) as url:
        conn.send(url)
        while conn.recv() == "stats":
            conn.send((fake.balance_requests, fake.charges))


class Sandbox:
    """The sandbox in its own process, so its CPU time and GIL are not the client's."""

    def __init__(self, conn: Connection, url: str) -> None:
        self._conn = conn
        self.url = url

    def stats(self) -> tuple[int, int]:
        """(balance requests, charges) served so far."""
        self._conn.send("stats")
        reads, charges = self._conn.recv()
        return int(reads), int(charges)


@contextmanager
def sandbox_process(latency: float) -> Iterator[Sandbox]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_sandbox_main, args=(child, latency), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the sandbox process did not start")
        yield Sandbox(parent, str(parent.recv()))
    finally:
        parent.send("stop")
        process.join(15)
        if process.is_alive():
            process.terminate()
            process.join()


async def _e2e_async(
    name: str, sandbox: Sandbox, concurrency: int, calls: int
) -> tuple[int, float, float]:
    # httpx's default pool limits, as a user would write it. (A keep-alive pool as large
    # as the concurrency is slower: httpcore scans every connection for every queued
    # request, which made bare@async100 ~6x slower on the reference machine.)
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as client:
        variant = build_async(
            name,
            async_charge_action(client),
            client=client,
            base_url=sandbox.url,
            transport=None,
        )
        try:
            await run_tasks(variant.call, concurrency, 1)  # warm-up: open the connections
            reads0, charges0 = sandbox.stats()
            per_worker = max(1, math.ceil(calls / concurrency))
            elapsed = await run_tasks(variant.call, concurrency, per_worker)
            reads1, charges1 = sandbox.stats()
        finally:
            await variant.aclose()
    done = concurrency * per_worker
    assert charges1 - charges0 == done
    return done, elapsed, (reads1 - reads0) / done


def _e2e_threads(name: str, sandbox: Sandbox, threads: int, calls: int) -> tuple[int, float, float]:
    with httpx.Client(base_url=sandbox.url, timeout=30) as client:
        variant = build_sync(
            name, charge_action(client), client=client, base_url=sandbox.url, transport=None
        )
        try:
            run_threads(variant.call, threads, 1)
            reads0, charges0 = sandbox.stats()
            per_worker = max(1, math.ceil(calls / threads))
            elapsed = run_threads(variant.call, threads, per_worker)
            reads1, charges1 = sandbox.stats()
        finally:
            variant.close()
    done = threads * per_worker
    assert charges1 - charges0 == done
    return done, elapsed, (reads1 - reads0) / done


SEQUENTIAL_BLOCK = 10  # calls a variant makes per turn in the interleaved sequential runs


def _seq_plan(calls: int) -> tuple[int, int]:
    """(blocks, calls per block) for ``calls`` sequential calls per variant."""
    block = max(1, min(SEQUENTIAL_BLOCK, calls))
    return math.ceil(calls / block), block


def _sync_reader_variant(url: str) -> SyncVariant:
    """``http_read``: balance reads alone, as cheap as httpx allows, on their own transport."""
    transport = httpx.HTTPTransport()
    return SyncVariant(FloorReader(transport, url).read, transport.close)


def _async_reader_variant(url: str) -> AsyncVariant:
    transport = httpx.AsyncHTTPTransport()
    return AsyncVariant(AsyncFloorReader(transport, url).read, transport.aclose)


# variant -> (calls, seconds, balance reads, each call's seconds)
SeqResult = dict[str, tuple[int, float, int, list[float]]]


def _e2e_sequential_threads(
    names: Sequence[str], sandbox: Sandbox, calls: int, r: int
) -> SeqResult:
    """Every variant side by side, one call at a time from this thread, in interleaved
    blocks (the order rotating from block to block), so that drift in the machine's load
    falls on all of them alike."""
    blocks, block = _seq_plan(calls)
    with httpx.Client(base_url=sandbox.url, timeout=30) as client:
        variants = {
            name: _sync_reader_variant(sandbox.url)
            if name == "http_read"
            else build_sync(
                name, charge_action(client), client=client, base_url=sandbox.url, transport=None
            )
            for name in names
        }
        latencies: dict[str, list[float]] = {name: [] for name in names}
        reads = dict.fromkeys(names, 0)
        try:
            for variant in variants.values():
                variant.call()  # warm-up: connections open, caches filled
            for b in range(blocks):
                for name in rotated(names, r + b):
                    call = variants[name].call
                    reads0, _ = sandbox.stats()
                    each = latencies[name]
                    for _ in range(block):
                        start = time.perf_counter()
                        call()
                        each.append(time.perf_counter() - start)
                    reads1, _ = sandbox.stats()
                    reads[name] += reads1 - reads0
        finally:
            for variant in variants.values():
                variant.close()
    return {name: (len(ts), sum(ts), reads[name], ts) for name, ts in latencies.items()}


async def _e2e_sequential_async(
    names: Sequence[str], sandbox: Sandbox, calls: int, r: int
) -> SeqResult:
    blocks, block = _seq_plan(calls)
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as client:
        variants = {
            name: _async_reader_variant(sandbox.url)
            if name == "http_read"
            else build_async(
                name,
                async_charge_action(client),
                client=client,
                base_url=sandbox.url,
                transport=None,
            )
            for name in names
        }
        latencies: dict[str, list[float]] = {name: [] for name in names}
        reads = dict.fromkeys(names, 0)
        try:
            for variant in variants.values():
                await variant.call()
            for b in range(blocks):
                for name in rotated(names, r + b):
                    acall = variants[name].call
                    reads0, _ = sandbox.stats()
                    each = latencies[name]
                    for _ in range(block):
                        start = time.perf_counter()
                        await acall()
                        each.append(time.perf_counter() - start)
                    reads1, _ = sandbox.stats()
                    reads[name] += reads1 - reads0
        finally:
            for variant in variants.values():
                await variant.aclose()
    return {name: (len(ts), sum(ts), reads[name], ts) for name, ts in latencies.items()}


def _e2e_sequential(settings: Settings, rec: Recorder, sandbox: Sandbox, r: int) -> None:
    """One caller at a time (async1, threads1): what one guarded call costs a caller in
    time over the bare action, read against ``one_read`` (the action, then one plain
    balance read) and ``http_read`` (balance reads alone, back to back)."""
    names = ["bare", "one_read", "naive", "cachetools", *GUARDS, "http_read"]
    calls = settings.e2e_sequential_calls
    for kind in ("async", "threads"):
        if kind == "async":
            results = anyio.run(_e2e_sequential_async, names, sandbox, calls, r)
        else:
            results = _e2e_sequential_threads(names, sandbox, calls, r)
        for name in names:
            done, elapsed, reads, each = results[name]
            rec.add(
                "e2e_throughput",
                f"{name}@{kind}1",
                done / elapsed,
                "calls/s",
                reads_per_call=reads / done,
                calls=done,
                median_call_ms=statistics.median(each) * 1e3,
            )


def bench_e2e_throughput(settings: Settings, rec: Recorder) -> None:
    names = ["bare", "naive", "cachetools", *GUARDS]
    threads = settings.e2e_threads
    with sandbox_process(settings.latency) as sandbox:
        for r in range(settings.rounds):
            _e2e_sequential(settings, rec, sandbox, r)
            for concurrency in settings.e2e_async_levels:
                for name in rotated(names, r):
                    done, elapsed, reads = anyio.run(
                        _e2e_async, name, sandbox, concurrency, settings.e2e_async_calls
                    )
                    rec.add(
                        "e2e_throughput",
                        f"{name}@async{concurrency}",
                        done / elapsed,
                        "calls/s",
                        reads_per_call=reads,
                        calls=done,
                    )
            for name in rotated(names, r):
                done, elapsed, reads = _e2e_threads(name, sandbox, threads, settings.e2e_sync_calls)
                rec.add(
                    "e2e_throughput",
                    f"{name}@threads{threads}",
                    done / elapsed,
                    "calls/s",
                    reads_per_call=reads,
                    calls=done,
                )


# --------------------------------------------------------------------------------------
# 4. memory_10k_keys: bytes of guard state per account, many keys in one process


def bench_memory(settings: Settings, rec: Recorder) -> None:
    upstream = StaticUpstream()
    n = settings.memory_keys
    keys = [f"bench-key-{i:06d}" for i in range(n)]
    for _ in range(settings.rounds):
        for name, factory in GUARDS.items():
            guard = factory(
                api_key=API_KEY, base_url=BASE_URL, transport=upstream.transport, ttl=3600
            )
            guard.balance()  # the shared HTTP client exists before measuring
            gc.collect()
            tracemalloc.start()
            try:
                views = [guard.for_key(key) for key in keys]
                for view in views:
                    view.balance()
                gc.collect()
                with_views = tracemalloc.get_traced_memory()[0]
                del views
                gc.collect()
                state_only = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
                guard.close()
            # A view object (key headers + account) held per tenant, plus the state...
            rec.add("memory_10k_keys", name, with_views / n, "bytes/key", keys=n)
            # ...and what the guard alone retains per account once the views are dropped.
            rec.add("memory_10k_keys", f"{name}_state", state_only / n, "bytes/key", keys=n)

        # Reference point: one TTLCache entry per key holding the parsed balance JSON.
        with httpx.Client(transport=upstream.transport) as client:
            BalanceReader(client, BASE_URL).read()
            cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=n, ttl=3600)
            gc.collect()
            tracemalloc.start()
            try:
                for key in keys:
                    response = client.get(BASE_URL + BALANCE_PATH, headers=auth_headers(key))
                    cache[key] = response.json()
                del response
                gc.collect()
                used = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            rec.add("memory_10k_keys", "cachetools", used / n, "bytes/key", keys=n)
            del cache


# --------------------------------------------------------------------------------------
# Targets the library aims at (reported, never asserted)


def _median_ratio(rec: Recorder, scenario: str, num: str, den: str) -> float | None:
    a, b = rec.values(scenario, num), rec.values(scenario, den)
    if not a or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _median_extra_reads(rec: Recorder, guarded: str, bare: str, one_read: str) -> float | None:
    """Per round: (median call time of ``guarded`` - of ``bare``) / (of ``one_read`` - of
    ``bare``), each the median of that round's per-call times (robust to the odd hiccup
    of a shared machine); then the median over rounds."""
    g, b, o = (rec.extras("e2e_throughput", v, "median_call_ms") for v in (guarded, bare, one_read))
    if not g or not len(g) == len(b) == len(o):
        return None
    return statistics.median((gm - bm) / (om - bm) for gm, bm, om in zip(g, b, o, strict=True))


def _median(rec: Recorder, scenario: str, variant: str) -> float | None:
    values = rec.values(scenario, variant)
    return statistics.median(values) if values else None


def evaluate_targets(rec: Recorder, settings: Settings) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def target(key: str, what: str, value: float | None, op: str, limit: float) -> None:
        if value is None:
            return
        met = value < limit if op == "<" else value <= limit if op == "<=" else value >= limit
        out[key] = {"what": what, "value": value, "target": f"{op} {limit:g}", "met": met}

    for g in GUARDS:
        target(
            f"{g}.logic_sync_us",
            "guard's own logic per sequential sync call (us)",
            _median(rec, "overhead_sync", f"{g}_logic"),
            "<",
            8,
        )
        target(
            f"{g}.logic_async_us",
            "guard's own logic per sequential async call (us, asyncio)",
            _median(rec, "overhead_async", f"{g}_logic"),
            "<",
            15,
        )
        target(
            f"{g}.sequential_vs_naive_sync",
            "sequential sync guarded call / naive guard's (median of per-round ratios)",
            _median_ratio(rec, "overhead_sync", g, "naive"),
            "<=",
            0.6,
        )
        target(
            f"{g}.sequential_vs_naive_async",
            "sequential async guarded call / naive guard's (median of per-round ratios)",
            _median_ratio(rec, "overhead_async", g, "naive"),
            "<=",
            0.6,
        )
        target(
            f"{g}.reads_per_call_async1000",
            "upstream reads per guarded call, 1000 concurrent tasks",
            _median(rec, "reads_per_call", f"{g}@async1000"),
            "<",
            0.01,
        )
        for kind in ("async", "threads"):
            target(
                f"{g}.e2e_sequential_{kind}_extra_reads",
                f"e2e, one {'task' if kind == 'async' else 'thread'} at a time: time a guarded"
                " call adds over the bare action / time one plain read after the action adds"
                " (median per-call times; 1 = exactly one read, the 2% allow for the jitter"
                " of timing 5 ms round trips)",
                _median_extra_reads(rec, f"{g}@{kind}1", f"bare@{kind}1", f"one_read@{kind}1"),
                "<=",
                1.02,
            )
        c = settings.e2e_concurrency
        target(
            f"{g}.e2e_async{c}_vs_bare",
            f"e2e throughput at async concurrency {c} / bare (median of per-round ratios)",
            _median_ratio(rec, "e2e_throughput", f"{g}@async{c}", f"bare@async{c}"),
            ">=",
            0.8,
        )
    return out


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
            for dist in ("creditguard", "httpx", "anyio", "trio", "uvicorn", "cachetools")
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


def format_table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    header = f"{'scenario':<20} {'variant':<26} {'median':>10} {'min':>10} {'max':>10}  unit"
    for scenario, variants in results["scenarios"].items():
        lines += ["", header, "-" * len(header)]
        for variant, e in variants.items():
            lines.append(
                f"{scenario:<20} {variant:<26} {_fmt(e['median']):>10} {_fmt(e['min']):>10}"
                f" {_fmt(e['max']):>10}  {e['unit']}"
            )
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
        extra = any("reads_per_call" in e for e in variants.values())
        lines += [
            "",
            f"**{scenario}**",
            "",
            "| variant | median | min | max | unit |" + (" reads/call |" if extra else ""),
            "|---|--:|--:|--:|---|" + ("--:|" if extra else ""),
        ]
        for variant, e in variants.items():
            row = (
                f"| `{variant}` | {_fmt(e['median'])} | {_fmt(e['min'])} | {_fmt(e['max'])}"
                f" | {e['unit']} |"
            )
            if extra:
                reads = e.get("reads_per_call")
                row += f" {'' if reads is None else _fmt(reads)} |"
            lines.append(row)
    if results.get("targets"):
        lines += ["", "**targets**", "", "| target | value | goal | status |", "|---|--:|---|---|"]
        for key, t in results["targets"].items():
            status = "met" if t["met"] else "**not met**"
            lines.append(f"| `{key}` | {_fmt(t['value'])} | {t['target']} | {status} |")
    return "\n".join(lines).lstrip("\n")


RUNNERS: dict[str, Callable[[Settings, Recorder], None]] = {
    "overhead_sync": bench_overhead_sync,
    "overhead_async": bench_overhead_async,
    "overhead_async_trio": bench_overhead_async_trio,
    "reads_per_call": bench_reads_per_call,
    "e2e_throughput": bench_e2e_throughput,
    "memory_10k_keys": bench_memory,
}


def run(settings: Settings, scenarios: Sequence[str]) -> dict[str, Any]:
    rec = Recorder()
    machine = machine_info()
    started = time.perf_counter()
    durations: dict[str, float] = {}
    for scenario in scenarios:
        log(f"running {scenario} ({settings.mode}, {settings.rounds} rounds)...")
        t0 = time.perf_counter()
        RUNNERS[scenario](settings, rec)
        durations[scenario] = round(time.perf_counter() - t0, 2)
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "scenarios": rec.to_json(),
        "targets": evaluate_targets(rec, settings),
        "machine": machine,
        "run": {
            "mode": settings.mode,
            "rounds": settings.rounds,
            "settings": dataclasses.asdict(settings),
            "guards": list(GUARDS),
            "scenario_seconds": durations,
            "total_seconds": round(time.perf_counter() - started, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds and calls (< 2 min)")
    size.add_argument("--smoke", action="store_true", help="a few iterations: harness check only")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
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
    scenarios = [s for s in SCENARIOS if not args.only or s in args.only]

    results = run(settings, scenarios)
    print(show(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
