"""``e2e_throughput``: guarded calls per second over real loopback HTTP against the sandbox
served by uvicorn in a process of its own; one caller at a time and concurrent callers."""

from __future__ import annotations

import functools
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence

import anyio
import anyio.to_thread
import httpx
from _harness import (
    API_KEY,
    TTL,
    Recorder,
    Settings,
    Targets,
    add_target,
    flavours,
    median_ratio,
    memory_guard,
    rotated,
)
from _variants import (
    SPEND_SUFFIX,
    AsyncCall,
    AsyncFloorReader,
    AsyncVariant,
    FloorReader,
    Sandbox,
    SyncVariant,
    async_charge_action,
    async_unlock_action,
    build_async,
    build_sync,
    charge_action,
    run_tasks,
    run_threads,
    sandbox_process,
    unlock_action,
)

SCENARIO = "e2e_throughput"
# The in-memory guard with a SQLite spend ledger (creditguard.ledger), at async10 only:
# what recording every call costs, next to ``creditguard`` without one.
LEDGER = "creditguard_ledger"
LEDGER_LEVEL = 10


def _ledger_variant(action: AsyncCall, base_url: str) -> AsyncVariant:
    """``creditguard`` with ``ledger=SQLiteLedger(...)`` in a temporary directory, closed
    (its rows written) and removed with the variant."""
    from creditguard.ledger import SQLiteLedger

    directory = tempfile.mkdtemp(prefix="bench-ledger-")
    ledger = SQLiteLedger(os.path.join(directory, "spend.db"))
    guard = memory_guard(api_key=API_KEY, base_url=base_url, transport=None, ttl=TTL, ledger=ledger)

    def finish() -> None:
        ledger.close()
        assert ledger.dropped == 0
        shutil.rmtree(directory, ignore_errors=True)

    async def close() -> None:
        await guard.aclose()
        await anyio.to_thread.run_sync(finish)

    return AsyncVariant(guard.requires_credits(1)(action), close)


def spend_variants() -> list[str]:
    """Each guard flavour around the action as a ``spend()`` block (``with`` in threads,
    ``async with`` in tasks) rather than decorated: held to the decorated call's targets."""
    return [f"{g}{SPEND_SUFFIX}" for g in flavours()]


