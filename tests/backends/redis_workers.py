"""Worker processes for tests/backends/test_redis_processes.py.

Each function here is the target of a process started with the ``spawn`` context: it
imports creditguard afresh, builds its own ``CreditGuard`` on a ``RedisBackend`` and
spends on an account that the test process serves (``FakeLensmor`` over loopback HTTP).
The sandbox lives in the test process, so a worker charges through HTTP
(``POST /sandbox/charge?credits=N``), never through ``fake.charge``.

Workers talk back through the queue or pipe they are given, never through shared
memory, and every wait they do is bounded.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any

import anyio
import anyio.to_thread
import httpx

from creditguard import Allowance, CreditGuard, InsufficientCredits
from creditguard.redis import RedisBackend

__all__ = [
    "CHARGE_PATH",
    "finish_unreported",
    "gated_searches",
    "hold_a_spend",
    "race",
    "spend_through_failover",
    "take_a_hold",
]

CHARGE_PATH = "/sandbox/charge"
START_TIMEOUT = 60.0  # seconds a worker waits for the others before giving up
HOLD_TIMEOUT = 60.0  # seconds a worker holds its spend at most (it is killed long before)


class _Tally:
    """What one worker saw, counted from its threads or tasks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ran = 0  # decorated calls whose body ran (admitted)
        self.refused = 0  # InsufficientCredits from the guard, the body never ran
        self.upstream_refused = 0  # the sandbox itself answered 402: an overspend
        self.errors: list[str] = []
        self.slowest = 0.0  # seconds, the longest call (admission, action and settling)

    def timed(self, started: float) -> None:
        took = time.monotonic() - started
        with self.lock:
            self.slowest = max(self.slowest, took)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def error(self) -> None:
        with self.lock:
            self.errors.append(traceback.format_exc(limit=6))

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "ran": self.ran,
                "refused": self.refused,
                "upstream_refused": self.upstream_refused,
                "errors": list(self.errors),
                "slowest": self.slowest,
            }


def _charged(tally: _Tally, response: httpx.Response) -> None:
    if response.status_code == 402:
        tally.add("upstream_refused")
    response.raise_for_status()


