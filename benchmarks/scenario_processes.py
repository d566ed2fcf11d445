"""``processes``: many processes, one account.

Worker processes (multiprocessing spawn: 4 of them, 25 asyncio tasks each) spend on the
same account over real loopback HTTP against the sandbox, served by uvicorn in a process of
its own (``latency = 0.005``). The action is a real paid call (``POST
/sandbox/charge?credits=1``); the sandbox answers 402 to a charge the account cannot pay.
Variants, side by side in one run (the order rotating from round to round):

* ``bare``: the same calls, unguarded;
* ``memory``: each process guards with the in-memory backend (``MemoryBackend``): each
  has its own view of the balance and of what is reserved;
* ``redis``: each process guards with ``RedisBackend`` on the run's redis-server (a fresh
  key prefix per run): one cached balance, one set of reservations, shared reads.

Each variant runs two bursts per round, on a fresh account each time (every guard reads
its balance before the burst, outside what is counted; a warm-up before both opens the
connections and loads the scripts):

* **paid**: the balance pays for every call: throughput (the median, calls/s; ``vs_bare``
  is the per-round ratio to ``bare``), ``paid_reads_per_call``,
  ``paid_round_trips_per_call``, ``paid_redis_cmds_per_call``;
* **short**: the demand is ``processes_demand`` (2) times what the balance pays for, so
  overspend is possible: ``overspent`` (credits admitted calls tried to charge beyond the
  balance: 402s times the cost), ``overspent_calls``, ``refused`` (``InsufficientCredits``),
  ``spent`` (credits spent / available), ``reads_per_call``, ``round_trips_per_call``,
  ``redis_cmds_per_call``, ``short_seconds``.

Reads per call are the balance requests the sandbox served during the burst per call made
(admitted or refused). Redis round trips are counted in the workers (every request
redis-py sends, see ``_redis.count_round_trips``); ``redis_cmds_per_call`` are the commands
Redis executed (``INFO commandstats`` deltas, which also count the commands the scripts
run).
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

import _redis
import anyio
import anyio.to_thread
import httpx
from _harness import (
    API_KEY,
    CHARGE_PATH,
    PLENTY,
    TTL,
    Recorder,
    RedisBenchGuard,
    Settings,
    Targets,
    add_target,
    rotated,
)
from _variants import Sandbox, auth_headers, run_tasks, sandbox_process

from creditguard import CreditGuard, InsufficientCredits, MemoryBackend

SCENARIO = "processes"
USES_REDIS = True
VARIANTS = ("bare", "memory", "redis")
COST = 1  # credits per call
# Targets (reported, never asserted)
MAX_READS_PER_CALL = 0.05
MAX_ROUND_TRIPS = 3


class ChargeRefused(Exception):
    """The sandbox refused a paid call: the account could not pay for it (HTTP 402)."""


@dataclasses.dataclass
class Tally:
    """One worker's outcomes in one burst."""

    paid: int = 0
    refused: int = 0  # InsufficientCredits: the guard said no
    overcharged: int = 0  # admitted, and the sandbox said 402
    seconds: float = 0.0
    round_trips: int = 0


# --------------------------------------------------------------------------------------
# The worker process


def _guard(kind: str, url: str, redis_url: str | None, prefix: str) -> CreditGuard | None:
    """``kind``'s guard in this process (none for ``bare``); closing it closes its backend."""
    if kind == "bare":
        return None
    if kind == "memory":
        return CreditGuard(API_KEY, base_url=url, ttl=TTL, backend=MemoryBackend())
    from creditguard.redis import RedisBackend

    assert redis_url is not None
    backend = RedisBackend(redis_url, prefix=prefix)
    return RedisBenchGuard(backend, api_key=API_KEY, base_url=url, ttl=TTL)


