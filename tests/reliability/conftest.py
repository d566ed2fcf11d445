"""Shared fixtures of the reliability suite: the sandbox served by uvicorn over loopback,
and counters of what a test may leak (tasks, threads, sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor, serve

Scope = dict[str, Any]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test of this suite runs on asyncio and on trio."""
    return str(request.param)


class Switch:
    """An ASGI app that forwards to the sandbox of the current test, so one uvicorn
    server (started once per session) serves a fresh ``FakeLensmor`` to every test."""

    def __init__(self) -> None:
        self.target: FakeLensmor | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # any sandbox answers startup and shutdown
            await (self.target or FakeLensmor()).app(scope, receive, send)
            return
        target = self.target
        assert target is not None, "no sandbox is active"
        await target.app(scope, receive, send)


@pytest.fixture(scope="session")
def _served_switch() -> Iterator[tuple[Switch, str]]:
    switch = Switch()
    with serve(switch) as url:
        yield switch, url


@dataclass
class Sandbox:
    """A fresh in-memory credits service, reachable at ``url`` over real HTTP."""

    fake: FakeLensmor
    url: str

    def guard(self, **kwargs: Any) -> CreditGuard:
        kwargs.setdefault("base_url", self.url)
        return CreditGuard(kwargs.pop("api_key", self.fake.api_key), **kwargs)


@pytest.fixture
def sandbox(_served_switch: tuple[Switch, str]) -> Iterator[Sandbox]:
    switch, url = _served_switch
    fake = FakeLensmor(subscription_balance=1000, gift_balance=50, api_key="sk-test-sandbox")
    switch.target = fake
    try:
        yield Sandbox(fake, url)
    finally:
        fake.clear_faults()
        fake.latency = 0.0
