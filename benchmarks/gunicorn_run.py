#!/usr/bin/env python3
"""Guarded paid calls under gunicorn: several worker processes, one Lensmor account.

Starts the sandbox (``creditguard sandbox``, in a process of its own, with a balance that
pays for ``--paid`` exhibitor searches of 50 credits and ``--latency`` seconds per answer;
like Lensmor it answers ``409`` to a paid call while another of the key is in progress), a
throwaway redis-server, and for each variant gunicorn with ``--workers`` sync workers
serving ``deploy_app.py`` (a Flask route guarded by ``requires_credits(50)`` that makes one
search). Then ``--requests`` requests (twice what the balance pays for, by default) from
``--concurrency`` client threads, all on loopback, on a fresh account per variant.

Per variant: requests per second; searches served (charged); overspent, the searches the
guard let through that Lensmor refused for want of credits (``402``), and the credits
they asked for beyond the balance; ``409``s; refusals by the guard (its ``402``); the
balance left at the end (0: the last credit was spent; under the cost of a search: as good
as spent).

Usage: ``python benchmarks/gunicorn_run.py [--json out.json]`` (needs gunicorn, flask,
redis-py, uvicorn and redis-server: ``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx

HERE = Path(__file__).resolve().parent
SEARCH_COST = 50
API_KEY = "test-key"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    backend: str  # "memory" or "redis"
    paid: str = "search"  # the paid call: "search" (409 when overlapping) or "charge" (never)
    max_concurrent: int = 0
    preload: bool = False
    max_requests: int = 0  # gunicorn restarts a worker after this many requests (0: never)
    read_at_import: bool = False  # the app reads the balance at import (in the master)


VARIANTS = (
    # What the guard does with concurrent calls, on a paid call Lensmor would not refuse
    # for overlapping (the sandbox's /sandbox/charge).
    Variant("charge_memory", "memory", paid="charge"),
    Variant("charge_redis", "redis", paid="charge"),
    Variant("charge_redis_preload", "redis", paid="charge", preload=True),
    Variant("charge_redis_preload_read", "redis", paid="charge", preload=True, read_at_import=True),
    Variant("charge_redis_restarts", "redis", paid="charge", max_requests=50),
    # Lensmor's one credit operation at a time: the exhibitor search answers 409 when another
    # paid call of the key is in progress.
    Variant("search_memory", "memory"),
    Variant("search_redis", "redis"),
    Variant("search_redis_gate1", "redis", max_concurrent=1),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(url: str, proc: subprocess.Popen[bytes], what: str, seconds: float = 30) -> None:
    """Poll ``url`` until it answers (any status): a process starting, nothing to wait on."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {seconds:g} s") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def sandbox(paid: int, latency: float) -> Iterator[str]:
    """The sandbox with ``paid`` searches' worth of credits; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "creditguard", "sandbox", "--port", str(port)]
    command += ["--subscription", str(paid * SEARCH_COST), "--gift", "0"]
    command += ["--api-key", API_KEY, "--latency", str(latency)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/sandbox/stats", proc, "the sandbox")
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def gunicorn(
    workers: int, variant: Variant, lensmor: str, redis_url: str | None, log: IO[bytes]
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """gunicorn with ``workers`` sync workers serving deploy_app:app, its log to ``log``;
    yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--workers", str(workers)]
    command += ["--worker-class", "sync", "--bind", f"127.0.0.1:{port}"]
    command += ["--chdir", str(HERE), "--graceful-timeout", "10", "--log-level", "warning"]
    if variant.preload:
        command.append("--preload")
    if variant.max_requests:
        command += ["--max-requests", str(variant.max_requests)]
    command.append("deploy_app:app")
    env = {
        **os.environ,
        "LENSMOR_BASE_URL": lensmor,
        "LENSMOR_API_KEY": API_KEY,
        "DEPLOY_BACKEND": variant.backend,
        "DEPLOY_MAX_CONCURRENT": str(variant.max_concurrent),
        "DEPLOY_READ_AT_IMPORT": "1" if variant.read_at_import else "0",
        "DEPLOY_PAID": variant.paid,
    }
    if redis_url is not None:
        env["CREDITGUARD_REDIS_URL"] = redis_url
    proc = subprocess.Popen(command, env=env, stderr=log)  # noqa: S603
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, "gunicorn")
        yield url, proc
    finally:
        stop(proc)


def load(url: str, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` POST /search from ``concurrency`` threads; the answers, counted."""
    counts = {"served": 0, "overspent": 0, "conflict": 0, "refused": 0, "other": 0}

    def one(client: httpx.Client) -> str:
        answer = client.post(f"{url}/search")
        if answer.status_code == 200:
            return "served"
        if answer.status_code == 502:
            upstream = answer.json()["upstream"]
            return {402: "overspent", 409: "conflict"}.get(upstream, "other")
        return "refused" if answer.status_code == 402 else "other"

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for kind in pool.map(lambda _: one(client), range(requests)):
                counts[kind] += 1
        seconds = time.perf_counter() - started
    return {**counts, "seconds": round(seconds, 3), "per_s": round(requests / seconds, 1)}


def balance(lensmor: str) -> int:
    answer = httpx.get(
        f"{lensmor}/external/credits/balance", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    total: int = answer.raise_for_status().json()["totalBalance"]
    return total


def run_variant(
    variant: Variant,
    *,
    workers: int,
    paid: int,
    requests: int,
    concurrency: int,
    latency: float,
    redis_url: str | None,
) -> dict[str, Any]:
    """One variant on a fresh account (a sandbox of its own, a flushed Redis)."""
    if variant.backend == "redis":
        if redis_url is None:
            raise RuntimeError("a Redis variant needs redis_url")
        import redis

        with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
            client.flushdb()
    with tempfile.TemporaryFile() as log:
        with (
            sandbox(paid, latency) as lensmor,
            gunicorn(workers, variant, lensmor, redis_url, log) as (url, _),
        ):
            counts = load(url, requests, concurrency)
            left = balance(lensmor)
        log.seek(0)  # gunicorn has stopped: its workers' whole log
        logged = log.read().decode(errors="replace")
    return {
        "variant": variant.name,
        "workers": workers,
        "requests": requests,
        "concurrency": concurrency,
        "balance": paid * SEARCH_COST,
        **counts,
        "overspent_credits": counts["overspent"] * SEARCH_COST,
        "left": left,
        # the guard's warnings that a balance read after a call failed, in the workers' log
        "failed_refreshes": logged.count("the balance refresh after it failed"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--paid", type=int, default=100, help="searches the balance pays for")
    parser.add_argument("--requests", type=int, help="default: twice --paid")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.02, help="sandbox seconds per answer")
    parser.add_argument("--only", action="append", choices=[v.name for v in VARIANTS])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    from creditguard.testing._redis_server import redis_server

    rows = []
    with redis_server() as redis_url:
        for variant in VARIANTS:
            if args.only and variant.name not in args.only:
                continue
            rows.append(
                run_variant(
                    variant,
                    workers=args.workers,
                    paid=args.paid,
                    requests=args.requests or 2 * args.paid,
                    concurrency=args.concurrency,
                    latency=args.latency,
                    redis_url=redis_url,
                )
            )
    columns = ("variant", "per_s", "served", "overspent", "overspent_credits", "conflict")
    columns += ("refused", "other", "left", "failed_refreshes")
    width = max(len(c) for c in (*columns, *(r["variant"] for r in rows)))
    print(" ".join(f"{c:>{width}}" for c in columns))
    for row in rows:
        print(" ".join(f"{row[c]!s:>{width}}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
