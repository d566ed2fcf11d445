"""The guard's own async transports follow the event loops they belong to: each loop's
connections are closed when that loop ends, and nothing keeps a finished loop alive, with
``asyncio.run``, ``anyio.run`` on asyncio and trio, manual loops and loops in threads."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor, serve
from tests.reliability.support import client_sockets


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeLensmor, str]]:
    fake = FakeLensmor()
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def guard(server: tuple[FakeLensmor, str]) -> Iterator[CreditGuard]:
    fake, url = server
    with CreditGuard(fake.api_key, base_url=url) as g:
        yield g


def _held(guard: CreditGuard) -> int:
    """How many per-loop transports the guard holds."""
    return len(guard._clients.aclient._transports)


def _reader(guard: CreditGuard, loops: list[weakref.ref[Any]]) -> Callable[[], Any]:
    async def read() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await guard.abalance(refresh=True)

    return read


def _alive(loops: list[weakref.ref[Any]]) -> int:
    gc.collect()
    return sum(1 for ref in loops if ref() is not None)


def test_asyncio_run_closes_each_loops_connection_and_keeps_no_loop(
    guard: CreditGuard, server: tuple[FakeLensmor, str]
) -> None:
    _, url = server
    loops: list[weakref.ref[Any]] = []
    read = _reader(guard, loops)
    for _ in range(30):
        asyncio.run(read())
        # Closed as the loop ended, not later by the garbage collector.
        assert client_sockets(url) == 0
    assert _held(guard) == 0
    assert _alive(loops) == 0


def test_anyio_run_on_both_backends_closes_each_loops_connection(
    guard: CreditGuard, server: tuple[FakeLensmor, str]
) -> None:
    _, url = server
    for backend in ("asyncio", "trio") * 10:
        anyio.run(lambda: guard.abalance(refresh=True), backend=backend)
        assert client_sockets(url) == 0, backend
    assert _held(guard) == 0


def test_loops_in_several_threads_at_once(
    guard: CreditGuard, server: tuple[FakeLensmor, str]
) -> None:
    _, url = server
    loops: list[weakref.ref[Any]] = []
    read = _reader(guard, loops)
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            start.wait()
            for _ in range(5):
                if index % 2:
                    anyio.run(lambda: guard.abalance(refresh=True), backend="trio")
                else:
                    asyncio.run(read())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert client_sockets(url) == 0
    assert _held(guard) == 0
    assert _alive(loops) == 0


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_loops_closed_without_finalizing_are_let_go(
    guard: CreditGuard, server: tuple[FakeLensmor, str]
) -> None:
    """``loop.close()`` without ``shutdown_asyncgens()``: the guard cannot close the
    connection in that loop any more, but lets the loop go when it meets the next loop
    (or is closed), so at most the newest such loop is held."""
    _, url = server
    loops: list[weakref.ref[Any]] = []
    read = _reader(guard, loops)
    for _ in range(10):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(read())
        loop.close()
        del loop
        assert _alive(loops) <= 1
        assert _held(guard) <= 1
    guard.close()
    assert _alive(loops) == 0
    assert client_sockets(url) == 0


def test_close_from_another_thread_closes_the_loops_connection_in_its_loop(
    guard: CreditGuard, server: tuple[FakeLensmor, str]
) -> None:
    _, url = server
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        portal.call(lambda: guard.abalance(refresh=True))
        assert client_sockets(url) == 1
        guard.close()  # sync, from this thread: the loop closes its connection itself
        assert _held(guard) == 0

        async def until_closed() -> int:
            for _ in range(1000):  # loop iterations, not time
                if client_sockets(url) == 0:
                    break
                await anyio.lowlevel.checkpoint()
            return client_sockets(url)

        assert portal.call(until_closed) == 0
        portal.call(lambda: guard.abalance(refresh=True))  # usable again: a new transport
        assert _held(guard) == 1
    assert _held(guard) == 0
    assert client_sockets(url) == 0


@pytest.mark.anyio
async def test_aclose_closes_the_current_loops_connection(
    guard: CreditGuard, server: tuple[FakeLensmor, str]
) -> None:
    _, url = server
    await guard.abalance(refresh=True)
    assert client_sockets(url) == 1
    await guard.aclose()
    assert client_sockets(url) == 0
    assert _held(guard) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE and /proc")
def test_many_asyncio_runs_within_a_small_file_limit() -> None:
    """Every ``asyncio.run`` used to leave a socket open (two descriptors here, with the
    server in the same process): with 64 descriptors, a few dozen runs failed with 'Too
    many open files'."""
    script = textwrap.dedent(
        """
        import asyncio, os, resource
        from creditguard import CreditGuard
        from creditguard.testing import FakeLensmor, serve

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        fake = FakeLensmor()
        with serve(fake.app) as url:
            guard = CreditGuard(fake.api_key, base_url=url)
            asyncio.run(guard.abalance(refresh=True))
            first = len(os.listdir("/proc/self/fd"))
            for _ in range(80):
                asyncio.run(guard.abalance(refresh=True))
            print(len(os.listdir("/proc/self/fd")) - first)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LENSMOR_", "PYTEST_"))}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The server's side of the last connections may still be closing in its thread.
    assert int(result.stdout.strip()) <= 2, result.stdout
