"""``admission_efficiency``: does the guard admit exactly what the account can pay for?

Excess demand (twice what the balance pays for), and exactly the demand it pays for (the
``_demand1x`` variants: every refusal is a false one), over real loopback HTTP against the
sandbox served by uvicorn in a process of its own (5 ms latency): asyncio tasks and
threads, 1- and 10-credit calls, with a TTL far below the burst's duration and with one
that outlives it. Every guarded call's action is a real paid call (``POST
/sandbox/charge?credits=N``) charging exactly the call's cost; the sandbox refuses a
charge the account cannot pay (402) and never goes negative.

Figures per run (one variant per case, medians over rounds):

* the median: credits spent / credits available at the start, both from the sandbox's
  balance before and after the burst (1.0 is 100%);
* ``false_refusals``: refused calls (``InsufficientCredits``) that the account could
  still have paid for once everything settled: ``min(refused, final balance // cost)``.
  It is 0 exactly when no call was refused while the balance left at the end could pay
  for it;
* ``overspent``: credits that admitted calls tried to charge beyond the starting
  balance: every charge the sandbox refused for lack of credits, times the cost
  (``overspent_calls`` counts them);
* ``reads_per_call``: balance requests the sandbox served, per call made (admitted or
  refused);
* ``refused_p50_ms``, ``refused_p99_ms``: how long a refused call took to be refused
  (present when some call was refused);
* ``busy``: calls answered ``AdmissionTimeout`` (calls in flight did not settle within
  ``admission_timeout``; not a refusal, but a call that did not run);
* ``failed``: admitted calls whose paid call failed upstream and charged nothing.

The ``_fail33`` variants make one admitted call in three fail upstream (a 409, say),
charging nothing: a guard that refuses on credits reserved by calls in flight would refuse
calls the account can pay; the demand is twice what the balance pays for, so the calls
that succeed still want more than the balance.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator

import anyio
import httpx
from _harness import CHARGE_PATH, Recorder, Settings, Targets, flavours, rotated
from _variants import (
    AsyncCall,
    Sandbox,
    SyncCall,
    auth_headers,
    build_async,
    build_sync,
    run_tasks,
    run_threads,
    sandbox_process,
)

from creditguard import AdmissionTimeout, InsufficientCredits

SCENARIO = "admission_efficiency"
STATS_PATH = "/sandbox/stats"  # the sandbox's counters: no balance read, no charge
NAMES = ("cachetools", *flavours())  # the in-memory flavours: no Redis here


class ChargeRefused(Exception):
    """The sandbox refused a paid call: the account could not pay for it (HTTP 402)."""


class UpstreamFailed(Exception):
    """The paid call failed upstream and charged nothing (a 409 or a 5xx, say)."""


def _failing(fail_every: int) -> Callable[[], bool]:
    """Whether the next paid call fails upstream: one in ``fail_every`` (0: none)."""
    if not fail_every:
        return lambda: False
    counter = itertools.count(1)
    return lambda: next(counter) % fail_every == 0


def paid_call(client: httpx.Client, cost: int, fail_every: int = 0) -> SyncCall:
    """The guarded action: a real paid call charging ``cost`` credits (or, one in
    ``fail_every``, failing upstream before it charges)."""
    params, headers = {"credits": str(cost)}, auth_headers()
    fails = _failing(fail_every)

    def charge() -> None:
        if fails():
            time.sleep(0.005)  # the failed call's round trip
            raise UpstreamFailed
        response = client.post(CHARGE_PATH, params=params, headers=headers)
        if response.status_code == 402:
            raise ChargeRefused
        response.raise_for_status()

    return charge


def async_paid_call(client: httpx.AsyncClient, cost: int, fail_every: int = 0) -> AsyncCall:
    params, headers = {"credits": str(cost)}, auth_headers()
    fails = _failing(fail_every)

    async def charge() -> None:
        if fails():
            await anyio.sleep(0.005)  # the failed call's round trip
            raise UpstreamFailed
        response = await client.post(CHARGE_PATH, params=params, headers=headers)
        if response.status_code == 402:
            raise ChargeRefused
        response.raise_for_status()

    return charge


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "async" or "threads"
    workers: int
    cost: int  # credits per call
    ttl_name: str  # "short" or "long"
    ttl: float
    calls_paid: int  # calls the starting balance pays for
    demand: int  # calls made / calls_paid
    fail_every: int = 0  # one admitted call in this many fails upstream (0: none)

    @property
    def label(self) -> str:
        """``async200_c1_ttl_short``: callers, credits per call, TTL; with a suffix such as
        ``_demand1x`` when the demand is not twice what the balance pays for, and
        ``_fail33`` when one call in three fails upstream."""
        label = f"{self.kind}{self.workers}_c{self.cost}_ttl_{self.ttl_name}"
        if self.demand != 2:
            label = f"{label}_demand{self.demand}x"
        if self.fail_every:
            label = f"{label}_fail{100 // self.fail_every}"
        return label

    @property
    def balance(self) -> int:
        return self.calls_paid * self.cost

    @property
    def per_worker(self) -> int:
        return math.ceil(self.demand * self.calls_paid / self.workers)


def cases(settings: Settings) -> Iterator[Case]:
    for demand in settings.admission_demands:
        for kind, workers in (
            ("async", settings.admission_async),
            ("threads", settings.admission_threads),
        ):
            for cost in settings.admission_costs:
                for ttl_name, ttl in (
                    ("short", settings.admission_ttl_short),
                    ("long", settings.admission_ttl_long),
                ):
                    paid = settings.admission_calls_paid
                    yield Case(kind, workers, cost, ttl_name, ttl, paid, demand)
                    if demand == 2:
                        yield Case(kind, workers, cost, ttl_name, ttl, paid, demand, 3)


@dataclasses.dataclass
class Tally:
    """Each call's outcome and how long it took (seconds); appended from many threads."""

    paid: list[float] = dataclasses.field(default_factory=list)
    refused: list[float] = dataclasses.field(default_factory=list)  # InsufficientCredits
    busy: list[float] = dataclasses.field(default_factory=list)  # AdmissionTimeout
    failed: list[float] = dataclasses.field(default_factory=list)  # failed upstream
    overcharged: list[float] = dataclasses.field(default_factory=list)  # sandbox said 402

    def _outcome(self, error: BaseException | None) -> list[float]:
        if error is None:
            return self.paid
        if isinstance(error, InsufficientCredits):
            return self.refused
        if isinstance(error, AdmissionTimeout):
            return self.busy
        if isinstance(error, UpstreamFailed):
            return self.failed
        if isinstance(error, ChargeRefused):
            return self.overcharged
        raise error

    def counted(self, call: SyncCall) -> Callable[[], None]:
        def attempt() -> None:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                call()
            except (InsufficientCredits, AdmissionTimeout, UpstreamFailed, ChargeRefused) as e:
                error = e
            self._outcome(error).append(time.perf_counter() - start)

        return attempt

    def acounted(self, call: AsyncCall) -> AsyncCall:
        async def attempt() -> None:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                await call()
            except (InsufficientCredits, AdmissionTimeout, UpstreamFailed, ChargeRefused) as e:
                error = e
            self._outcome(error).append(time.perf_counter() - start)

        return attempt


