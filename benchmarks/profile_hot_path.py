#!/usr/bin/env python3
"""Profile the guarded hot path of overhead_sync / overhead_async.

Runs sequential calls of a guarded no-op against the zero-latency in-memory upstream of
``_variants.py`` (the overhead scenarios' setup) under a sampling profiler, then prints, in
microseconds per guarded call:

* **inclusive**: time under each creditguard function;
* **charged**: every sample billed to the innermost creditguard function on its stack
  and split by the direct callee outside creditguard (``httpx.Client.send``,
  ``anyio.fail_after``...), or "own code": this partitions the guarded call;
* **leaf**: the functions (any package) the samples were taken in.

``--tool py-spy`` (default when installed) samples from outside the process, so the
profiler does not slow the code it measures; ``--tool pyinstrument`` profiles in process
(it adds a cost to every Python call, which inflates call-heavy code).

Usage::

    pip install py-spy            # or pyinstrument
    python benchmarks/profile_hot_path.py [--seconds 8] [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import API_KEY, BASE_URL, TTL  # noqa: E402 - the harness next to this file
from _variants import StaticUpstream, anoop, noop  # noqa: E402

from creditguard import CreditGuard  # noqa: E402

LOOP = "_profiled_loop"  # only samples under this function are analysed
FrameKey = tuple[str, str, int]  # function, file path, line
Stack = tuple[FrameKey, ...]  # outermost first

# -- workload (run in the profiled process) ----------------------------------------------


def _guard() -> CreditGuard:
    upstream = StaticUpstream()
    return CreditGuard(API_KEY, base_url=BASE_URL, transport=upstream.transport, ttl=TTL)


def workload(kind: str, seconds: float) -> tuple[int, float]:
    """Sequential guarded no-op calls for ``seconds``; (calls, elapsed seconds)."""
    if kind == "sync":
        guard = _guard()
        call = guard.requires_credits(1)(noop)

        def _profiled_loop(duration: float) -> tuple[int, float]:
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < duration:
                for _ in range(200):
                    call()
                calls += 200
            return calls, time.perf_counter() - start

        _profiled_loop(0.5)  # warm-up
        try:
            return _profiled_loop(seconds)
        finally:
            guard.close()

    async def main() -> tuple[int, float]:
        guard = _guard()
        acall = guard.requires_credits(1)(anoop)

        async def _profiled_loop(duration: float) -> tuple[int, float]:
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < duration:
                for _ in range(200):
                    await acall()
                calls += 200
            return calls, time.perf_counter() - start

        await _profiled_loop(0.5)
        try:
            return await _profiled_loop(seconds)
        finally:
            await guard.aclose()

    return anyio.run(main, backend=kind)


# -- collecting stacks ---------------------------------------------------------------------

_PYSPY_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*):(?P<line>\d+)\)$")


def pyspy_stacks(
    kind: str, seconds: float, rate: int
) -> tuple[list[tuple[Stack, float]], dict[str, float]]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as tmp:
        raw, stats = Path(tmp) / "stacks.txt", Path(tmp) / "stats.json"
        command = [
            pyspy,
            "record",
            "--format",
            "raw",
            "--full-filenames",
            "--function",
            "--rate",
            str(rate),
            "--output",
            str(raw),
            "--",
            sys.executable,
            __file__,
            "--workload",
            kind,
            "--seconds",
            str(seconds),
            "--stats",
            str(stats),
        ]
        subprocess.run(command, check=True, capture_output=True)  # noqa: S603
        info = json.loads(stats.read_text())
        stacks: list[tuple[Stack, float]] = []
        for line in raw.read_text().splitlines():
            trace, _, count = line.rpartition(" ")
            frames: list[FrameKey] = []
            for part in trace.split(";"):
                m = _PYSPY_FRAME.match(part)
                frames.append((m["func"], m["path"], int(m["line"])) if m else (part, "?", 0))
            stacks.append((tuple(frames), float(count)))
    return stacks, info


def pyinstrument_stacks(
    kind: str, seconds: float
) -> tuple[list[tuple[Stack, float]], dict[str, float]]:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    calls, elapsed = workload(kind, seconds)
    session = profiler.stop()
    stacks: list[tuple[Stack, float]] = []

    def walk(frame: object, prefix: Stack) -> Iterator[tuple[Stack, float]]:
        f = frame  # pyinstrument.frame.Frame
        if f.is_synthetic:  # type: ignore[attr-defined]
            return
        key = (f.function, f.file_path or "?", f.line_no or 0)  # type: ignore[attr-defined]
        stack = (*prefix, key)
        yield stack, f.total_self_time  # type: ignore[attr-defined]
        for child in f.children:  # type: ignore[attr-defined]
            yield from walk(child, stack)

    root = session.root_frame()
    if root is not None:
        stacks = list(walk(root, ()))
    return stacks, {"calls": calls, "elapsed": elapsed}


# -- analysis --------------------------------------------------------------------------------


def _ours(frame: FrameKey) -> bool:
    path = frame[1].replace("\\", "/")
    return "/creditguard/" in path and "/testing/" not in path


def _name(frame: FrameKey) -> str:
    path = frame[1].replace("\\", "/")
    parts = path.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "creditguard" in parts:
        parts = parts[parts.index("creditguard") :]
    else:
        parts = parts[-2:]
    return f"{frame[0]} ({'/'.join(parts)}:{frame[2]})"


def analyse(stacks: Iterable[tuple[Stack, float]], calls: int, elapsed: float, top: int) -> str:
    inclusive: dict[str, float] = defaultdict(float)
    charged: dict[str, float] = defaultdict(float)
    split: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    leaf: dict[str, float] = defaultdict(float)
    total = 0.0
    for stack, weight in stacks:
        names = [f[0].rpartition(".")[2] for f in stack]  # py-spy qualifies names
        if LOOP not in names:
            continue
        inner = stack[len(names) - 1 - names[::-1].index(LOOP) + 1 :]
        if not inner:
            continue  # the loop's own bookkeeping
        total += weight
        for name in {_name(f) for f in inner if _ours(f)}:
            inclusive[name] += weight
        owner_index = max((i for i, f in enumerate(inner) if _ours(f)), default=None)
        if owner_index is None:
            owner, via = "(outside creditguard: the action, the loop)", "-"
        else:
            owner = _name(inner[owner_index])
            rest = inner[owner_index + 1 :]
            via = "own code" if not rest else _name(rest[0])
        charged[owner] += weight
        split[owner][via] += weight
        leaf[_name(inner[-1])] += weight
    if not total:
        return "(no samples under the loop)"
    per_call = elapsed / calls * 1e6

    def us(w: float) -> str:
        return f"{w / total * per_call:8.2f} {w / total:6.1%}"

    lines = [
        f"{calls:,} calls in {elapsed:.2f} s while sampled: {per_call:.2f} us/call",
        "",
        "inclusive time under creditguard functions:",
    ]
    for name, w in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us(w)}  {name}")
    lines += ["", "charged to the innermost creditguard function, by direct outside callee:"]
    for name, w in sorted(charged.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us(w)}  {name}")
        for via, v in sorted(split[name].items(), key=lambda kv: -kv[1])[:6]:
            if v / total >= 0.003:
                lines.append(f"      {us(v)}    -> {via}")
    lines += ["", "leaf (self) time, any package:"]
    for name, w in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us(w)}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Profile the guarded hot path.")
    parser.add_argument("--seconds", type=float, default=8.0, help="profiled seconds per path")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--tool", choices=("py-spy", "pyinstrument"))
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--workload", choices=("sync", "asyncio", "trio"), help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.workload:  # inside py-spy
        calls, elapsed = workload(args.workload, args.seconds)
        if args.stats:
            args.stats.write_text(json.dumps({"calls": calls, "elapsed": elapsed}))
        return 0

    tool = args.tool
    if tool is None:
        has_pyspy = shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists()
        tool = "py-spy" if has_pyspy else "pyinstrument"
    for kind, label in (
        ("sync", "overhead_sync"),
        (args.backend, f"overhead_async ({args.backend})"),
    ):
        if tool == "py-spy":
            stacks, info = pyspy_stacks(kind, args.seconds, args.rate)
        else:
            stacks, info = pyinstrument_stacks(kind, args.seconds)
        print(f"== {label}, {tool}")
        print(analyse(stacks, int(info["calls"]), float(info["elapsed"]), args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