def _race_threads(
    guard: CreditGuard,
    base_url: str,
    api_key: str,
    calls: int,
    cost: int,
    width: int,
    subject: str | None = None,
) -> _Tally:
    tally = _Tally()
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as http:

        @guard.requires_credits(cost, subject=subject)
        def paid() -> None:
            tally.add("ran")
            _charged(tally, http.post(CHARGE_PATH, params={"credits": cost}))

        def run(n: int) -> None:
            for _ in range(n):
                started = time.monotonic()
                try:
                    paid()
                except InsufficientCredits:
                    tally.add("refused")
                except Exception:
                    tally.error()
                tally.timed(started)

        shares = [calls // width + (i < calls % width) for i in range(width)]
        threads = [threading.Thread(target=run, args=(n,)) for n in shares]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
            if thread.is_alive():
                tally.errors.append("a thread did not finish within 120 s")
    return tally


async def _race_tasks(
    guard: CreditGuard,
    backend: RedisBackend,
    base_url: str,
    api_key: str,
    calls: int,
    cost: int,
    width: int,
    barrier: Any,
    subject: str | None = None,
) -> _Tally:
    tally = _Tally()
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        # The event loop is up (and its library imported) before the race starts.
        await anyio.to_thread.run_sync(barrier.wait, START_TIMEOUT)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as http:

            @guard.requires_credits(cost, subject=subject)
            async def paid() -> None:
                tally.add("ran")
                _charged(tally, await http.post(CHARGE_PATH, params={"credits": cost}))

            async def run(n: int) -> None:
                for _ in range(n):
                    started = time.monotonic()
                    try:
                        await paid()
                    except InsufficientCredits:
                        tally.add("refused")
                    except Exception:
                        tally.error()
                    tally.timed(started)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i in range(width):
                        tg.start_soon(run, calls // width + (i < calls % width))
    finally:
        await guard.aclose()
        await backend.aclose()
    return tally


def race(
    redis_url: str,
    base_url: str,
    api_key: str,
    calls: int,
    cost: int,
    width: int,
    mode: str,
    barrier: Any,
    results: Any,
    options: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
) -> None:
    """Make ``calls`` decorated calls of ``cost`` credits, ``width`` at a time (threads,
    or tasks of ``mode`` "asyncio" / "trio"), once every worker is ready; put what was
    seen on ``results``. ``options``: more arguments of the ``RedisBackend``
    (``{"cluster": True}``); ``policy``: the guard's ``keep``, an ``allowance`` limit (a
    month) and the calls' ``subject``."""
    backend = RedisBackend(redis_url, **(options or {}))
    policy = policy or {}
    limit = policy.get("allowance")
    guard = CreditGuard(
        api_key,
        base_url=base_url,
        allow_insecure_http=True,
        backend=backend,
        ttl=60,
        keep=policy.get("keep", 0),
        allowance=None if limit is None else Allowance(limit),
    )
    subject = policy.get("subject")
    if mode == "threads":
        try:
            barrier.wait(START_TIMEOUT)
            tally = _race_threads(guard, base_url, api_key, calls, cost, width, subject)
        finally:
            guard.close()
            backend.close()
    else:
        args = (guard, backend, base_url, api_key, calls, cost, width, barrier, subject)
        tally = anyio.run(_race_tasks, *args, backend=mode)
    results.put({"mode": mode, **tally.as_dict()})


def hold_a_spend(
    redis_url: str, base_url: str, api_key: str, cost: int, lease: float, conn: Any
) -> None:
    """Admit a spend of ``cost`` with a short ``lease``, tell the parent through ``conn``,
    then hold it (the parent kills this process with SIGKILL meanwhile)."""
    backend = RedisBackend(redis_url, lease=lease)
    guard = CreditGuard(
        api_key, base_url=base_url, allow_insecure_http=True, backend=backend, ttl=60
    )
    try:
        with guard.spend(cost) as spend:
            before = spend.balance_before
            conn.send(("admitted", None if before is None else before.total_balance))
            # Held until the parent says otherwise (it kills this process instead).
            conn.poll(HOLD_TIMEOUT)
        conn.send(("released", None))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise
    finally:
        guard.close()
        backend.close()


def finish_unreported(
    redis_url: str, base_url: str, api_key: str, cost: int, lease: float, conn: Any
) -> None:
    """Make a decorated call of ``cost`` that charges it, with a short ``lease``, and tell
    the parent once it returned. Redis is never told that it finished: this process
    makes no other admission and its renewer is told to wait (the parent kills this
    process meanwhile, so it never closes its backend either)."""
    from creditguard.backends.redis import leases

    leases.FLUSH_AFTER = HOLD_TIMEOUT * 10
    backend = RedisBackend(redis_url, lease=lease)
    guard = CreditGuard(
        api_key, base_url=base_url, allow_insecure_http=True, backend=backend, ttl=60
    )
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"})

    @guard.requires_credits(cost)
    def paid() -> None:
        client.post(CHARGE_PATH, params={"credits": cost}).raise_for_status()

    try:
        paid()
        conn.send(("returned", None))
        conn.poll(HOLD_TIMEOUT)  # until the parent kills this process
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


def take_a_hold(
    redis_url: str, base_url: str, api_key: str, cost: int, expires_in: float, conn: Any
) -> None:
    """Take a hold of ``cost`` that expires in ``expires_in`` seconds and send its id; then
    wait for the parent's word: ``"exit"`` leaves it open and exits (another process ends
    it by id), or the parent kills this process meanwhile."""
    backend = RedisBackend(redis_url)
    guard = CreditGuard(
        api_key, base_url=base_url, allow_insecure_http=True, backend=backend, ttl=60
    )
    try:
        hold = guard.hold(cost, expires_in=expires_in)
        before = hold.balance_before
        conn.send(("held", hold.id, None if before is None else before.total_balance))
        if conn.poll(HOLD_TIMEOUT):
            conn.recv()
        conn.send(("exiting", None, None))
    except BaseException as exc:
        conn.send(("error", repr(exc), None))
        raise
    finally:
        guard.close()
        backend.close()


def gated_searches(
    redis_url: str,
    base_url: str,
    api_key: str,
    calls: int,
    width: int,
    max_concurrent: int | None,
    barrier: Any,
    results: Any,
) -> None:
    """Make ``calls`` guarded exhibitor searches (50 credits, a real paid call to the
    sandbox), ``width`` threads at a time, on a guard with ``max_concurrent``; put the
    statuses the sandbox answered on ``results``."""
    backend = RedisBackend(redis_url)
    guard = CreditGuard(
        api_key,
        base_url=base_url,
        allow_insecure_http=True,
        backend=backend,
        ttl=60,
        max_concurrent=max_concurrent,
        gate_timeout=60,
    )
    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:

            def run(n: int) -> None:
                for _ in range(n):
                    try:
                        with guard.spend(50):
                            answer = http.post(
                                "/external/exhibitors/search-by-company-name",
                                json={"company_name": "Acme"},
                            )
                        with lock:
                            statuses.append(answer.status_code)
                    except Exception:
                        with lock:
                            errors.append(traceback.format_exc(limit=6))

            barrier.wait(START_TIMEOUT)
            shares = [calls // width + (i < calls % width) for i in range(width)]
            threads = [threading.Thread(target=run, args=(n,)) for n in shares]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
    finally:
        guard.close()
        backend.close()
    results.put({"statuses": statuses, "errors": errors})


def spend_through_failover(
    sentinels: list[tuple[str, int]],
    service_name: str,
    base_url: str,
    api_key: str,
    cost: int,
    width: int,
    lease: float,
    barrier: Any,
    results: Any,
) -> None:
    """Spend ``cost`` credits a call, ``width`` threads at a time, on a backend that finds
    its primary through ``sentinels``, until the account cannot pay (a refusal); a call
    that fails closed (``BalanceUnavailable``, Redis unreachable) is tried again 20 ms
    later. Put what was seen on ``results``, with the wall-clock times of the calls that
    failed closed and of the calls admitted."""
    from creditguard import AdmissionTimeout, BalanceUnavailable

    backend = RedisBackend(sentinels=sentinels, service_name=service_name, lease=lease)
    guard = CreditGuard(
        api_key, base_url=base_url, allow_insecure_http=True, backend=backend, ttl=60
    )
    tally = _Tally()
    closed: list[float] = []  # time.time() of each call that failed closed
    admitted: list[float] = []  # time.time() of each admission
    busy = 0
    headers = {"Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + HOLD_TIMEOUT
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=10) as http:

            @guard.requires_credits(cost)
            def paid() -> None:
                with tally.lock:
                    admitted.append(time.time())
                tally.add("ran")
                _charged(tally, http.post(CHARGE_PATH, params={"credits": cost}))

            def run() -> None:
                nonlocal busy
                while time.monotonic() < deadline:
                    try:
                        paid()
                    except InsufficientCredits:
                        tally.add("refused")
                        return
                    except BalanceUnavailable:
                        with tally.lock:
                            closed.append(time.time())
                        time.sleep(0.02)  # a caller's retry pace, not a synchronisation
                    except AdmissionTimeout:
                        with tally.lock:
                            busy += 1
                    except Exception:
                        tally.error()
                        return
                tally.errors.append("a thread did not finish before its deadline")

            barrier.wait(START_TIMEOUT)
            threads = [threading.Thread(target=run) for _ in range(width)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(HOLD_TIMEOUT + 10)
    except Exception:
        tally.error()
    finally:
        guard.close()
        backend.close()
    results.put({**tally.as_dict(), "closed": closed, "admitted": admitted, "busy": busy})