# sandbox (reads, charges, balance) before and after, the burst's seconds
Measured = tuple[tuple[int, int, int], tuple[int, int, int], float]


def _burst_threads(name: str, sandbox: Sandbox, case: Case, tally: Tally) -> Measured:
    with httpx.Client(base_url=sandbox.url, timeout=30) as client:
        variant = build_sync(
            name,
            paid_call(client, case.cost, case.fail_every),
            client=client,
            base_url=sandbox.url,
            transport=None,
            cost=case.cost,
            ttl=case.ttl,
        )
        try:
            headers = auth_headers()
            # Warm-up: open the application's connections (no balance read, no charge).
            run_threads(lambda: client.get(STATS_PATH, headers=headers), case.workers, 1)
            before = sandbox.account()
            elapsed = run_threads(tally.counted(variant.call), case.workers, case.per_worker)
            after = sandbox.account()
        finally:
            variant.close()
    return before, after, elapsed


async def _burst_tasks(name: str, sandbox: Sandbox, case: Case, tally: Tally) -> Measured:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=30) as client:
        variant = build_async(
            name,
            async_paid_call(client, case.cost, case.fail_every),
            client=client,
            base_url=sandbox.url,
            transport=None,
            cost=case.cost,
            ttl=case.ttl,
        )
        try:
            headers = auth_headers()

            async def stats() -> None:
                await client.get(STATS_PATH, headers=headers)

            await run_tasks(stats, case.workers, 1)
            before = sandbox.account()
            elapsed = await run_tasks(tally.acounted(variant.call), case.workers, case.per_worker)
            after = sandbox.account()
        finally:
            await variant.aclose()
    return before, after, elapsed


