"""Which Redis a ``RedisBackend`` talks to, and the clients it makes for it.

Three deployments, chosen by the backend's arguments and checked before any network call
(:func:`topology`):

* one server: ``RedisBackend(url)`` (or ``client=redis.Redis(...)``);
* Redis Cluster: ``RedisBackend(url, cluster=True)``, ``url`` naming any node (or
  ``client=redis.cluster.RedisCluster(...)``). Every key of an account carries its hash
  tag, so each script names keys of one slot and runs on the node serving it; redis-py's
  cluster clients follow ``MOVED`` and ``ASK`` and load a script on every primary;
* Sentinel: ``RedisBackend(sentinels=[(host, port), ...], service_name="mymaster")`` (or a
  client from ``Sentinel.master_for``): the sentinels name the primary, and after a
  failover the next connection goes to the new one.

The sync cluster client is made on first use (:class:`LazyCluster`: redis-py's connects in
its constructor), so a backend is built while Redis is down, as with one server. Clients
made here bound every round trip (``TIMEOUTS``). Their URL may carry a password: it is
never put in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

    SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster | LazyCluster"
    AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"

__all__ = ["TIMEOUTS", "LazyCluster", "Topology", "aclose_client", "close_client", "topology"]

# Every Redis round trip of a client made here is bounded, and so are the connections one
# process opens to one server (a caller beyond them waits its turn, at most ``timeout``).
TIMEOUTS: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
_POOL: dict[str, Any] = {"max_connections": 64, "timeout": 30.0, **TIMEOUTS}

Kind = Literal["server", "cluster", "sentinel"]


@dataclasses.dataclass(frozen=True)
class Topology:
    """What the backend talks to: ``kind``, and where (``url``, or ``sentinels`` and
    ``service_name``). ``url`` may hold a password: never shown (``repr=False``)."""

    kind: Kind
    url: str | None = dataclasses.field(default=None, repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None

    def sync_client(self) -> SyncClient:
        """A new sync client (the cluster's made on first use)."""
        import redis

        if self.kind == "cluster":
            return LazyCluster(str(self.url))
        if self.kind == "sentinel":
            from redis.sentinel import Sentinel

            sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=dict(TIMEOUTS), **TIMEOUTS)
            primary: redis.Redis = sentinel.master_for(str(self.service_name))
            return primary
        pool = redis.BlockingConnectionPool.from_url(str(self.url), **_POOL)
        return redis.Redis(connection_pool=pool)

    def loop_client(self) -> AsyncClient:
        """A new asyncio client for the running loop, with pools of its own."""
        if self.kind == "cluster":
            from redis.asyncio.cluster import RedisCluster

            return RedisCluster.from_url(str(self.url), **TIMEOUTS)
        if self.kind == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=dict(TIMEOUTS), **TIMEOUTS)
            primary: redis.asyncio.Redis = sentinel.master_for(str(self.service_name))
            return primary
        import redis.asyncio

        pool = redis.asyncio.BlockingConnectionPool.from_url(str(self.url), **_POOL)
        return redis.asyncio.Redis(connection_pool=pool)


class LazyCluster:
    """A ``redis.cluster.RedisCluster`` made from ``url`` on first use (redis-py's asks
    the cluster for its slots in its constructor). It does what the backend asks of a
    sync client: script calls, ``SCRIPT LOAD`` (on every primary), ``CONFIG GET``,
    ``ZCARD``."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._client: redis.cluster.RedisCluster | None = None

    def __repr__(self) -> str:
        return "<LazyCluster>"

    def get(self) -> redis.cluster.RedisCluster:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    import redis
                    from redis.cluster import RedisCluster

                    self._client = RedisCluster.from_url(
                        self._url,
                        connection_pool_class=redis.BlockingConnectionPool,
                        max_connections=_POOL["max_connections"],
                        **TIMEOUTS,
                    )
                client = self._client
        return client

    def execute_command(self, *args: Any, **options: Any) -> Any:
        execute: Any = self.get().execute_command
        return execute(*args, **options)

    def zcard(self, name: str) -> Any:
        return self.get().zcard(name)

    def script_load(self, script: str) -> Any:
        return self.get().script_load(script)

    def config_get(self, pattern: str = "*") -> Any:
        return self.get().config_get(pattern)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def close_client(client: SyncClient, own: bool) -> None:
    """Close a sync client; ``own`` (the backend made it): its pool's connections too."""
    import redis

    client.close()
    if own and isinstance(client, redis.Redis):
        client.connection_pool.disconnect()


