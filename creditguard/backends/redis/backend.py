"""The Redis backend: one account's guard state shared by every process that uses it.

``CreditGuard(..., backend=RedisBackend("redis://127.0.0.1:6379/0"))`` makes guards in any
number of processes (gunicorn or uvicorn workers, Celery workers, pods) admit against the
same cached balance and the same reservations, so two workers cannot both spend the last
credits, and read the balance upstream about once per TTL between them.

This module is the backend itself: its configuration, its Redis clients (the sync one, and
one ``redis.asyncio`` client per event loop when built from a URL, closed with its loop)
and the accounts it hands out. The rest of the package:

* :mod:`.account`: one account's state as the guard drives it (admission, settling),
  with its reads in :mod:`.reads` and its gate and holds in :mod:`.holds`, sharing an
  :class:`~.context.AccountContext`; :mod:`.calls` turns script calls into the guard's
  ``Call``s (sync, asyncio, trio; never cut in two by a cancellation);
* :mod:`.fallback`: what runs while Redis is down (``fallback="memory"``, and spends run
  unchecked);
* :mod:`.scripts` and :mod:`.gate`: the Lua scripts (``state.lua``, ``gate.lua``), one per
  change of state, so every decision is atomic; :mod:`.answers`: their answers, decoded;
* :mod:`.leases`: the lease renewer, uncut script calls, the eviction-policy check.

Reads are shared across processes with a lock in Redis: the process that takes it reads,
the others look again every few milliseconds until its balance is stored (bounded: if the
leader dies its lock expires and another takes over). Waiting is polling, not pub/sub, so
a lost message can never strand a caller.

Reservations are leases (``lease`` seconds): a background thread renews the leases of the
calls this process has in flight, so a worker killed mid-action (SIGKILL) strands its
credits for at most ``lease`` seconds, after which the cached balance is distrusted (its
spend is unknown). :meth:`RedisBackend.close` stops that thread. The renewer also records
again the reservations Redis lost (a restart, a flush, an eviction): see :mod:`.leases`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.to_thread

from creditguard.backends.memory import Account
from creditguard.backends.redis.account import RedisAccount
from creditguard.backends.redis.calls import Link
from creditguard.backends.redis.clients import aclose_client, close_client, topology
from creditguard.backends.redis.fallback import FallbackAccount
from creditguard.backends.redis.leases import (
    LeaseKeeper,
    acheck_eviction,
    check_eviction,
    on_asyncio,
)
from creditguard.backends.redis.scripts import DEFAULT_PREFIX
from creditguard.core.checks import _check_seconds
from creditguard.core.loops import LoopKeeper

if TYPE_CHECKING:
    import redis as redis_py
    import redis.asyncio as redis_asyncio
    import redis.asyncio.cluster as redis_async_cluster
    import redis.cluster as redis_cluster

    from creditguard.backends.redis.clients import AsyncClient, SyncClient

__all__ = ["RedisBackend"]


class RedisBackend(LeaseKeeper):
    """Account state in Redis (or Valkey), shared by every process that uses the same
    server and ``prefix``.

    ``url`` defaults to ``CREDITGUARD_REDIS_URL``. ``cluster=True``: ``url`` names a node
    of a Redis Cluster. ``sentinels`` (``[(host, port), ...]``) and ``service_name``: the
    primary is the one those Sentinels name, and after a failover the new one (no
    ``url`` then). Or pass ``client`` (a ``redis.Redis``, including one from
    ``Sentinel.master_for``, or a ``redis.cluster.RedisCluster``) and, for asyncio,
    ``async_client`` (``redis.asyncio``, or its ``RedisCluster``; without it, one is made
    per event loop from ``url`` or the sentinels, or the sync client runs in a worker
    thread). Contradictory arguments are refused before any network call. ``lease``
    (seconds, above 0.1 and at most ``MAX_SECONDS``) is how long a call's reservation
    outlives its process. The first script call asks Redis for its ``maxmemory-policy``
    first and logs a warning unless it is ``noeviction`` (an evicting Redis may drop the
    guard's keys; see "Running many workers"). ``fallback="memory"``: while Redis is
    unreachable, keep this process running on state of its own (logged; processes are
    then not coordinated); by default the guard's ``on_unavailable`` policy applies, with
    a :class:`~creditguard.BalanceUnavailable` that names Redis.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis_py.Redis | redis_cluster.RedisCluster | None = None,
        async_client: redis_asyncio.Redis | redis_async_cluster.RedisCluster | None = None,
        prefix: str = DEFAULT_PREFIX,
        lease: float = 60.0,
        fallback: Literal["memory"] | None = None,
        cluster: bool = False,
        sentinels: Sequence[tuple[str, int]] | None = None,
        service_name: str | None = None,
    ) -> None:
        try:
            import redis as redis_py
            import redis.asyncio
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ImportError(
                "RedisBackend needs redis-py: pip install 'creditguard[redis]'"
            ) from exc
        where = topology(
            url,
            client,
            async_client,
            cluster,
            sentinels,
            service_name,
            os.environ.get("CREDITGUARD_REDIS_URL"),
        )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix must not contain '{{' or '}}' (got {prefix!r}): every key of an"
                " account carries its fingerprint as the hash tag, so that Redis Cluster"
                " keeps them in one slot"
            )
        lease = _check_seconds("lease", lease, positive=True)
        if not lease > 0.1:
            raise ValueError(f"lease must be a number of seconds above 0.1, got {lease!r}")
        if fallback not in (None, "memory"):
            raise ValueError(f"fallback must be None or 'memory', got {fallback!r}")
        super().__init__()
        self.prefix = prefix
        self.lease = float(lease)
        self.fallback = fallback
        self._lease_ms = int(lease * 1000)
        self._topology = where
        self._own_client = client is None
        self._client: SyncClient = client if client is not None else where.sync_client()
        self._async_client: AsyncClient | None = async_client
        # One asyncio client per event loop, closed by its loop when the loop shuts down
        # (asyncio.run, anyio.run), so its sockets never outlive it.
        self._loop_clients: LoopKeeper[AsyncClient] = LoopKeeper(aclose_client)
        # what means "Redis did not answer" (a cluster without a node to ask raises a
        # RedisClusterException, which is not a RedisError)
        self._errors: tuple[type[Exception], ...] = (
            redis_py.RedisError,
            redis_py.exceptions.RedisClusterException,
            OSError,
        )
        self._accounts: weakref.WeakValueDictionary[str, FallbackAccount] = (
            weakref.WeakValueDictionary()
        )
        # Redis's eviction policy, asked once, before the first script call (on the same
        # connection: see check_eviction).
        self.eviction_checked = threading.Event()
        self._eviction_asked = False

    def __repr__(self) -> str:
        kind = "" if self._topology.kind == "server" else f" {self._topology.kind}"
        return f"<RedisBackend{kind} prefix={self.prefix!r} lease={self.lease:g}>"

    def account(self, fingerprint: str) -> FallbackAccount:
        """The state of the account ``fingerprint``: kept in Redis, and in this process's
        memory while Redis is down (see :mod:`.fallback`)."""
        with self._lock:
            account = self._accounts.get(fingerprint)
            if account is None:
                account = self._accounts[fingerprint] = FallbackAccount(
                    RedisAccount(self._link(), fingerprint),
                    Account(fingerprint),
                    serve=self.fallback == "memory",
                )
            return account

    def _link(self) -> Link:
        """What an account of this backend reaches Redis with (held by the account, not
        by the backend: accounts keep their backend alive, not the other way round)."""
        return Link(
            client=self._client,
            async_client=self._async_client_here,
            check_eviction=self._check_eviction,
            acheck_eviction=self._acheck_eviction,
            errors=self._errors,
            leases=self,
            prefix=self.prefix,
            lease=self.lease,
            lease_ms=self._lease_ms,
        )

    def _ask_eviction(self) -> bool:
        """Whether the caller asks Redis for its eviction policy now (the first call)."""
        if self._eviction_asked:
            return False
        with self._lock:
            first, self._eviction_asked = not self._eviction_asked, True
        return first

    def _check_eviction(self) -> None:
        if self._ask_eviction():
            try:
                check_eviction(self._client)
            finally:
                self.eviction_checked.set()

    async def _acheck_eviction(self, client: AsyncClient) -> None:
        if self._ask_eviction():
            try:
                await acheck_eviction(client)
            finally:
                self.eviction_checked.set()

    def _async_client_here(self) -> AsyncClient | None:
        """The asyncio client for the running loop, or ``None`` under trio."""
        if not on_asyncio():
            return None
        if self._async_client is not None:
            return self._async_client
        where = self._topology
        if where.url is None and not where.sentinels:
            return None  # a client given, without a url to make asyncio ones from
        return self._loop_clients.get(where.loop_client)

    def close(self) -> None:
        """Stop renewing leases, tell Redis of the spends that finished here (waiting for
        an admission to carry them), and close the sync client (asyncio clients: see
        :meth:`aclose`)."""
        self.stop_renewing()
        self._close_sync()

    def _close_sync(self) -> None:
        close_client(self._client, self._own_client)

    async def aclose(self) -> None:
        """:meth:`close`, and close the running loop's asyncio client."""
        await anyio.to_thread.run_sync(self.stop_renewing)
        if on_asyncio():
            await self._loop_clients.aclose()
        self._close_sync()