async def _e2e_async(
    name: str, sandbox: Sandbox, concurrency: int, calls: int
) -> tuple[int, float, float]:
    # httpx's default pool limits, as a user would write it. (A keep-alive pool as large
    # as the concurrency is slower: httpcore scans every connection for every queued
    # request, which made bare@async100 ~6x slower on the reference machine.)
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as client:
        variant = (
            _ledger_variant(async_charge_action(client), sandbox.url)
            if name == LEDGER
            else build_async(
                name,
                async_charge_action(client),
                client=client,
                base_url=sandbox.url,
                transport=None,
            )
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


UNLOCK_COST = 2000  # an event unlock, as Lensmor charges it

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
        report = unlock_action(client)
        variants = {
            name: _sync_reader_variant(sandbox.url)
            if name == "http_read"
            else SyncVariant(report, lambda: None)
            if name == "bare_report"
            else build_sync(
                name.removesuffix("_report"),
                report,  # type: ignore[arg-type]  # returns the answer, to settle from
                client=client,
                base_url=sandbox.url,
                transport=None,
                cost=UNLOCK_COST,
            )
            if name.endswith("_report")
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
        report = async_unlock_action(client)

        async def nothing() -> None:
            pass

        variants = {
            name: _async_reader_variant(sandbox.url)
            if name == "http_read"
            else AsyncVariant(report, nothing)  # type: ignore[arg-type]
            if name == "bare_report"
            else build_async(
                name.removesuffix("_report"),
                report,  # type: ignore[arg-type]  # returns the answer, to settle from
                client=client,
                base_url=sandbox.url,
                transport=None,
                cost=UNLOCK_COST,
            )
            if name.endswith("_report")
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
    names = [
        "bare",
        "one_read",
        "naive",
        "cachetools",
        *flavours(),
        # The same guard around the same action as a ``with guard.spend(1):`` block.
        *spend_variants(),
        "http_read",
        # The action answering like Lensmor's event unlock (creditsUsed, balanceAfter):
        # the guard settles from that report, with no balance read after the first.
        "bare_report",
        *(f"{g}_report" for g in flavours()),
    ]
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


def run(settings: Settings, rec: Recorder) -> None:
    names = ["bare", "naive", "cachetools", *flavours(), *spend_variants()]
    threads = settings.e2e_threads
    with sandbox_process(settings.latency) as sandbox:
        for r in range(settings.rounds):
            _e2e_sequential(settings, rec, sandbox, r)
            for concurrency in settings.e2e_async_levels:
                level_names = [*names, LEDGER] if concurrency == LEDGER_LEVEL else names
                for name in rotated(level_names, r):
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


def _median_extra_reads(rec: Recorder, guarded: str, bare: str, one_read: str) -> float | None:
    """Per round: (median call time of ``guarded`` - of ``bare``) / (of ``one_read`` - of
    ``bare``), each the median of that round's per-call times (robust to the odd hiccup
    of a shared machine); then the median over rounds."""
    g, b, o = (rec.extras("e2e_throughput", v, "median_call_ms") for v in (guarded, bare, one_read))
    if not g or not len(g) == len(b) == len(o):
        return None
    return statistics.median((gm - bm) / (om - bm) for gm, bm, om in zip(g, b, o, strict=True))


def targets(rec: Recorder, settings: Settings) -> Targets:
    out: Targets = {}
    target = functools.partial(add_target, out)
    target(
        f"{LEDGER}.e2e_async{LEDGER_LEVEL}_vs_creditguard",
        f"e2e at async{LEDGER_LEVEL}: the guard with a SQLite spend ledger / the same guard"
        " without one (median of per-round ratios): recording every call costs at most 5%",
        median_ratio(
            rec,
            "e2e_throughput",
            f"{LEDGER}@async{LEDGER_LEVEL}",
            f"creditguard@async{LEDGER_LEVEL}",
        ),
        ">=",
        0.95,
    )
    for g in (*flavours(), *spend_variants()):
        block = " as a spend() block" if g.endswith(SPEND_SUFFIX) else ""
        for kind in ("async", "threads"):
            target(
                f"{g}.e2e_sequential_{kind}_extra_reads",
                f"e2e, one {'task' if kind == 'async' else 'thread'} at a time: time a guarded"
                f" call{block} adds over the bare action / time one plain read after the action"
                " adds (median per-call times; 1 = exactly one read, the 2% allow for the jitter"
                " of timing 5 ms round trips)",
                _median_extra_reads(rec, f"{g}@{kind}1", f"bare@{kind}1", f"one_read@{kind}1"),
                "<=",
                1.02,
            )
        for kind in ("async", "threads"):
            target(
                f"{g}_report.e2e_sequential_{kind}_vs_bare",
                f"e2e, one {'task' if kind == 'async' else 'thread'} at a time, an action"
                " answering like event unlock: guarded / bare throughput (median of per-round"
                " ratios; reads per call after the first: see the variant's reads_per_call)",
                median_ratio(rec, "e2e_throughput", f"{g}_report@{kind}1", f"bare_report@{kind}1"),
                ">=",
                0.95,
            )
        for conc, limit in (
            ("async1", 0.9),
            ("threads1", 0.9),
            ("async10", 0.8),
            ("threads8", 0.8),
        ):
            target(
                f"{g}.e2e_{conc}_vs_bare",
                f"e2e at {conc}, an action that reports nothing (like exhibitor search):"
                f" guarded{block} / bare throughput (median of per-round ratios)",
                median_ratio(rec, "e2e_throughput", f"{g}@{conc}", f"bare@{conc}"),
                ">=",
                limit,
            )
        c = settings.e2e_concurrency
        target(
            f"{g}.e2e_async{c}_vs_bare",
            f"e2e throughput{block} at async concurrency {c} / bare (median of per-round ratios)",
            median_ratio(rec, "e2e_throughput", f"{g}@async{c}", f"bare@async{c}"),
            ">=",
            0.8,
        )
    return out
