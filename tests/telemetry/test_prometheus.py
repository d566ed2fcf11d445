"""The metrics as Prometheus scrapes them: the OpenTelemetry Prometheus exporter's reader
(set up with the SDK in tests/telemetry/conftest.py) served by ``prometheus_client`` over
real HTTP on a free port, and the names docs/howto/telemetry.md gives."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import start_http_server

from creditguard import CreditGuard, InsufficientCredits
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend
from tests.telemetry.conftest import Telemetry


@pytest.fixture
def metrics_url() -> Iterator[str]:
    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


_SERIES = re.compile(r"^(?P<name>\w+)\{(?P<labels>.*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _scrape(url: str, account: str) -> list[tuple[str, dict[str, str], float]]:
    """The account's series: (name, labels but the exporter's ``otel_scope_*`` and the
    empty ones, value)."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    found = []
    for line in text.splitlines():
        match = _SERIES.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.pop("creditguard_account", None) != account:
            continue
        # (An empty label is no label to Prometheus: the exporter writes one for each
        # attribute another point of the metric has.)
        labels = {k: v for k, v in labels.items() if v and not k.startswith("otel_scope_")}
        found.append((match["name"], labels, float(match["value"])))
    return found


def _value(series: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    (value,) = [v for n, found, v in series if n == name and found == labels]
    return value


def test_prometheus_scrapes_the_metrics(
    otel: Telemetry, fake: FakeLensmor, new_backend: NewBackend, metrics_url: str
) -> None:
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    account = guard.account

    @guard.requires_credits(5)
    def unlock() -> None:
        pass

    unlock()
    with pytest.raises(InsufficientCredits), guard.spend(10**9):
        pass
    hold = guard.hold(30)
    series = _scrape(metrics_url, account)
    hold.release()
    guard.close()
    assert {name for name, _, _ in series} >= {
        "creditguard_calls_total",
        "creditguard_credits_charged_total",
        "creditguard_balance_reads_total",
        "creditguard_admission_duration_seconds_bucket",
        "creditguard_admission_duration_seconds_count",
        "creditguard_admission_duration_seconds_sum",
        "creditguard_balance",
        "creditguard_credits_reserved",
        "creditguard_credits_held",
    }
    calls = "creditguard_calls_total"
    assert _value(series, calls, creditguard_outcome="admitted") == 1
    assert _value(series, calls, creditguard_outcome="refused", creditguard_reason="balance") == 1
    charged = "creditguard_credits_charged_total"
    assert _value(series, charged, creditguard_action=unlock.__qualname__) == 5
    reads = "creditguard_balance_reads_total"
    assert _value(series, reads, creditguard_outcome="ok") >= 1
    assert _value(series, "creditguard_credits_held") == 30
    assert _value(series, "creditguard_credits_reserved") == 0
    assert _value(series, "creditguard_balance") == 30050
    count = "creditguard_admission_duration_seconds_count"
    assert _value(series, count, creditguard_outcome="admitted") == 2
    # The buckets are made for seconds: from 50 us to 30 s.
    bucket = "creditguard_admission_duration_seconds_bucket"
    bounds = {labels["le"] for name, labels, _ in series if name == bucket}
    assert {"0.001", "1.0", "30.0", "+Inf"} <= bounds
    assert _value(series, bucket, creditguard_outcome="admitted", le="30.0") == 2
    assert fake.api_key not in repr(series)