async def _job(conn: Connection, client: httpx.AsyncClient, job: dict[str, Any]) -> None:
    """One variant's bursts: build the guard, warm up, then for each burst: refresh, wait
    for "go", spend, report. The parent resets the account in between."""
    recv = functools.partial(anyio.to_thread.run_sync, conn.recv)
    tasks, per_task = job["tasks"], job["per_task"]
    params, headers = {"credits": str(COST)}, auth_headers()

    async def charge() -> None:
        response = await client.post(CHARGE_PATH, params=params, headers=headers)
        if response.status_code == 402:
            raise ChargeRefused
        response.raise_for_status()

    guard = _guard(job["kind"], str(client.base_url), job["redis_url"], job["prefix"])
    call = charge if guard is None else guard.requires_credits(COST)(charge)
    tally = Tally()

    async def counted() -> None:
        try:
            await call()
        except InsufficientCredits:
            tally.refused += 1
        except ChargeRefused:
            tally.overcharged += 1
        else:
            tally.paid += 1

    try:
        with _redis.count_round_trips() as trips:
            await run_tasks(counted, tasks, 1)  # open the connections, load the scripts
            conn.send("warm")
            while (await recv()) == "burst":
                if guard is not None:  # the account was reset: read it, not counted
                    await guard.abalance(refresh=True)
                conn.send("ready")
                if await recv() != "go":
                    raise RuntimeError("expected go")
                tally, trips.count = Tally(), 0
                tally.seconds = await run_tasks(counted, tasks, per_task)
                tally.round_trips = trips.count
                conn.send(tally)
    finally:
        if guard is not None:
            await guard.aclose()
    conn.send("closed")


async def _serve(conn: Connection, url: str) -> None:
    """The worker's event loop: one application client for the process's life (httpx's
    default pool limits, as an application would), one job after another."""
    recv = functools.partial(anyio.to_thread.run_sync, conn.recv)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while (job := await recv()) is not None:
            await _job(conn, client, job)


def _worker_main(conn: Connection) -> None:
    """Child process: wait for the sandbox's URL, then serve jobs until told to stop."""
    try:
        url = conn.recv()
        if url is not None:
            anyio.run(_serve, conn, url, backend="asyncio")
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


class Workers:
    """The worker processes, each behind a pipe."""

    def __init__(self, conns: Sequence[Connection]) -> None:
        self.conns = list(conns)

    def send(self, message: object) -> None:
        for conn in self.conns:
            conn.send(message)

    def gather(self, timeout: float = 120) -> list[Any]:
        answers = []
        for conn in self.conns:
            if not conn.poll(timeout):
                raise RuntimeError("a worker process did not answer")
            answer = conn.recv()
            if isinstance(answer, tuple) and answer[:1] == ("error",):
                raise RuntimeError(f"a worker process failed: {answer[1]}")
            answers.append(answer)
        return answers

    def expect(self, what: str) -> None:
        answers = self.gather()
        if any(answer != what for answer in answers):
            raise RuntimeError(f"expected {what!r} from every worker, got {answers!r}")


@contextmanager
def worker_processes(n: int) -> Iterator[Workers]:
    """``n`` worker processes: send them the sandbox's URL first."""
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [ctx.Process(target=_worker_main, args=(child,), daemon=True) for _, child in pipes]
    for proc in procs:
        proc.start()
    try:
        yield Workers([parent for parent, _ in pipes])
    finally:
        for parent, _ in pipes:
            with suppress(OSError):
                parent.send(None)
        for proc in procs:
            proc.join(15)
            if proc.is_alive():
                proc.terminate()
                proc.join()


# --------------------------------------------------------------------------------------
# The parent


@dataclasses.dataclass
class Burst:
    """One burst's totals over every worker."""

    calls: int
    paid: int
    refused: int
    overcharged: int
    seconds: float  # from "go" until every worker reported
    reads: int  # balance requests the sandbox served
    spent: int  # credits, from the sandbox's balance before and after
    balance: int  # credits at the start
    round_trips: int
    commands: int  # Redis commands executed (INFO commandstats)


def _burst(workers: Workers, sandbox: Sandbox, info: Any, balance: int) -> Burst:
    sandbox.reset(balance)
    workers.send("burst")
    workers.expect("ready")
    reads0, _, start = sandbox.account()
    commands0 = _redis.commands_executed(info) if info is not None else 0
    workers.send("go")
    t0 = time.perf_counter()
    tallies: list[Tally] = workers.gather()
    seconds = time.perf_counter() - t0
    reads1, _, left = sandbox.account()
    commands1 = _redis.commands_executed(info) if info is not None else 0
    paid = sum(t.paid for t in tallies)
    refused = sum(t.refused for t in tallies)
    overcharged = sum(t.overcharged for t in tallies)
    assert start - left == paid * COST, (start, left, paid)
    return Burst(
        calls=paid + refused + overcharged,
        paid=paid,
        refused=refused,
        overcharged=overcharged,
        seconds=seconds,
        reads=reads1 - reads0,
        spent=start - left,
        balance=start,
        round_trips=sum(t.round_trips for t in tallies),
        commands=commands1 - commands0,
    )