def _percentile_ms(seconds: list[float], q: int) -> float:
    if len(seconds) == 1:
        return seconds[0] * 1e3
    return statistics.quantiles(seconds, n=100, method="inclusive")[q - 1] * 1e3


def measure(name: str, sandbox: Sandbox, case: Case, rec: Recorder) -> None:
    """One burst of ``name`` on a fresh account: record its figures."""
    sandbox.reset(case.balance)
    tally = Tally()
    if case.kind == "async":
        before, after, elapsed = anyio.run(_burst_tasks, name, sandbox, case, tally)
    else:
        before, after, elapsed = _burst_threads(name, sandbox, case, tally)
    (reads0, charges0, start), (reads1, charges1, left) = before, after
    calls = case.workers * case.per_worker
    paid, refused, overcharged = len(tally.paid), len(tally.refused), len(tally.overcharged)
    busy, failed = len(tally.busy), len(tally.failed)
    assert paid + refused + overcharged + busy + failed == calls, (paid, refused, busy, calls)
    assert charges1 - charges0 == paid, (charges1 - charges0, paid)
    spent = start - left
    assert spent == paid * case.cost, (spent, paid, case.cost)
    extra: dict[str, float] = {
        "false_refusals": min(refused, left // case.cost),
        "overspent": overcharged * case.cost,
        "overspent_calls": overcharged,
        "reads_per_call": (reads1 - reads0) / calls,
        "refused": refused,
        "busy": busy,
        "failed": failed,
        "calls": calls,
        "balance": start,
        "unspent": left,
        "cost": case.cost,
        "seconds": elapsed,
    }
    if tally.refused:
        extra["refused_p50_ms"] = _percentile_ms(tally.refused, 50)
        extra["refused_p99_ms"] = _percentile_ms(tally.refused, 99)
    rec.add(SCENARIO, f"{name}@{case.label}", spent / start, "spent/available", **extra)


def run(settings: Settings, rec: Recorder) -> None:
    with sandbox_process(settings.latency, resettable=True) as sandbox:
        for r in range(settings.rounds):
            for case in cases(settings):
                for name in rotated(NAMES, r):
                    measure(name, sandbox, case, rec)


def targets(rec: Recorder, settings: Settings) -> Targets:
    """Per guard flavour, over every case and round: all the credits spent but less than
    one call's cost, no false refusal, no overspend."""
    out: Targets = {}
    for g in flavours():
        variants = [v for v in rec.variants(SCENARIO) if v.startswith(f"{g}@")]
        if not variants:
            continue
        worst, met = math.inf, True
        for variant in variants:
            rounds = zip(
                rec.extras(SCENARIO, variant, "unspent"),
                rec.extras(SCENARIO, variant, "cost"),
                rec.extras(SCENARIO, variant, "false_refusals"),
                rec.extras(SCENARIO, variant, "overspent"),
                rec.extras(SCENARIO, variant, "busy"),
                strict=True,
            )
            for unspent, cost, false_refusals, overspent, busy in rounds:
                met = met and unspent < cost and false_refusals == 0 and overspent == 0
                met = met and busy == 0
            worst = min(worst, *rec.values(SCENARIO, variant))
        out[f"{g}.admission_efficiency"] = {
            "what": "credits spent / credits available, the worst run over every case and"
            " round (twice and exactly the demand the balance pays for, and twice with one"
            " admitted call in three failing upstream; asyncio and threads, 1- and"
            " 10-credit calls, TTL short and long); met when every run leaves less than one"
            " call's cost unspent, with no false refusal, no AdmissionTimeout and no"
            " overspend",
            "value": worst,
            "target": "100% (within one call's cost), 0 false refusals, 0 overspend",
            "met": met,
        }
    return out
