"""Test doubles (a transport that holds balance reads until the test releases them) and
looks at a guard's account state."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import anyio.to_thread
import httpx

from creditguard import CreditGuard, StateBackend

NewBackend = Callable[[], StateBackend]
"""The ``new_backend`` fixture (tests/conftest.py): each call a new state backend of the
kind the test runs on."""


class Gate(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps a transport; each request is answered *as of its arrival* but held until
    ``open()``; ``arrived`` counts requests and ``wait_arrivals(n)`` waits for them."""

    def __init__(self, inner: httpx.BaseTransport | httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.opened = threading.Event()
        self.arrived = 0
        self._cond = threading.Condition()

    def open(self) -> None:
        self.opened.set()

    def close_gate(self) -> None:
        self.opened.clear()

    def _arrive(self) -> None:
        with self._cond:
            self.arrived += 1
            self._cond.notify_all()

    def wait_arrivals(self, n: int, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.arrived >= n, timeout):
                raise AssertionError(f"expected {n} requests, got {self.arrived}")

    async def await_arrivals(self, n: int) -> None:
        await anyio.to_thread.run_sync(self.wait_arrivals, n)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.inner, httpx.BaseTransport)
        response = self.inner.handle_request(request)
        body = response.read()  # the answer as of now
        self._arrive()
        self.opened.wait(10)
        return httpx.Response(response.status_code, headers=response.headers, content=body)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.inner, httpx.AsyncBaseTransport)
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        self._arrive()
        await anyio.to_thread.run_sync(self.opened.wait, 10, abandon_on_cancel=True)
        return httpx.Response(response.status_code, headers=response.headers, content=body)


class AsyncOnly(httpx.AsyncBaseTransport):
    """A transport that serves async requests only (a guard given one cannot read from
    sync code)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)


def reserved(guard: CreditGuard) -> int:
    """The credits the guard's account holds for calls in flight or waiting for a read."""
    return guard._account.snapshot()[1]


def waiting_for_release(guard: CreditGuard) -> int:
    """How many calls wait at admission for spends in flight to settle."""
    account = guard._account
    with account.lock:
        return len(account.waiters)  # type: ignore[attr-defined]


def settled(guard: CreditGuard) -> int:
    """:func:`reserved` after a balance read, which settles every call that finished and
    waits for one (blocks and decorated calls settle later)."""
    guard.balance()
    return reserved(guard)


ROOT = Path(__file__).resolve().parents[1]


def run_python(
    code: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python process of its own (the repository importable, from its
    root), with ``env`` (default: this process's environment); its output captured."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
