"""The guard's OpenTelemetry metrics and spans, read through the SDK's in-memory reader and
span exporter (tests/telemetry/conftest.py), on both backends, on threads, asyncio and
trio. Each test's account is its own; every figure is read for that account."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from creditguard import (
    Allowance,
    AllowanceExceeded,
    BalanceUnavailable,
    BudgetExceeded,
    CreditGuard,
    InsufficientCredits,
)
from creditguard.telemetry import otel as otel_module
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend, run_python
from tests.telemetry.conftest import Telemetry

BALANCE = 30050  # the sandbox's default total


def _guard(fake: FakeLensmor, new_backend: NewBackend, **kwargs: Any) -> CreditGuard:
    kwargs.setdefault("ttl", 60)
    return CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend(), **kwargs)


def _calls(otel: Telemetry, account: str) -> dict[tuple[Any, ...], Any]:
    return otel.values("creditguard.calls", account, "creditguard.outcome", "creditguard.reason")


def _no_secret(otel: Telemetry, fake: FakeLensmor, account: str) -> None:
    """The key is nowhere in a metric's or a span's attributes, and no metric names a
    subject."""
    for attributes in otel.all_attributes(account):
        assert fake.api_key not in repr(attributes)
        assert "creditguard.subject" not in attributes
        assert set(attributes) <= {
            "creditguard.account",
            "creditguard.outcome",
            "creditguard.reason",
            "creditguard.action",
        }
    for span in otel.finished(account):
        assert fake.api_key not in repr(dict(span.attributes or {}))
        assert fake.api_key not in repr([dict(e.attributes or {}) for e in span.events])


def test_each_outcome_is_counted_once(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = _guard(fake, new_backend)
    account = guard.account

    @guard.requires_credits(5)
    def unlock() -> str:
        return "ok"

    assert unlock() == "ok"
    assert unlock() == "ok"
    with guard.spend(7, action="export", subject="user-1") as spend:
        spend.report({"creditsUsed": 6})
    with pytest.raises(RuntimeError), guard.spend(3, action="export"):
        raise RuntimeError("the paid call failed")
    with pytest.raises(InsufficientCredits), guard.spend(10**9):
        pass
    guard.close()

    assert _calls(otel, account) == {
        ("admitted", None): 3,
        ("failed", None): 1,
        ("refused", "balance"): 1,
    }
    charged = otel.values("creditguard.credits.charged", account, "creditguard.action")
    qualname = unlock.__qualname__
    assert charged == {(qualname,): 10, ("export",): 6}
    durations = {
        a["creditguard.outcome"]: p.count
        for a, p in otel.points("creditguard.admission.duration", account)
    }
    assert durations == {"admitted": 4, "refused": 1}
    for _, point in otel.points("creditguard.admission.duration", account):
        assert point.sum >= 0
    _no_secret(otel, fake, account)


@pytest.mark.parametrize("reason", ["balance", "keep", "allowance", "budget"])
def test_refusals_by_reason(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend, reason: str
) -> None:
    kwargs: dict[str, Any] = {}
    if reason == "keep":
        kwargs["keep"] = 30000
    if reason == "allowance":
        kwargs["allowance"] = Allowance(10)
    guard = _guard(fake, new_backend, **kwargs)
    account = guard.account
    guard.balance()
    if reason == "balance":
        with pytest.raises(InsufficientCredits), guard.spend(BALANCE + 1):
            pass
    elif reason == "keep":
        with pytest.raises(InsufficientCredits), guard.spend(100):
            pass
    elif reason == "allowance":
        with pytest.raises(AllowanceExceeded), guard.spend(11, subject="user-7"):
            pass
    else:
        with pytest.raises(BudgetExceeded), guard.budget(3), guard.spend(5):
            pass
    guard.close()
    assert _calls(otel, account) == {("refused", reason): 1}
    (span,) = otel.finished(account, "creditguard.spend")
    assert span.status.status_code is StatusCode.UNSET  # a refusal is not an error
    assert span.attributes is not None
    assert span.attributes["creditguard.outcome"] == "refused"
    (event,) = span.events
    assert event.name == "creditguard.refused"
    assert dict(event.attributes or {}) == {"creditguard.reason": reason}
    if reason == "allowance":
        assert span.attributes["creditguard.subject"] == "user-7"
    _no_secret(otel, fake, account)


def test_spans_of_a_spend(otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend) -> None:
    guard = _guard(fake, new_backend)
    account = guard.account
    with guard.spend(7, action="export", subject="user-1") as spend:
        spend.report({"creditsUsed": 7, "traceId": "trace-123"})
    with pytest.raises(RuntimeError), guard.spend(3):
        raise RuntimeError("boom")
    guard.close()
    spent, failed = otel.finished(account, "creditguard.spend")
    assert spent.kind is SpanKind.INTERNAL
    assert dict(spent.attributes or {}) == {
        "creditguard.account": account,
        "creditguard.cost": 7,
        "creditguard.subject": "user-1",
        "creditguard.action": "export",
        "creditguard.outcome": "spent",
        "creditguard.charged": 7,
        "creditguard.balance.before": BALANCE,
        "creditguard.balance.after": spent.attributes["creditguard.balance.after"],  # type: ignore[index]
        "lensmor.trace_id": "trace-123",
    }
    assert spent.status.status_code is StatusCode.UNSET
    attributes = dict(failed.attributes or {})
    assert attributes["creditguard.outcome"] == "failed"
    assert attributes["creditguard.charged"] == 0
    assert "creditguard.subject" not in attributes
    assert failed.status.status_code is StatusCode.ERROR
    (read,) = otel.finished(account, "creditguard.balance.read")
    assert read.start_time is not None
    assert read.end_time is not None
    assert spent.start_time is not None
    assert spent.start_time <= read.start_time  # the read made for its admission
    assert read.end_time >= read.start_time
    assert dict(read.attributes or {})["creditguard.balance"] == BALANCE
    _no_secret(otel, fake, account)


def test_a_trace_id_echoing_the_key_is_not_recorded(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    # A hostile or broken answer echoes the key as its trace id, placed so that a cut to
    # 500 characters would leave the key's first characters: no span carries any of it.
    guard = _guard(fake, new_backend)
    account = guard.account
    key = fake.api_key
    with guard.spend(7) as spend:
        spend.report({"creditsUsed": 7, "traceId": "t" * 495 + key})
    with guard.spend(7) as spend:
        spend.report({"creditsUsed": 7, "traceId": "trace-ok"})
    guard.close()
    echoed, kept = otel.finished(account, "creditguard.spend")
    assert "lensmor.trace_id" not in dict(echoed.attributes or {})
    assert dict(kept.attributes or {})["lensmor.trace_id"] == "trace-ok"
    for span in otel.finished(account):
        assert key[:5] not in repr(dict(span.attributes or {}))


def test_balance_reads_ok_and_failed(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = _guard(fake, new_backend, ttl=0)
    account = guard.account
    guard.balance()
    fake.fail_next(500, times=20)
    with pytest.raises(BalanceUnavailable), guard.spend(1):
        pass
    fake.clear_faults()
    guard.close()
    reads = otel.values("creditguard.balance.reads", account, "creditguard.outcome")
    assert reads[("ok",)] == 1
    assert reads[("failed",)] >= 1
    assert _calls(otel, account) == {("unavailable", None): 1}
    failed = [
        s
        for s in otel.finished(account, "creditguard.balance.read")
        if s.status.status_code is StatusCode.ERROR
    ]
    assert failed
    assert dict(failed[0].attributes or {})["error.type"]
    (spend,) = otel.finished(account, "creditguard.spend")
    assert spend.status.status_code is StatusCode.ERROR
    _no_secret(otel, fake, account)


def test_fail_open_counts_unchecked(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = _guard(fake, new_backend, on_unavailable="allow")
    account = guard.account
    fake.fail_next(500, times=20)
    with guard.spend(4, action="unchecked-work"):
        pass
    fake.clear_faults()
    guard.close()
    assert _calls(otel, account)[("unchecked", None)] == 1
    durations = {
        a["creditguard.outcome"] for a, _ in otel.points("creditguard.admission.duration", account)
    }
    assert "unchecked" in durations


def test_threads_count_every_call(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = _guard(fake, new_backend)
    account = guard.account

    @guard.requires_credits(1)
    def work() -> None:
        pass

    def many() -> None:
        for _ in range(25):
            work()

    threads = [threading.Thread(target=many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    guard.close()
    assert _calls(otel, account) == {("admitted", None): 100}
    charged = otel.values("creditguard.credits.charged", account, "creditguard.action")
    assert charged == {(work.__qualname__,): 100}
    assert len(otel.finished(account, "creditguard.spend")) == 100


@pytest.mark.anyio
async def test_async_calls(otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend) -> None:
    guard = _guard(fake, new_backend)
    account = guard.account

    @guard.requires_credits(2)
    async def unlock() -> str:
        return "ok"

    assert await unlock() == "ok"
    async with guard.spend(5, action="x", subject="user-2") as spend:
        spend.report({"creditsUsed": 4})
    with pytest.raises(RuntimeError):
        async with guard.spend(1):
            raise RuntimeError("boom")
    with pytest.raises(InsufficientCredits):
        async with guard.spend(10**9):
            pass
    await guard.aclose()
    assert _calls(otel, account) == {
        ("admitted", None): 2,
        ("failed", None): 1,
        ("refused", "balance"): 1,
    }
    charged = otel.values("creditguard.credits.charged", account, "creditguard.action")
    assert charged == {(unlock.__qualname__,): 2, ("x",): 4}
    spans = otel.finished(account, "creditguard.spend")
    assert [dict(s.attributes or {})["creditguard.outcome"] for s in spans] == [
        "spent",
        "spent",
        "failed",
        "refused",
    ]
    _no_secret(otel, fake, account)


def test_gauges(otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend) -> None:
    guard = _guard(fake, new_backend)
    account = guard.account

    def gauges() -> dict[str, Any]:
        return {
            name: otel.values(f"creditguard.{name}", account).get(())
            for name in ("balance", "credits.reserved", "credits.held")
        }

    guard.balance()
    assert gauges() == {"balance": BALANCE, "credits.reserved": 0, "credits.held": 0}
    hold = guard.hold(30)
    with guard.spend(7):
        assert gauges() == {"balance": BALANCE, "credits.reserved": 7, "credits.held": 30}
    hold.release()
    figures = gauges()
    assert figures["credits.reserved"] == 7  # the block waits for a read (it settles later)
    assert figures["credits.held"] == 0
    guard.balance(refresh=True)  # the read that settles it
    figures = gauges()
    assert figures["credits.reserved"] == 0
    assert figures["credits.held"] == 0
    guard.close()


def test_holds_count_as_calls(otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend) -> None:
    guard = _guard(fake, new_backend)
    account = guard.account
    guard.hold(30, action="unlock").release()
    guard.hold(20, action="unlock").settle({"creditsUsed": 15})
    guard.close()
    assert _calls(otel, account) == {("admitted", None): 2}
    charged = otel.values("creditguard.credits.charged", account, "creditguard.action")
    assert charged == {("unlock",): 15}
    outcomes = [
        dict(s.attributes or {})["creditguard.outcome"]
        for s in otel.finished(account, "creditguard.spend")
    ]
    assert outcomes == ["released", "spent"]


def test_telemetry_off_records_nothing(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    guard = _guard(fake, new_backend, telemetry=False)
    account = guard.account
    with guard.spend(3):
        pass
    with pytest.raises(InsufficientCredits), guard.spend(10**9):
        pass
    guard.close()
    assert otel.all_attributes(account) == []
    assert otel.finished(account) == []


def test_metrics_without_spans(otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend) -> None:
    # telemetry="metrics": the same metrics as telemetry=True, counted together with
    # theirs, and no span at all (neither of a call nor of a balance read).
    quiet = _guard(fake, new_backend, telemetry="metrics")
    loud = _guard(fake, new_backend)
    account = quiet.account
    assert loud.account == account

    @quiet.requires_credits(5)
    def unlock() -> str:
        return "ok"

    assert unlock() == "ok"
    with quiet.spend(7, action="export", subject="user-1") as spend:
        spend.report({"creditsUsed": 6})
    with pytest.raises(RuntimeError), quiet.spend(3, action="export"):
        raise RuntimeError("the paid call failed")
    with pytest.raises(InsufficientCredits), quiet.spend(10**9):
        pass
    with loud.spend(2, action="export"):
        pass
    quiet.close()
    loud.close()
    assert _calls(otel, account) == {
        ("admitted", None): 3,
        ("failed", None): 1,
        ("refused", "balance"): 1,
    }
    charged = otel.values("creditguard.credits.charged", account, "creditguard.action")
    assert charged == {(unlock.__qualname__,): 5, ("export",): 8}
    reads = otel.values("creditguard.balance.reads", account, "creditguard.outcome")
    assert reads[("ok",)] >= 2  # each guard read once
    durations = {
        a["creditguard.outcome"]: p.count
        for a, p in otel.points("creditguard.admission.duration", account)
    }
    assert durations == {"admitted": 4, "refused": 1}
    spans = otel.finished(account)
    # Only the loud guard's: its call's span and its own balance read's.
    assert sorted(s.name for s in spans) == ["creditguard.balance.read", "creditguard.spend"]
    (spend_span,) = otel.finished(account, "creditguard.spend")
    assert dict(spend_span.attributes or {})["creditguard.cost"] == 2
    _no_secret(otel, fake, account)


def test_telemetry_must_be_a_known_setting(fake: FakeLensmor) -> None:
    for wrong in ("spans", "Metrics", 1, None):
        with pytest.raises(TypeError, match="telemetry must be True, False or 'metrics'"):
            CreditGuard(fake.api_key, transport=fake.transport, telemetry=wrong)  # type: ignore[arg-type]


def test_without_opentelemetry(
    monkeypatch: pytest.MonkeyPatch, fake: FakeLensmor, new_backend: NewBackend
) -> None:
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    assert otel_module.instruments() is None
    guard = _guard(fake, new_backend)
    assert guard._engine.settings.observers == ()
    with guard.spend(3):
        pass
    assert guard.balance().total_balance == BALANCE
    guard.close()


def test_without_an_sdk_calls_are_sat_out() -> None:
    # In a process of its own: this session's providers are the SDK's.
    script = """
