"""End to end over real loopback HTTP: the sandbox served by uvicorn, and the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import anyio
import httpx
import pytest

from creditguard import AuthenticationError, CreditGuard, InsufficientCredits
from creditguard.testing import FakeLensmor, serve


def charge(url: str, key: str, n: int) -> None:
    """The 'paid call': spend on the served sandbox over HTTP."""
    response = httpx.post(
        f"{url}/sandbox/charge", params={"credits": n}, headers={"Authorization": f"Bearer {key}"}
    )
    response.raise_for_status()


async def acharge(client: httpx.AsyncClient, url: str, key: str, n: int) -> None:
    response = await client.post(
        f"{url}/sandbox/charge", params={"credits": n}, headers={"Authorization": f"Bearer {key}"}
    )
    response.raise_for_status()


def test_sync_guarded_calls_over_http(fake: FakeLensmor, served: str) -> None:
    with CreditGuard(fake.api_key, base_url=served) as guard:

        @guard.requires_credits(lambda ids: 10 * len(ids))
        def unlock(ids: list[str]) -> int:
            charge(served, fake.api_key, 10 * len(ids))
            return len(ids)

        assert unlock(["a", "b", "c"]) == 3
        assert guard.balance().total_balance == 30020
        with guard.spend(30000) as spend:
            charge(served, fake.api_key, 30000)
        assert spend.balance_after is not None
        assert spend.balance_after.subscription_balance == 0
        assert spend.balance_after.gift_balance == 20
        with pytest.raises(InsufficientCredits):
            unlock(["d", "e", "f"])
    assert fake.balance.total_balance == 20


@pytest.mark.anyio
async def test_async_guarded_calls_over_http(fake: FakeLensmor, served: str) -> None:
    async with CreditGuard(fake.api_key, base_url=served) as guard, httpx.AsyncClient() as client:

        @guard.requires_credits(7)
        async def unlock() -> None:
            await acharge(client, served, fake.api_key, 7)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(unlock)
        assert (await guard.abalance()).total_balance == 30050 - 350
    assert fake.balance.total_balance == 30050 - 350


@pytest.mark.anyio
async def test_no_overspend_over_http() -> None:
    fake = FakeLensmor(subscription_balance=500, gift_balance=0)
    fake.latency = 0.002
    admitted = denied = 0
    with serve(fake.app) as url:
        async with CreditGuard(fake.api_key, base_url=url) as guard, httpx.AsyncClient() as c:

            async def call() -> None:
                nonlocal admitted, denied
                try:
                    async with guard.spend(10):
                        await acharge(c, url, fake.api_key, 10)  # a 402 here is an overspend
                    admitted += 1
                except InsufficientCredits:
                    denied += 1

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(call)
    assert (admitted, denied) == (50, 150)
    assert fake.balance.total_balance == 0
    assert fake.balance_requests < 20


def test_wrong_key_over_http(served: str) -> None:
    guard = CreditGuard("not-the-key", base_url=served)
    with pytest.raises(AuthenticationError) as info:
        guard.balance()
    assert info.value.status_code == 401


def test_one_guard_many_event_loops(fake: FakeLensmor, served: str) -> None:
    """A guard used from anyio.run in turn (asyncio, trio, asyncio again) keeps working."""
    guard = CreditGuard(fake.api_key, base_url=served, ttl=0)

    async def spend_once() -> int:
        async with guard.spend(1) as spend:
            fake.charge(1)
        assert spend.balance_after is not None
        return spend.balance_after.total_balance

    assert anyio.run(spend_once, backend="asyncio") == 30049
    assert anyio.run(spend_once, backend="trio") == 30048
    assert anyio.run(spend_once, backend="asyncio") == 30047
    assert guard.balance(refresh=True).total_balance == 30047
    guard.close()


# -- the CLI ----------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LENSMOR_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "creditguard", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_cli_balance_table_and_json(fake: FakeLensmor, served: str) -> None:
    env = {"LENSMOR_API_KEY": fake.api_key, "LENSMOR_BASE_URL": served}
    table = run_cli("balance", env=env)
    assert table.returncode == 0, table.stderr
    assert "subscription" in table.stdout
    assert "30,000" in table.stdout
    assert "gift" in table.stdout
    raw = run_cli("balance", "--json", env=env)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == fake.balance.to_api()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LENSMOR_API_KEY": "wrong"}, "rejected the API key"),
        ({}, "LENSMOR_API_KEY"),
        ({"LENSMOR_API_KEY": "k", "LENSMOR_BASE_URL": "UNREACHABLE"}, "could not reach"),
    ],
)
def test_cli_errors_are_one_line(served: str, env: dict[str, str], message: str) -> None:
    env = dict(env)
    if "LENSMOR_API_KEY" in env:
        env.setdefault("LENSMOR_BASE_URL", served)
    if env.get("LENSMOR_BASE_URL") == "UNREACHABLE":
        env["LENSMOR_BASE_URL"] = f"http://127.0.0.1:{free_port()}"
    result = run_cli("balance", env=env)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_cli_demo_offline() -> None:
    result = run_cli("demo", env={"LENSMOR_BASE_URL": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "sub" in out
    assert "gift" in out
    assert "InsufficientCredits" in out
    assert "the paid call never ran" in out
    assert result.stderr == ""


def test_cli_usage_errors() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage" in result.stderr
