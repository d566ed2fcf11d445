"""docs/howto/telemetry.md runs as written: its untitled python blocks, in page order, in a
process of their own (they set the global OpenTelemetry providers, which a process can
set once), against the sandbox served over loopback HTTP, with the metrics page on a free
port instead of 9464; what the page says they print is what they print."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from creditguard.testing import FakeLensmor, serve
from tests.helpers import run_python
from tests.test_docs_examples import blocks

PAGE = "howto/telemetry.md"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_telemetry_page_runs() -> None:
    page = blocks(PAGE)
    code = [b for b in page if b.lang == "python" and b.title is None]
    assert len(code) >= 3
    (output,) = [b for b in page if b.title == "Output"]
    script = "\n".join(b.code for b in code).replace("9464", str(_free_port()))
    fake = FakeLensmor()
    with serve(fake.app) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LENSMOR_", "OTEL_"))}
        env.update(LENSMOR_BASE_URL=url, LENSMOR_API_KEY=fake.api_key)
        result = run_python(script, env, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = [line for line in result.stdout.splitlines() if line.startswith("creditguard_")]
    assert printed == output.code.strip().splitlines()


# What the page's sampling.py is shown to do: a guarded call outside any span records no
# span; one inside a recording span is traced, a child of it.
SAMPLED = """
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from creditguard import CreditGuard

spans = InMemorySpanExporter()
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(spans))
guard = CreditGuard()
with guard.spend(5):
    pass
assert spans.get_finished_spans() == (), spans.get_finished_spans()
with trace.get_tracer("app").start_as_current_span("request") as request:
    with guard.spend(5):
        pass
names = {span.name: span for span in spans.get_finished_spans()}
assert set(names) == {"request", "creditguard.spend"}, names
parent = names["creditguard.spend"].parent
assert parent is not None and parent.span_id == request.get_span_context().span_id
print("ok")
"""


def test_the_sampling_sample_keeps_the_spans_inside_traces() -> None:
    (sample,) = [b for b in blocks(PAGE) if b.title == "sampling.py"]
    fake = FakeLensmor()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LENSMOR_", "OTEL_"))}
    env.update(LENSMOR_API_KEY=fake.api_key)
    with serve(fake.app) as url:
        env.update(LENSMOR_BASE_URL=url)
        result = run_python(sample.code + SAMPLED, env, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["ok"]
