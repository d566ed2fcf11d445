"""Helpers of the reliability suite (not fixtures): leak counters and state probes."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from creditguard import CreditGuard


def reads_in_flight(guard: CreditGuard) -> int:
    """How many balance reads the guard's account has in progress."""
    account: Any = guard._account
    with account.lock:
        if hasattr(account, "flights"):
            return len(account.flights)
        return 0 if account.flight is None else 1


def assert_clean(guard: CreditGuard, *, cached: bool = False) -> None:
    """No reservation, no call in flight, no read in flight (and, unless ``cached``,
    no cached balance) on the guard's account."""
    balance, reserved, inflight = guard._account.snapshot()
    assert (reserved, inflight) == (0, 0)
    assert reads_in_flight(guard) == 0
    if not cached:
        assert balance is None, f"a balance was cached: {balance}"


# -- leak counters -----------------------------------------------------------------


def _tcp_endpoints() -> dict[int, tuple[int, int]]:
    """inode -> (local port, remote port) of this machine's TCP sockets (IPv4 and IPv6)."""
    endpoints: dict[int, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    local, remote, inode = fields[1], fields[2], int(fields[9])
                    endpoints[inode] = (
                        int(local.rsplit(":", 1)[1], 16),
                        int(remote.rsplit(":", 1)[1], 16),
                    )
        except FileNotFoundError:  # pragma: no cover - not Linux
            continue
    return endpoints


def open_sockets() -> list[tuple[int, int]]:
    """(local port, remote port) of every TCP socket this process holds open."""
    endpoints = _tcp_endpoints()
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode in endpoints:
                found.append(endpoints[inode])
    return found


async def sockets_closed(before: int, within: float = 10.0) -> int:
    """How many TCP sockets this process holds, once it holds no more than ``before``, or
    after ``within`` seconds. The sandbox serves in a thread of this process: when a
    client closes its connections, the server closes its own ends when its thread gets
    to it, which a loaded machine may delay; nothing tells when, so this looks again
    every 20 ms (bounded)."""
    deadline = time.monotonic() + within
    while True:
        count = len(open_sockets())
        if count <= before or time.monotonic() >= deadline:
            return count
        await anyio.sleep(0.02)


def client_sockets(server_url: str) -> int:
    """How many TCP connections this process holds *to* the server at ``server_url``."""
    port = int(server_url.rsplit(":", 1)[1])
    return sum(1 for _, remote in open_sockets() if remote == port)
