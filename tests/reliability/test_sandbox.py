"""The sandbox's fault modes as a user drives them: over HTTP (``/sandbox/fail``,
``/sandbox/latency``, ``/sandbox/stats``) and from the ``creditguard sandbox`` command."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from creditguard import (
    BalanceUnavailable,
    CreditGuard,
    InvalidResponse,
    RateLimited,
    RetryPolicy,
)
from creditguard.testing import FAULTS, FakeLensmor, parse_fault

from .conftest import Sandbox

ONE_TRY = RetryPolicy(attempts=1, deadline=5.0)


def _auth(fake: FakeLensmor) -> dict[str, str]:
    return {"Authorization": f"Bearer {fake.api_key}"}


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("503", (503, 1)),
        ("429:3", (429, 3)),
        (" drop ", ("drop", 1)),
        ("stall:2", ("stall", 2)),
        *((fault, (fault, 1)) for fault in FAULTS),
    ],
)
def test_parse_fault(spec: str, parsed: tuple[int | str, int]) -> None:
    assert parse_fault(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    [
        *("", "200", "600", "boom", "503:0", "503:x", "drop:-1", "42"),
        *("\u0665\u0660\u0663", "503:\u0663", "503:+1", "503:1_0", "5030", "9" * 400),
    ],
)
def test_parse_fault_rejects(spec: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the mistake
        parse_fault(spec)


def test_fault_endpoint_scripts_faults_over_http(sandbox: Sandbox) -> None:
    fake, url = sandbox.fake, sandbox.url
    with httpx.Client(base_url=url, headers=_auth(fake)) as http:
        response = http.post("/sandbox/fail", params={"fault": "429", "retry_after": "30"})
        assert response.status_code == 200
        assert response.json()["pendingFaults"] == 1
        assert http.post("/sandbox/fail", params={"fault": "not-json", "times": 2}).json() == {
            "balanceRequests": 0,
            "charges": 0,
            "pendingFaults": 3,
            "latency": 0.0,
        }
        with sandbox.guard(retry=ONE_TRY) as guard:
            with pytest.raises(RateLimited) as limited:
                guard.balance()
            assert limited.value.retry_after == 30
            with pytest.raises(InvalidResponse):
                guard.balance()
            http.delete("/sandbox/fail")
            assert guard.balance() == fake.balance
        stats = http.get("/sandbox/stats").json()
        assert stats == {"balanceRequests": 3, "charges": 0, "pendingFaults": 0, "latency": 0.0}


def test_latency_endpoint_delays_answers(sandbox: Sandbox) -> None:
    fake, url = sandbox.fake, sandbox.url
    with httpx.Client(base_url=url, headers=_auth(fake)) as http:
        assert http.post("/sandbox/latency", params={"seconds": "0.3"}).json()["latency"] == 0.3
        with (
            sandbox.guard(timeout=0.1, retry=ONE_TRY) as guard,
            pytest.raises(BalanceUnavailable, match="in time"),
        ):
            guard.balance()
        http.post("/sandbox/latency", params={"seconds": "0"})
    assert fake.latency == 0


@pytest.mark.parametrize(
    ("method", "path", "params", "status"),
    [
        ("POST", "/sandbox/fail", {"fault": "bogus"}, 400),
        ("POST", "/sandbox/fail", {"fault": "503", "times": "0"}, 400),
        ("POST", "/sandbox/fail", {"fault": "503", "times": "x"}, 400),
        ("POST", "/sandbox/fail", {}, 400),
        ("GET", "/sandbox/fail", {}, 405),
        ("POST", "/sandbox/latency", {"seconds": "-1"}, 400),
        ("POST", "/sandbox/latency", {"seconds": "nan"}, 400),
        ("POST", "/sandbox/latency", {}, 400),
        ("GET", "/sandbox/latency", {}, 405),
        ("POST", "/sandbox/stats", {}, 405),
        # Only ASCII digits: int() and float() also take other scripts' digits.
        ("POST", "/sandbox/fail", {"fault": "\u0665\u0660\u0663"}, 400),
        ("POST", "/sandbox/fail", {"fault": "503", "times": "\u0663"}, 400),
        ("POST", "/sandbox/fail", {"fault": "503", "times": "+3"}, 400),
        ("POST", "/sandbox/fail", {"fault": "503", "times": "1_0"}, 400),
        ("POST", "/sandbox/fail", {"fault": "503", "times": "9" * 400}, 400),
        ("POST", "/sandbox/latency", {"seconds": "\u0663"}, 400),
        ("POST", "/sandbox/latency", {"seconds": "1e3"}, 400),
        ("POST", "/sandbox/latency", {"seconds": "inf"}, 400),
        ("POST", "/sandbox/latency", {"seconds": " 1"}, 400),
        # A header value that would end the header and start another.
        ("POST", "/sandbox/fail", {"fault": "429", "retry_after": "1\r\nSet-Cookie: a=b"}, 400),
        ("POST", "/sandbox/fail", {"fault": "429", "retry_after": "1\n"}, 400),
        ("POST", "/sandbox/fail", {"fault": "429", "retry_after": "\u0663\u0660"}, 400),
        ("POST", "/sandbox/fail", {"fault": "429", "retry_after": "1" * 1001}, 400),
        # Misspelt or repeated parameters are not silently ignored.
        ("POST", "/sandbox/fail", {"fault": "503", "retry-after": "1"}, 400),
        ("POST", "/sandbox/fail", [("fault", "503"), ("fault", "500")], 400),
        ("POST", "/sandbox/latency", {"second": "1"}, 400),
        ("GET", "/sandbox/stats", {"x": "1"}, 400),
    ],
)
def test_control_endpoints_reject_bad_requests(
    sandbox: Sandbox, method: str, path: str, params: Any, status: int
) -> None:
    fake = sandbox.fake
    response = httpx.request(method, f"{sandbox.url}{path}", params=params, headers=_auth(fake))
    assert response.status_code == status
    if status == 400:
        assert response.json()["message"]
    assert fake.pending_faults == 0
    assert fake.latency == 0
    # The sandbox still serves the balance: nothing half-valid was scripted.
    with sandbox.guard(retry=ONE_TRY) as guard:
        assert guard.balance(refresh=True) == fake.balance


def test_a_header_injection_is_refused_and_the_sandbox_keeps_serving(sandbox: Sandbox) -> None:
    fake = sandbox.fake
    with httpx.Client(base_url=sandbox.url, headers=_auth(fake)) as http:
        response = http.post(
            "/sandbox/fail", params={"fault": "429", "retry_after": "1\r\nSet-Cookie: a=b"}
        )
        assert response.status_code == 400
        assert "Retry-After" in response.json()["message"]
        balance = http.get("/external/credits/balance")
        assert balance.status_code == 200
        assert "set-cookie" not in balance.headers


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "1\r\nSet-Cookie: a=b"},
        {"Retry-After": "caf\u00e9"},
        {"Retry-After": "\x00"},
        {"Bad Name": "1"},
        {"X-Crlf\r\n": "1"},
    ],
)
def test_fail_next_refuses_headers_that_cannot_be_sent(headers: dict[str, str]) -> None:
    fake = FakeLensmor()
    with pytest.raises(ValueError, match="header"):
        fake.fail_next(429, headers=headers)
    assert fake.pending_faults == 0


@pytest.mark.parametrize(
    ("credits", "status"),
    [
        ("3", 200),
        ("0", 200),
        ("\u0663", 400),  # ARABIC-INDIC DIGIT THREE
        ("\uff13", 400),  # FULLWIDTH DIGIT THREE
        ("+3", 400),
        (" 3", 400),
        ("3_0", 400),
        ("-3", 400),
        ("3.0", 400),
        ("", 400),
        ("9" * 5000, 400),
        ("99999999999", 402),
    ],
)
def test_charge_takes_only_ascii_digits(sandbox: Sandbox, credits: str, status: int) -> None:
    fake = sandbox.fake
    before = fake.balance.total_balance
    response = httpx.post(
        f"{sandbox.url}/sandbox/charge", params={"credits": credits}, headers=_auth(fake)
    )
    assert response.status_code == status, response.text
    spent = int(credits) if status == 200 else 0
    assert fake.balance.total_balance == before - spent


def test_charge_rejects_other_parameters(sandbox: Sandbox) -> None:
    fake = sandbox.fake
    for params in ([("credits", "1"), ("credits", "2")], {"credits": "1", "cost": "2"}):
        response = httpx.post(f"{sandbox.url}/sandbox/charge", params=params, headers=_auth(fake))
        assert response.status_code == 400
    assert fake.charges == 0


@pytest.mark.parametrize("path", ["/sandbox/fail", "/sandbox/latency", "/sandbox/stats"])
def test_control_endpoints_need_the_key(sandbox: Sandbox, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}):
        response = httpx.post(
            f"{sandbox.url}{path}", params={"fault": "503", "seconds": "1"}, headers=headers
        )
        assert response.status_code == 401
    assert sandbox.fake.pending_faults == 0


# -- the command ---------------------------------------------------------------------


@pytest.fixture
def sandbox_command() -> Iterator[tuple[str, list[str]]]:
    """``creditguard sandbox`` with scripted faults, as a user would run it."""
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "creditguard", "sandbox", "--port", "0", "--api-key", "sk-cli"),
            *("--fail", "503:2", "--fail", "drop", "--fail", "429", "--retry-after", "7"),
            *("--fail", "wrong-types", "--latency", "0.05", "--stall-seconds", "1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    banner = [process.stdout.readline()]
    while banner[-1] and "scripted faults" not in banner[-1]:
        banner.append(process.stdout.readline())
    try:
        assert banner[0].startswith("creditguard sandbox on http://127.0.0.1:"), banner
        yield banner[0].split()[3], banner
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_sandbox_command_serves_scripted_faults(sandbox_command: tuple[str, list[str]]) -> None:
    url, banner = sandbox_command
    assert "scripted faults: 503 x2, drop x1, 429 x1, wrong-types x1" in banner[-1]
    assert "latency 0.05s" in banner[-1]
    with CreditGuard("sk-cli", base_url=url, retry=ONE_TRY, timeout=5.0) as guard:
        for _ in range(2):
            with pytest.raises(BalanceUnavailable) as unavailable:
                guard.balance()
            assert unavailable.value.status_code == 503
        with pytest.raises(BalanceUnavailable, match="RemoteProtocolError"):
            guard.balance()
        with pytest.raises(RateLimited) as limited:
            guard.balance()
        assert limited.value.retry_after == 7
        with pytest.raises(InvalidResponse):
            guard.balance()
        started = time.monotonic()
        assert guard.balance().total_balance == 30050
        assert time.monotonic() - started >= 0.05  # the latency asked for
        stats = httpx.get(f"{url}/sandbox/stats", headers={"Authorization": "Bearer sk-cli"})
        assert stats.json()["balanceRequests"] == 6


@pytest.mark.parametrize(
    "argv",
    [
        ["--fail", "bogus"],
        ["--fail", "503:0"],
        ["--latency", "-1"],
        ["--stall-seconds", "nan"],
        ["--task-polls", "0"],
        ["--rate-limit", "-1"],
        ["--balance-shape", "0.23"],
        ["--addon", "1.5"],
    ],
)
def test_sandbox_command_rejects_bad_flags(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "creditguard", "sandbox", "--port", "0", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "error: argument" in done.stderr


def test_sandbox_command_serves_the_paid_endpoints_and_balance_options() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "creditguard", "sandbox", "--port", "0", "--addon", "100"),
            *("--float-numbers", "--rate-limit", "50", "--task-polls", "1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    banner = [process.stdout.readline()]
    while banner[-1] and "scripted faults" not in banner[-1]:
        banner.append(process.stdout.readline())
    try:
        url = banner[0].split()[3]
        text = "".join(banner)
        assert "POST /external/events/{id}/unlock" in text
        assert "completed on poll 1" in text
        assert "balance shape 0.24, float numbers; rate limit 50/min" in text
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer test-key"}) as http:
            balance = http.get("/external/credits/balance")
            assert balance.json()["addonBalance"] == 100.0
            assert balance.json()["totalBalance"] == 30150.0
            assert "30150.0" in balance.text
            assert balance.headers["x-ratelimit-limit"] == "50"
            submitted = http.post("/external/contacts/unlock", json={"personnel_ids": ["7"]})
            assert submitted.status_code == 201
            task = http.get(f"/external/contacts/unlock-tasks/{submitted.json()['task_id']}")
            assert task.json()["taskStatus"] == "completed"
            unlocked = http.post("/external/events/26855/unlock")
            assert unlocked.status_code == 201
            assert unlocked.json()["creditsUsed"] == 2000.0
            assert http.get("/external/credits/balance").json()["totalBalance"] == 30150 - 2015
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_sandbox_command_refuses_add_ons_in_the_022_shape() -> None:
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "creditguard", "sandbox", "--port", "0"),
            *("--addon", "5", "--balance-shape", "0.22"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "--addon needs --balance-shape 0.24" in done.stderr


def test_spend_outside_over_http(sandbox: Sandbox) -> None:
    fake = sandbox.fake
    with httpx.Client(base_url=sandbox.url, headers=_auth(fake)) as http:
        response = http.post("/sandbox/spend-outside", params={"credits": "40"})
        assert response.status_code == 200
        assert response.json()["totalBalance"] == 1010
        assert http.post("/sandbox/spend-outside", params={"credits": "2000"}).status_code == 402
        assert http.post("/sandbox/spend-outside", params={"credits": "x"}).status_code == 400
        assert http.get("/sandbox/spend-outside", params={"credits": "1"}).status_code == 405
    assert httpx.post(f"{sandbox.url}/sandbox/spend-outside?credits=1").status_code == 401
    assert (fake.balance.total_balance, fake.charges) == (1010, 0)
    with sandbox.guard(retry=ONE_TRY) as guard:
        assert guard.balance().total_balance == 1010
