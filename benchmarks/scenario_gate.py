"""``gate``: paid calls one at a time (``max_concurrent=1``) against Lensmor's ``409``.

The sandbox, in a process of its own over loopback HTTP (``latency = 0.005``), holds the
key's credit operation while a paid call runs and answers ``409 STATE_CONFLICT`` to any
other paid call meanwhile, as Lensmor does. 8 asyncio tasks each make guarded exhibitor
searches (``POST /external/exhibitors/search-by-company-name``, 50 credits), each a
function decorated with ``guard.requires_credits(50)``. Variants, side by side in one run
(the order rotating from round to round), each on a fresh account:

* ``no_gate``: the guard without a gate: searches overlap;
* ``gate_1``: ``max_concurrent=1`` on the memory backend;
* ``gate_1_redis``: ``max_concurrent=1`` on the Redis backend (when a redis-server runs).

Per variant: guarded calls per second (all of them, answered 201 or 409), ``ok_per_s``
(searches that went through), and ``share_409`` (the share of searches the sandbox refused
for overlapping). Target: no 409 with the gate.
"""

from __future__ import annotations

import collections
import functools
import uuid
from typing import Any

import _redis
import anyio
import httpx
from _harness import (
    API_KEY,
    PLENTY,
    TTL,
    Recorder,
    RedisBenchGuard,
    Settings,
    Targets,
    add_target,
    rotated,
)
from _variants import auth_headers, run_tasks, sandbox_process

from creditguard import CreditGuard

SCENARIO = "gate"
USES_REDIS = True
VARIANTS = ("no_gate", "gate_1", "gate_1_redis")
SEARCH = "/external/exhibitors/search-by-company-name"
TASKS = 8


def _guard(kind: str, url: str, redis_url: str | None) -> CreditGuard:
    limit = None if kind == "no_gate" else 1
    if kind == "gate_1_redis":
        from creditguard.redis import RedisBackend

        assert redis_url is not None
        backend = RedisBackend(redis_url, prefix=f"bench-{uuid.uuid4().hex[:8]}:")
        return RedisBenchGuard(
            backend, api_key=API_KEY, base_url=url, ttl=TTL, max_concurrent=limit, gate_timeout=60
        )
    return CreditGuard(API_KEY, base_url=url, ttl=TTL, max_concurrent=limit, gate_timeout=60)


async def _burst(kind: str, url: str, redis_url: str | None, per_task: int) -> dict[str, Any]:
    statuses: collections.Counter[int] = collections.Counter()
    guard = _guard(kind, url, redis_url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            headers = auth_headers()

            @guard.requires_credits(50)
            async def search() -> httpx.Response:
                return await client.post(SEARCH, json={"company_name": "Acme"}, headers=headers)

            async def call() -> None:
                statuses[(await search()).status_code] += 1

            await guard.abalance()  # read before the burst, not counted
            seconds = await run_tasks(call, TASKS, per_task)
    finally:
        await guard.aclose()
    calls = sum(statuses.values())
    return {
        "calls_per_s": calls / seconds,
        "ok_per_s": statuses[201] / seconds,
        "share_409": statuses[409] / calls,
        "calls": calls,
    }


def run(settings: Settings, rec: Recorder) -> None:
    redis_url = _redis.SERVER.url
    kinds = [k for k in VARIANTS if k != "gate_1_redis" or redis_url is not None]
    per_task = max(2, settings.processes_calls * 2)
    with sandbox_process(settings.latency, resettable=True) as sandbox:
        for r in range(settings.rounds):
            for kind in rotated(kinds, r):
                sandbox.reset(PLENTY)
                burst = functools.partial(_burst, kind, sandbox.url, redis_url, per_task)
                got = anyio.run(burst, backend="asyncio")
                rec.add(
                    SCENARIO,
                    kind,
                    got["calls_per_s"],
                    "calls/s",
                    ok_per_s=got["ok_per_s"],
                    share_409=got["share_409"],
                    calls=got["calls"],
                )


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    for kind in ("gate_1", "gate_1_redis"):
        shares = rec.extras(SCENARIO, kind, "share_409")
        add_target(
            out,
            f"gate.{kind}_share_409",
            f"share of paid calls answered 409 with max_concurrent=1 ({kind}), the worst round",
            max(shares) if shares else None,
            "<=",
            0,
        )
    return out
