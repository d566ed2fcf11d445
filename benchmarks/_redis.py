"""Redis for the benchmarks: a throwaway ``redis-server`` for the run, and what the
scenarios count on it.

* :func:`server_for_run` starts ``redis-server`` on a free loopback port (no persistence,
  its files in a temporary directory) and stops it at the end; :data:`SERVER` says where
  it is, or why there is none (``redis-server`` not found, redis-py not installed, it did
  not start): the Redis variants are then left out and reported missing. ``REDIS_SERVER``
  names a binary outside ``PATH``.
* :func:`count_round_trips` counts what redis-py sends to Redis from this process: every
  ``send_packed_command`` is one request (one command, or a pipeline's batch), so one
  round trip, connection set-up (``HELLO``, ``CLIENT SETINFO``) and health checks included.
  The server cannot tell: ``INFO commandstats`` also counts every command a Lua script
  runs (``redis.call``), which :func:`commands_executed` reports as what Redis executed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from typing import Any

from creditguard.backends.redis.clients import _POOL
from creditguard.testing._redis_server import RedisServer as _Process
from creditguard.testing._redis_server import RedisServerError


@dataclasses.dataclass
class RedisServer:
    """The run's Redis: ``url`` when one is running, else ``missing`` says why."""

    url: str | None = None
    version: str | None = None
    missing: str | None = None

    def info(self) -> dict[str, Any]:
        """For the JSON's ``run.redis``."""
        if self.url is None:
            return {"missing": self.missing}
        return {"server": self.version}


SERVER = RedisServer()


def _version(url: str) -> str | None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


@contextlib.contextmanager
def server_for_run(needed: bool) -> Iterator[RedisServer]:
    """A redis-server for the ``with`` block when ``needed`` (else nothing is started);
    :data:`SERVER` describes it, or why there is none."""
    SERVER.url = SERVER.version = SERVER.missing = None
    if not needed:
        yield SERVER
        return
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        SERVER.missing = "redis-py is not installed (pip install 'creditguard[redis]')"
    if SERVER.missing is None and not binary:
        SERVER.missing = (
            "redis-server not found on PATH (install it, e.g. apt-get install redis-server,"
            " or set REDIS_SERVER to its path)"
        )
    elif SERVER.missing is None and not os.access(str(binary), os.X_OK):
        SERVER.missing = f"REDIS_SERVER={binary} is not an executable file"
    if SERVER.missing is not None:
        yield SERVER
        return
    try:
        server = _Process()
        server.start()
    except RedisServerError as exc:
        SERVER.missing = str(exc)
        yield SERVER
        return
    try:
        SERVER.url = server.url
        SERVER.version = _version(SERVER.url)
        yield SERVER
    finally:
        SERVER.url = None
        server.close()


# --------------------------------------------------------------------------------------
# Clients

# As RedisBackend builds its clients from a URL: every round trip bounded, a bounded
# pool per process (a caller beyond it waits its turn).
CLIENT_OPTIONS: dict[str, Any] = dict(_POOL)


def client(url: str) -> Any:
    """A ``redis.Redis`` made as RedisBackend makes its own from ``url``."""
    import redis

    return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, **CLIENT_OPTIONS))


def async_client(url: str) -> Any:
    """A ``redis.asyncio.Redis`` made as RedisBackend makes one per event loop."""
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(url, **CLIENT_OPTIONS)
    return redis.asyncio.Redis(connection_pool=pool)


# --------------------------------------------------------------------------------------
# Counting


class RoundTrips:
    """Requests redis-py sent to Redis from this process while :func:`count_round_trips`
    was active (any thread, any client)."""

    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def count_round_trips() -> Iterator[RoundTrips]:
    """Count every ``send_packed_command`` of redis-py's sync and asyncio connections (a
    thin wrapper around them, removed at the end of the block)."""
    counter = RoundTrips()
    try:
        import redis.asyncio.connection as aconn
        import redis.connection as conn
    except ImportError:  # no redis-py: nothing to count
        yield counter
        return
    sync_send = conn.AbstractConnection.send_packed_command
    async_send = aconn.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        counter.count += 1
        sync_send(self, command, check_health)

    async def asend(self: Any, command: Any, check_health: bool = True) -> None:
        counter.count += 1
        await async_send(self, command, check_health)

    conn.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    aconn.AbstractConnection.send_packed_command = asend  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        conn.AbstractConnection.send_packed_command = sync_send  # type: ignore[method-assign]
        aconn.AbstractConnection.send_packed_command = async_send  # type: ignore[method-assign]


def commands_executed(client: Any) -> int:
    """Commands Redis has executed so far (``INFO commandstats``: those sent by clients
    and those run inside Lua scripts), the ``INFO`` calls that read it left out."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