def _variant(
    kind: str, workers: Workers, sandbox: Sandbox, info: Any, settings: Settings, r: int
) -> tuple[Burst, Burst]:
    """The paid burst, then the short one, for ``kind``."""
    tasks, per_task = settings.processes_tasks, settings.processes_calls
    calls = settings.processes_workers * tasks * per_task
    prefix = f"bench-processes-{r}-{uuid.uuid4().hex[:8]}:"
    sandbox.reset(PLENTY)  # the warm-up's calls are all paid for
    redis_url = _redis.SERVER.url
    job = {"kind": kind, "redis_url": redis_url, "prefix": prefix}
    workers.send({**job, "tasks": tasks, "per_task": per_task})
    workers.expect("warm")
    try:
        paid = _burst(workers, sandbox, info, PLENTY)
        short = _burst(workers, sandbox, info, calls * COST // settings.processes_demand)
    finally:
        workers.send("done")
        workers.expect("closed")
    return paid, short


def run(settings: Settings, rec: Recorder) -> None:
    redis_url = _redis.SERVER.url
    kinds = [k for k in VARIANTS if k != "redis" or redis_url is not None]
    info = None
    if redis_url is not None:
        import redis

        info = redis.Redis.from_url(redis_url)
    try:
        with (  # the workers start while the sandbox does
            worker_processes(settings.processes_workers) as workers,
            sandbox_process(settings.latency, resettable=True) as sandbox,
        ):
            workers.send(sandbox.url)
            for r in range(settings.rounds):
                results = {
                    kind: _variant(kind, workers, sandbox, info, settings, r)
                    for kind in rotated(kinds, r)
                }
                _record(rec, results, redis_url is not None)
    finally:
        if info is not None:
            info.close()


def _record(rec: Recorder, results: dict[str, tuple[Burst, Burst]], counted: bool) -> None:
    bare = results["bare"][0]
    for kind in VARIANTS:
        if kind not in results:
            continue
        paid, short = results[kind]
        extra: dict[str, float] = {
            "overspent": short.overcharged * COST,
            "overspent_calls": short.overcharged,
            "refused": short.refused,
            "spent": short.spent / short.balance,
            "reads_per_call": short.reads / short.calls,
            "calls": short.calls,
            "balance": short.balance,
            "short_seconds": short.seconds,
            "paid_reads_per_call": paid.reads / paid.calls,
            "paid_refused": paid.refused,
        }
        throughput = paid.calls / paid.seconds
        if kind != "bare":
            extra["vs_bare"] = throughput / (bare.calls / bare.seconds)
        if kind == "redis" and counted:
            extra |= {
                "round_trips_per_call": short.round_trips / short.calls,
                "redis_cmds_per_call": short.commands / short.calls,
                "paid_round_trips_per_call": paid.round_trips / paid.calls,
                "paid_redis_cmds_per_call": paid.commands / paid.calls,
            }
        rec.add(SCENARIO, kind, throughput, "calls/s", **extra)


def _median(rec: Recorder, variant: str, name: str) -> float | None:
    values = rec.extras(SCENARIO, variant, name)
    return statistics.median(values) if values else None


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    overspent = rec.extras(SCENARIO, "redis", "overspent")
    target(
        "processes.redis_overspent",
        "credits overspent with Redis, the worst round (processes sharing one account,"
        " twice the demand its balance pays for)",
        max(overspent) if overspent else None,
        "<=",
        0,
    )
    target(
        "processes.redis_reads_per_call",
        "upstream balance reads per call with Redis, demand twice the balance",
        _median(rec, "redis", "reads_per_call"),
        "<=",
        MAX_READS_PER_CALL,
    )
    target(
        "processes.redis_paid_round_trips",
        "Redis round trips per warm guarded call (the balance pays for every call)",
        _median(rec, "redis", "paid_round_trips_per_call"),
        "<=",
        MAX_ROUND_TRIPS,
    )
    return out
