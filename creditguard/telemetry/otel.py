"""The guard's OpenTelemetry observer: metrics and spans through the OpenTelemetry API
(``creditguard[otel]``), a no-op until the application configures an SDK.

One :class:`Instruments` per process, made on first use, records every guard's calls
(the global providers' proxies switch to the SDK's instruments when it is set later).
Nothing here is imported by ``import creditguard``, and OpenTelemetry itself is imported
only inside the functions that need it.

What is recorded (every metric carries ``creditguard.account``, the account's fingerprint,
never the key; subjects go on spans only):

* ``creditguard.calls`` (``{call}``), by ``creditguard.outcome`` (and
  ``creditguard.reason`` on refusals): each guarded call counted once by how it ended;
* ``creditguard.credits.charged`` (``{credit}``), by ``creditguard.action`` when known;
* ``creditguard.balance.reads`` (``{read}``), by ``creditguard.outcome`` ``ok``/``failed``;
* ``creditguard.admission.duration`` (``s``), by ``creditguard.outcome``, at each decision;
* the gauges ``creditguard.balance``, ``creditguard.credits.reserved`` and
  ``creditguard.credits.held`` (``{credit}``) of each account seen;
* the spans ``creditguard.spend`` (each guarded call) and ``creditguard.balance.read``.

The two call counters are counted here (a lock and a dict entry per call) and reported
as cumulative sums by asynchronous counters at collection: to the exporter they are
counters like any other, and a call pays for no SDK measurement but the histogram's.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from creditguard.core.calls import in_event_loop_thread
from creditguard.core.observe import SKIP, Entry
from creditguard.core.outcomes import logger

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.trace import Span

    from creditguard.core.calls import Guarded, Held
    from creditguard.core.engine import Engine
    from creditguard.core.models import AccountSnapshot, CreditBalance
    from creditguard.core.roles import AccountState

__all__ = ["Instruments", "instruments"]

ACCOUNT = "creditguard.account"
OUTCOME = "creditguard.outcome"
REASON = "creditguard.reason"
ACTION = "creditguard.action"

# The calls that ran, as ``creditguard.calls`` counts them, by the entry's outcome.
_RAN = {"spent": "admitted", "released": "admitted", "failed": "failed", "expired": "failed"}
_FAILED = frozenset({"failed", "expired"})

_made: Instruments | None = None
_making = threading.Lock()


def _after_fork() -> None:
    """In a forked child (gunicorn's workers after ``--preload``): a lock of its own, and
    counts of its own calls only (the parent's would be counted once per worker)."""
    global _making
    _making = threading.Lock()
    if _made is not None:
        _made._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def instruments(spans: bool = True) -> Instruments | None:
    """The guard's OpenTelemetry observer (one per process; with ``spans=False`` its
    twin that records the same metrics and no span), or ``None`` when the OpenTelemetry
    API is not installed."""
    global _made
    try:
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return None
    if _made is None:
        with _making:
            if _made is None:
                _made = Instruments()
    return _made if spans else _made.without_spans


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("creditguard")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# The admission histogram's buckets (seconds): a warm admission takes microseconds, a
# call that waits up to ``admission_timeout`` (5 s) or ``gate_timeout`` (30 s).
BUCKETS: tuple[float, ...] = (
    *(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
    *(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def _histogram(meter: Any) -> Any:
    """``creditguard.admission.duration``, with buckets made for seconds (the API takes
    them as advice from 1.23; before, the SDK's defaults, which are made for ms)."""
    what = {
        "name": "creditguard.admission.duration",
        "unit": "s",
        "description": "How long the guard took to decide whether a call may run.",
    }
    try:
        return meter.create_histogram(**what, explicit_bucket_boundaries_advisory=list(BUCKETS))
    except TypeError:  # an API older than 1.23
        return meter.create_histogram(**what)


class _Account:
    """What the instruments keep of one account: the attribute sets of its metrics and
    spans, made once, and the account itself (weakly, for the gauges)."""

    __slots__ = ("account", "attributes", "decided", "fingerprint", "reads")

    def __init__(self, fingerprint: str, account: AccountState) -> None:
        self.fingerprint = fingerprint
        self.account = weakref.ref(account)
        self.attributes = {ACCOUNT: fingerprint}
        self.decided: dict[str, dict[str, str]] = {}  # by outcome: the histogram's
        self.reads = (
            {ACCOUNT: fingerprint, OUTCOME: "ok"},
            {ACCOUNT: fingerprint, OUTCOME: "failed"},
        )

    def outcome(self, outcome: str) -> dict[str, str]:
        found = self.decided.get(outcome)
        if found is None:
            found = self.decided[outcome] = {ACCOUNT: self.fingerprint, OUTCOME: outcome}
        return found


class _Token:
    """One observed call: its span (``None`` when spans are off), its account, and
    whether it ran unchecked."""

    __slots__ = ("account", "span", "unchecked")

    def __init__(self, span: Span | None, account: _Account) -> None:
        self.span = span
        self.account = account
        self.unchecked = False


class Instruments:
    """The guard's :class:`~creditguard.core.observe.Observer` over OpenTelemetry."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.trace import ProxyTracerProvider, SpanKind, Status, StatusCode

        try:  # the API's own placeholder until an SDK is set (private: looked for)
            from opentelemetry.metrics._internal import _ProxyMeterProvider
        except ImportError:  # pragma: no cover - another API version: never idle
            proxy_meter: type = type(None)
        else:
            proxy_meter = _ProxyMeterProvider
        self._trace_api = trace
        self._metrics_api = metrics
        self._proxy_tracer = ProxyTracerProvider
        self._proxy_meter = proxy_meter
        self._looked = -1.0
        # The last survey of the accounts, and when: the gauges of one collection share it.
        self._last_survey: tuple[int, float, list[tuple[_Account, AccountSnapshot]]] | None = None
        self._quiet = False
        self._spans = True
        self._twin: Instruments | None = None
        version = _version()
        meter = metrics.get_meter("creditguard", version)
        self._tracer = trace.get_tracer("creditguard", version)
        self._internal = SpanKind.INTERNAL
        self._error = StatusCode.ERROR
        self._status = Status
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._calls: dict[tuple[_Account, str, str | None], int] = {}
        self._charged: dict[tuple[_Account, str | None], int] = {}
        self._duration = _histogram(meter)
        self._reads = meter.create_counter(
            "creditguard.balance.reads",
            unit="{read}",
            description="Balance reads from Lensmor, by outcome (ok, failed).",
        )
        meter.create_observable_counter(
            "creditguard.calls",
            [self._observe_calls],
            unit="{call}",
            description="Guarded calls, each counted once by its final outcome.",
        )
        meter.create_observable_counter(
            "creditguard.credits.charged",
            [self._observe_charged],
            unit="{credit}",
            description="Credits charged by guarded calls (what they reported, else their cost).",
        )
        gauges: tuple[tuple[str, str, str], ...] = (
            ("creditguard.balance", "balance", "The account's cached total balance."),
            (
                "creditguard.credits.reserved",
                "reserved",
                "Credits reserved by guarded calls in flight (holds not included).",
            ),
            ("creditguard.credits.held", "held", "Credits kept by open holds."),
        )
        for name, field, description in gauges:
            meter.create_observable_gauge(
                name, [self._gauge(field)], unit="{credit}", description=description
            )

    @property
    def without_spans(self) -> Instruments:
        """The twin of these instruments that records no span (``telemetry="metrics"``):
        it shares their instruments, counts, accounts and lock, so a process's metrics
        are one set whichever way each guard records."""
        twin = self._twin
        if twin is None:
            with self._lock:
                twin = self._twin
                if twin is None:
                    twin = copy.copy(self)
                    twin._spans = False
                    twin._twin = twin
                    self._twin = twin
        return twin

    def _forked(self) -> None:
        """After a fork, in the child: a new lock (a thread of the parent may have held
        this one) and empty counts, shared again with the twin."""
        lock = threading.Lock()
        calls: dict[tuple[_Account, str, str | None], int] = {}
        charged: dict[tuple[_Account, str | None], int] = {}
        for each in (self, self._twin):
            if each is not None:
                each._lock, each._calls, each._charged = lock, calls, charged
                each._last_survey = None

    # -- what the guard tells ----------------------------------------------------------

    def _account(self, engine: Engine) -> _Account:
        account = engine.account
        fingerprint = account.fingerprint
        known = self._accounts.get(fingerprint)
        if known is None or known.account() is not account:
            # A new account, or a new state for one seen before (a new guard or backend):
            # its counts go on under the same attributes.
            with self._lock:
                known = self._accounts.get(fingerprint)
                if known is None:
                    known = self._accounts[fingerprint] = _Account(fingerprint, account)
                else:
                    known.account = weakref.ref(account)
        return known

    def _idle(self) -> bool:
        """Whether no SDK is configured (the global providers are the API's proxies):
        then nothing would be recorded, and calls are sat out. Looked at once a second
        (an application may configure the SDK after making its guard)."""
        now = time.monotonic()
        if now - self._looked >= 1.0:
            self._looked = now
            self._quiet = isinstance(
                self._trace_api.get_tracer_provider(), self._proxy_tracer
            ) and isinstance(self._metrics_api.get_meter_provider(), self._proxy_meter)
        return self._quiet

    def begin(self, engine: Engine, call: Guarded) -> object:
        if self._idle():
            return SKIP
        known = self._account(engine)
        if not self._spans:
            return _Token(None, known)
        attributes: dict[str, str | int] = {
            ACCOUNT: known.fingerprint,
            "creditguard.cost": call.cost,
        }
        if call._subject is not None:
            attributes["creditguard.subject"] = call._subject
        if call._action is not None:
            attributes[ACTION] = call._action
        span = self._tracer.start_span(
            "creditguard.spend", kind=self._internal, attributes=attributes
        )
        return _Token(span, known)

    def decided(
        self,
        engine: Engine,
        call: Guarded,
        token: object,
        outcome: str,
        reason: str | None,
        seconds: float,
    ) -> None:
        known = token.account if isinstance(token, _Token) else self._account(engine)
        self._duration.record(seconds, known.outcome(outcome))
        if outcome == "admitted":
            return
        if outcome == "unchecked":
            if isinstance(token, _Token):
                token.unchecked = True
            return
        key = (known, outcome, reason)
        with self._lock:
            self._calls[key] = self._calls.get(key, 0) + 1
        if not isinstance(token, _Token) or token.span is None:
            return
        span = token.span
        if span.is_recording():
            span.set_attribute(OUTCOME, outcome)
            if outcome == "refused":
                span.add_event("creditguard.refused", {REASON: reason or "balance"})
            elif outcome in ("unavailable", "rejected"):
                span.set_status(self._status(self._error, f"creditguard: {outcome}"))
        span.end()

    def ended(self, engine: Engine, call: Guarded | Held, token: object, entry: Entry) -> None:
        outcome = entry.outcome
        if isinstance(token, _Token):
            known = token.account
            counted = "unchecked" if token.unchecked and outcome not in _FAILED else None
        else:
            known = self._account(engine)
            counted = None
        counted = counted or _RAN.get(outcome, "admitted")
        charged = entry.charged
        if charged is None:
            charged = entry.cost if outcome == "spent" else 0
        key = (known, counted, None)
        with self._lock:
            self._calls[key] = self._calls.get(key, 0) + 1
            if charged:
                spent = (known, entry.action)
                self._charged[spent] = self._charged.get(spent, 0) + charged
        if not isinstance(token, _Token) or token.span is None:
            return
        span = token.span
        if span.is_recording():
            attributes: dict[str, str | int] = {OUTCOME: outcome, "creditguard.charged": charged}
            if entry.balance_before is not None:
                attributes["creditguard.balance.before"] = entry.balance_before
            if entry.balance_after is not None:
                attributes["creditguard.balance.after"] = entry.balance_after
            if entry.trace_id:
                attributes["lensmor.trace_id"] = entry.trace_id
            if token.unchecked:
                attributes["creditguard.unchecked"] = True
            span.set_attributes(attributes)
            if outcome in _FAILED:
                span.set_status(self._status(self._error, f"creditguard: {outcome}"))
        span.end()

    def read(
        self,
        engine: Engine,
        balance: CreditBalance | None,
        error: BaseException | None,
        started: float,
        seconds: float,
    ) -> None:
        known = self._account(engine)
        self._reads.add(1, known.reads[error is not None])
        if not self._spans:
            return
        start = int(started * 1e9)
        span = self._tracer.start_span(
            "creditguard.balance.read",
            kind=self._internal,
            attributes=known.attributes,
            start_time=start,
        )
        if span.is_recording():
            if error is not None:
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(self._status(self._error, type(error).__name__))
            elif balance is not None:
                span.set_attribute("creditguard.balance", balance.total_balance)
        span.end(end_time=start + int(seconds * 1e9))

    # -- what the collector asks -------------------------------------------------------

    def _observe_calls(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        with self._lock:
            counts = list(self._calls.items())
        for (known, outcome, reason), count in counts:
            attributes = {ACCOUNT: known.fingerprint, OUTCOME: outcome}
            if reason is not None:
                attributes[REASON] = reason
            yield Observation(count, attributes)

    def _observe_charged(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        with self._lock:
            sums = list(self._charged.items())
        for (known, action), credits in sums:
            attributes = {ACCOUNT: known.fingerprint}
            if action is not None:
                attributes[ACTION] = action
            yield Observation(credits, attributes)

    def _gauge(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """The callback of the gauge of ``field`` of each account's snapshot (the
        balance's total; skipped while no balance is cached)."""

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            from opentelemetry.metrics import Observation

            for known, snapshot in self._surveyed():
                value = getattr(snapshot, field)
                if field == "balance":
                    if value is None:
                        continue
                    value = value.total_balance
                yield Observation(value, known.attributes)

        return observe

    def _surveyed(self) -> list[tuple[_Account, AccountSnapshot]]:
        """:meth:`_survey`, made once for the three gauges of a collection (each asks once
        per collection): over Redis one script call per account, not three. A survey is
        never used past a second, nor by more than the three."""
        now = time.monotonic()
        with self._lock:
            cached = self._last_survey
            if cached is not None and cached[0] > 0 and now - cached[1] < 1.0:
                self._last_survey = (cached[0] - 1, cached[1], cached[2])
                return cached[2]
        found = list(self._survey())
        with self._lock:
            self._last_survey = (_GAUGES - 1, now, found)
        return found

    def _survey(self) -> Iterator[tuple[_Account, AccountSnapshot]]:
        """What each live account seen holds now (over Redis, one script call each)."""
        with self._lock:
            known = list(self._accounts.values())
        for each in known:
            account = each.account()
            if account is None:
                continue
            try:
                snapshot = _survey(account)
            except Exception:  # its state cannot be had now (Redis down): no figure
                logger.debug("no gauges for account %s now", each.fingerprint, exc_info=True)
                continue
            if snapshot is not None:
                yield each, snapshot


_GAUGES = 3  # the gauges that share one survey of the accounts per collection


def _survey(account: AccountState) -> AccountSnapshot | None:
    """``account.survey()``: at once for an account in this process's memory; over
    Redis one script call, made only from a thread that runs no event loop (the
    exporter's or the scrape's), never blocking one (``None`` then)."""
    ops: Iterator[Any] = account.survey()
    try:
        call = next(ops)
    except StopIteration as stop:
        value: AccountSnapshot = stop.value
        return value
    if in_event_loop_thread():
        ops.close()  # type: ignore[attr-defined]
        return None
    gen: Any = ops
    try:
        while True:
            try:
                result = call.run()
            except BaseException as exc:
                call = gen.throw(exc)
            else:
                call = gen.send(result)
    except StopIteration as stop:
        value = stop.value
        return value


def dropped_counter() -> Any:
    """The ``creditguard.ledger.dropped`` counter (``{row}``: ledger rows dropped because
    the buffer was full or the database did not take them in time), when the
    OpenTelemetry API is installed; ``False`` when it is not."""
    try:
        from opentelemetry import metrics
    except ImportError:
        return False
    return metrics.get_meter("creditguard").create_counter(
        "creditguard.ledger.dropped", unit="{row}", description="ledger rows dropped"
    )