async def aclose_client(client: AsyncClient) -> None:
    """Close an asyncio client made by :meth:`Topology.loop_client`, and its pools."""
    import redis.asyncio

    with contextlib.suppress(Exception):  # a connection already broken
        if isinstance(client, redis.asyncio.Redis):
            await client.aclose(close_connection_pool=True)
        else:
            await client.aclose()


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


def _sentinels(sentinels: object) -> tuple[tuple[str, int], ...]:
    if isinstance(sentinels, (str, bytes)) or not isinstance(sentinels, Sequence):
        raise TypeError("sentinels must be a list of (host, port) pairs")
    pairs: list[tuple[str, int]] = []
    for pair in sentinels:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError("sentinels must be a list of (host, port) pairs")
        host, port = pair
        if not isinstance(host, str) or not host:
            raise ValueError("each sentinel's host must be a non-empty str")
        if type(port) is not int or not 0 < port < 65536:
            raise ValueError(f"each sentinel's port must be an int from 1 to 65535, got {port!r}")
        pairs.append((host, port))
    if not pairs:
        raise ValueError("sentinels must name at least one (host, port)")
    return tuple(pairs)


def topology(
    url: str | None,
    client: object,
    async_client: object,
    cluster: bool,
    sentinels: Sequence[tuple[str, int]] | None,
    service_name: str | None,
    env_url: str | None,
) -> Topology:
    """The deployment the backend's arguments name, checked before any network call
    (``env_url``: ``CREDITGUARD_REDIS_URL``, used when neither a url nor a client nor
    sentinels are given). Messages never quote the url (it may hold a password)."""
    if type(cluster) is not bool:
        raise TypeError(f"cluster must be a bool, got {type(cluster).__name__}")
    if url is not None and not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    if service_name is not None and (not isinstance(service_name, str) or not service_name):
        raise ValueError("service_name must be a non-empty str (the name sentinels know)")
    if sentinels is not None:
        if cluster:
            raise ValueError(
                "cluster=True and sentinels= name two different deployments: Redis Cluster"
                " needs no sentinels (pass one of them)"
            )
        if url is not None or client is not None or async_client is not None:
            raise ValueError(
                "sentinels= find the primary themselves: pass no url, client or async_client"
                " with them (or pass a client from Sentinel.master_for instead)"
            )
        if service_name is None:
            raise ValueError(
                "sentinels= needs service_name= too: the name of the primary the sentinels"
                ' watch (their "sentinel monitor <name> ..." line)'
            )
        return Topology("sentinel", sentinels=_sentinels(sentinels), service_name=service_name)
    if service_name is not None:
        raise ValueError("service_name= is for sentinels=: pass the sentinels too")
    if cluster:
        _check_cluster_clients(client, async_client)
    if url is None and client is None:
        url = env_url
        if not url:
            raise ValueError("RedisBackend needs a url, a client, or CREDITGUARD_REDIS_URL")
    if url is not None:
        scheme = _scheme(url)
        allowed = ("redis", "rediss") if cluster else ("redis", "rediss", "unix")
        if scheme not in allowed:
            what = "cluster=True needs" if cluster else "RedisBackend needs"
            raise ValueError(
                f"{what} a url starting with {' or '.join(s + '://' for s in allowed)}"
                f" (got one starting with {scheme + '://' if scheme else 'no scheme'})"
            )
    return Topology("cluster" if cluster else "server", url=url)


def _check_cluster_clients(client: object, async_client: object) -> None:
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster

    if client is not None and not isinstance(client, (RedisCluster, LazyCluster)):
        raise TypeError(
            f"cluster=True: client must be a redis.cluster.RedisCluster, got"
            f" {type(client).__name__}"
        )
    if async_client is not None and not isinstance(async_client, AsyncCluster):
        raise TypeError(
            f"cluster=True: async_client must be a redis.asyncio.cluster.RedisCluster, got"
            f" {type(async_client).__name__}"
        )