from creditguard import CreditGuard
from creditguard.testing import FakeLensmor
fake = FakeLensmor()
guard = CreditGuard(fake.api_key, transport=fake.transport)
assert guard._engine.settings.observers, "the API is installed: the observer is there"
with guard.spend(5) as spend:
    pass
assert spend._observed is None, spend._observed
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
# The observer looks at the providers once a second: make that second over now.
guard._engine.settings.observers[0]._looked = -1.0
with guard.spend(5):
    pass
assert [s.name for s in exporter.get_finished_spans()] == ["creditguard.spend"]
print("ok")
"""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_forked_child_counts_only_its_own_calls() -> None:
    # gunicorn --preload: the app (and its guard) is made, and may be used, before the
    # workers are forked. Each worker's counters start from zero, so that the sum over
    # the workers counts each call once; and a lock a parent's thread held at the fork
    # does not stop the child.
    script = """
import os, threading
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from creditguard import CreditGuard
from creditguard.telemetry import otel
from creditguard.testing import FakeLensmor

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
fake = FakeLensmor()
guard = CreditGuard(fake.api_key, transport=fake.transport)
quiet = CreditGuard(fake.api_key, transport=fake.transport, telemetry="metrics")

def calls():
    found = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name in ("creditguard.calls", "creditguard.credits.charged"):
                    found[m.name] = sum(p.value for p in m.data.data_points)
    return found

for _ in range(3):
    with guard.spend(5):
        pass
with quiet.spend(5):
    pass
assert calls() == {"creditguard.calls": 4, "creditguard.credits.charged": 20}, calls()
instruments = otel.instruments()
held = threading.Event()
release = threading.Event()
def hold_the_lock():
    with instruments._lock:
        held.set()
        release.wait(10)
threading.Thread(target=hold_the_lock, daemon=True).start()
held.wait(10)
pid = os.fork()
if pid == 0:
    import signal
    signal.alarm(20)  # a child that hangs ends itself
    try:
        with guard.spend(7):
            pass
        with quiet.spend(7):
            pass
        got = calls()
        ok = got == {"creditguard.calls": 2, "creditguard.credits.charged": 14}
        print("child", got, flush=True)
        os._exit(0 if ok else 1)
    except BaseException as exc:
        print("child failed", repr(exc), flush=True)
        os._exit(2)
release.set()
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert calls() == {"creditguard.calls": 4, "creditguard.credits.charged": 20}, calls()
print("ok")
"""
    done = run_python(script, timeout=40)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok"
