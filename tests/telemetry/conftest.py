"""The OpenTelemetry SDK of these tests: global providers can be set once per process, so
one session fixture sets them (each pytest-xdist worker is a process of its own) with an
in-memory metric reader, the Prometheus exporter's reader and an in-memory span exporter.
Spans are sampled only while a test listens (the ``otel`` fixture): the tests that this
worker runs afterwards pay for no span and leave none in memory. Each test reads the
figures of an account of its own (a key of its own, so a fingerprint of its own)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes

from creditguard.testing import FakeLensmor


class Listening(Sampler):
    """Records spans only while a test listens."""

    def __init__(self) -> None:
        self.on = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if not self.on:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "Listening"


@dataclasses.dataclass
class Telemetry:
    reader: InMemoryMetricReader
    spans: InMemorySpanExporter
    sampler: Listening

    def points(self, name: str, account: str) -> list[tuple[dict[str, Any], Any]]:
        """The data points of metric ``name`` for ``account``: (attributes, point)."""
        found = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes or {})
                        if attributes.get("creditguard.account") == account:
                            found.append((attributes, point))
        return found

    def values(self, name: str, account: str, *keys: str) -> dict[tuple[Any, ...], Any]:
        """``{(attribute values of keys...): value}`` of a counter or gauge."""
        return {tuple(a.get(k) for k in keys): p.value for a, p in self.points(name, account)}

    def all_attributes(self, account: str) -> list[dict[str, Any]]:
        """The attributes of every data point of ``account``, of every metric."""
        found = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes or {})
                        if attributes.get("creditguard.account") == account:
                            found.append(attributes)
        return found

    def finished(self, account: str, name: str | None = None) -> list[ReadableSpan]:
        return [
            span
            for span in self.spans.get_finished_spans()
            if (span.attributes or {}).get("creditguard.account") == account
            and (name is None or span.name == name)
        ]


@pytest.fixture(scope="session")
def _sdk() -> Telemetry:
    reader = InMemoryMetricReader()
    # Every guard of every test this worker runs records (telemetry is on by default):
    # thousands of accounts, more than the SDK's 2,000 series per metric by default.
    many = View(instrument_name="creditguard.*", aggregation_cardinality_limit=1_000_000)
    provider = MeterProvider(metric_readers=[reader, PrometheusMetricReader()], views=[many])
    metrics.set_meter_provider(provider)
    assert metrics.get_meter_provider() is provider, "a meter provider was set before"
    sampler = Listening()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(tracer_provider)
    assert trace.get_tracer_provider() is tracer_provider, "a tracer provider was set before"
    return Telemetry(reader, spans, sampler)


@pytest.fixture
def otel(_sdk: Telemetry) -> Iterator[Telemetry]:
    _sdk.spans.clear()
    _sdk.sampler.on = True
    try:
        yield _sdk
    finally:
        _sdk.sampler.on = False
        _sdk.spans.clear()


@pytest.fixture
def fake() -> FakeLensmor:
    """A sandbox with a key of its own: the test's account is its own."""
    return FakeLensmor(api_key=f"lm-secret-{uuid.uuid4().hex}")
