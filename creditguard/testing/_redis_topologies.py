"""Throwaway Redis deployments of several processes, for the tests against a real Redis
Cluster and a real Sentinel failover (private: not part of ``creditguard.testing``).

* :class:`ClusterNodes`: three (``masters``) ``redis-server --cluster-enabled yes`` on
  free loopback ports, joined by ``redis-cli --cluster create ... --cluster-replicas 0``;
  a node can be restarted (it comes back with its slots and without its data and
  scripts) and one slot moved to another node (``CLUSTER SETSLOT`` and ``MIGRATE``, as
  ``redis-cli --cluster reshard`` does it), so that clients get ``MOVED``.
* :class:`SentinelGroup`: a primary, its replica and three ``redis-sentinel`` watching
  them, with a short ``down-after-milliseconds`` and ``failover-timeout``; the primary
  can be killed (SIGKILL) and the failover waited for.

Each process is a :class:`~creditguard.testing._redis_server.RedisServer`; every admin
command goes through ``redis-cli``. A missing binary raises ``RedisServerError``: tests
that need these fail, they never skip. Every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from types import TracebackType

from creditguard.testing._redis_server import RedisServer, RedisServerError, binary

__all__ = ["ClusterNodes", "SentinelGroup", "cli", "redis_cluster", "wait_until"]

READY_TIMEOUT = 30.0  # seconds for a cluster to agree, or sentinels to know each other
CLI_TIMEOUT = 10.0  # seconds for one redis-cli command
HOST = "127.0.0.1"


def cli(port: int, *args: str, timeout: float = CLI_TIMEOUT) -> str:
    """The answer of ``redis-cli -p port args...`` (raw output); raises on an error."""
    argv = [binary("redis-cli"), "-h", HOST, "-p", str(port), "--no-raw", *args]
    try:
        done = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RedisServerError(f"redis-cli {' '.join(args[:2])} on port {port}: {e}") from e
    out = done.stdout.strip()
    if done.returncode != 0 or out.startswith("(error)"):
        raise RedisServerError(
            f"redis-cli {' '.join(args)} on port {port} failed: {out} {done.stderr.strip()}"
        )
    return out


def _raw(port: int, *args: str) -> str:
    """Like :func:`cli`, with ``--raw`` output (one value a line, no quotes)."""
    argv = [binary("redis-cli"), "-h", HOST, "-p", str(port), "--raw", *args]
    done = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
    if done.returncode != 0 or done.stdout.startswith("ERR"):
        raise RedisServerError(f"redis-cli {' '.join(args)} on port {port}: {done.stdout}")
    return done.stdout


def wait_until(check: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> float:
    """Poll ``check`` every 20 ms until it holds (``RedisServerError`` after ``timeout``
    seconds); returns the seconds it took. A check that raises counts as not yet."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(RedisServerError):
            if check():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RedisServerError(f"{what}: not reached within {timeout} s")
        time.sleep(0.02)


def _info(port: int, *section: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in _raw(port, *section).splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key] = value
    return fields


class _Group:
    """What both deployments share: a list of servers, closed together."""

    servers: list[RedisServer]

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> _Group:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        raise NotImplementedError


class ClusterNodes(_Group):
    """A Redis Cluster of ``masters`` nodes without replicas, on loopback.

    ``url`` names one node (a cluster client finds the others); ``ports`` are all of them.
    """

    def __init__(self, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
        )
        self.servers = [RedisServer(args) for _ in range(masters)]
        binary("redis-cli")  # missing: fail now, not after the servers started

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.ports[0]}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        nodes = [f"{HOST}:{port}" for port in self.ports]
        cli(
            self.ports[0],
            "--cluster",
            "create",
            *nodes,
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            timeout=60,
        )
        self.wait_ready()

    def wait_ready(self) -> float:
        """Wait until every node says the cluster is ``ok``, with every slot assigned and
        every node known to all; returns the seconds it took."""

        def agreed() -> bool:
            for port in self.ports:
                info = _info(port, "CLUSTER", "INFO")
                if info.get("cluster_state") != "ok":
                    return False
                if info.get("cluster_slots_ok") != "16384":
                    return False
                if info.get("cluster_known_nodes") != str(len(self.ports)):
                    return False
            return True

        return wait_until(agreed, "the cluster's nodes agree")

    def node_id(self, index: int) -> str:
        return _raw(self.ports[index], "CLUSTER", "MYID").strip()

    def owner(self, slot: int) -> int:
        """The index of the node serving ``slot`` (as node 0 sees it)."""
        ids = [self.node_id(i) for i in range(len(self.servers))]
        for line in _raw(self.ports[0], "CLUSTER", "NODES").splitlines():
            node, *_, ranges = line.split(" ", 8)
            for part in ranges.split():
                if part.startswith("["):
                    continue
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return ids.index(node)
        raise RedisServerError(f"no node serves slot {slot}")

    def restart_node(self, index: int) -> None:
        """Stop node ``index`` and start it again on its port: it rejoins with its slots
        (its ``nodes.conf``), without its keys and without its loaded scripts."""
        self.servers[index].restart()
        self.wait_ready()

    def move_slot(self, slot: int, to: int) -> int:
        """Move ``slot`` and its keys to node ``to``; returns the node it was on."""
        src = self.owner(slot)
        if src == to:
            raise ValueError(f"slot {slot} is already on node {to}")
        src_port, dst_port = self.ports[src], self.ports[to]
        src_id, dst_id = self.node_id(src), self.node_id(to)
        cli(dst_port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
        cli(src_port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
        while True:
            keys = _raw(src_port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
            if not keys:
                break
            cli(src_port, "MIGRATE", HOST, str(dst_port), "", "0", "5000", "KEYS", *keys)
        for port in (dst_port, src_port, *self.ports):
            cli(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        wait_until(lambda: all(self._sees(p, slot, dst_id) for p in self.ports), "slot moved")
        return src

    def _sees(self, port: int, slot: int, node: str) -> bool:
        for line in _raw(port, "CLUSTER", "NODES").splitlines():
            owner, *_, ranges = line.split(" ", 8)
            for part in ranges.split():
                low, _, high = part.partition("-")
                if not part.startswith("[") and int(low) <= slot <= int(high or low):
                    return owner == node
        return False


class SentinelGroup(_Group):
    """A primary, one replica of it and ``sentinels`` Sentinels watching them as
    ``service`` (quorum: a majority of them).

    ``down_after_ms``: how long the primary must not answer before a sentinel deems it
    down; ``failover_timeout_ms``: Sentinel's ``failover-timeout``.
    """

    def __init__(
        self,
        service: str = "mymaster",
        sentinels: int = 3,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.primary = RedisServer()
        self.replica = RedisServer()
        self._count = sentinels
        self.sentinel_servers: list[RedisServer] = []
        binary("redis-sentinel")  # missing: fail now, not after the servers started
        binary("redis-cli")
        self.servers = [self.primary, self.replica]

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(HOST, server.port) for server in self.sentinel_servers]

    def start(self) -> None:
        self.primary.start()
        self.replica.args = ("--replicaof", HOST, str(self.primary.port))
        self.replica.start()
        wait_until(
            lambda: (
                _info(self.replica.port, "INFO", "replication").get("master_link_status") == "up"
            ),
            "the replica in sync",
        )
        quorum = self._count // 2 + 1
        config = (
            f"sentinel monitor {self.service} {HOST} {self.primary.port} {quorum}\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        for _ in range(self._count):
            server = RedisServer(config=config, program="redis-sentinel")
            self.sentinel_servers.append(server)
            self.servers.append(server)
            server.start()
        # A failover needs the sentinels to know each other and the replica (they learn it
        # from the primary and from each other's hellos, every 2 s or so).
        wait_until(self._acquainted, "the sentinels know each other and the replica")

    def _acquainted(self) -> bool:
        for server in self.sentinel_servers:
            info = _info(server.port, "INFO", "sentinel")
            line = info.get("master0", "")
            want = f"sentinels={self._count}"
            if "status=ok" not in line or want not in line or "slaves=1" not in line:
                return False
        return True

    def master_port(self, sentinel: int = 0) -> int:
        """The port of the primary as sentinel ``sentinel`` names it."""
        port = self.sentinel_servers[sentinel].port
        answer = _raw(port, "SENTINEL", "get-master-addr-by-name", self.service).split()
        return int(answer[1])

    def kill_primary(self) -> None:
        """SIGKILL the primary (a crash: no shutdown, no last write)."""
        self.primary.kill()

    def wait_failover(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait until every sentinel names the replica as the primary and it says so
        itself; returns the seconds it took."""
        port = self.replica.port

        def promoted() -> bool:
            if _info(port, "INFO", "replication").get("role") != "master":
                return False
            return all(self.master_port(i) == port for i in range(self._count))

        return wait_until(promoted, "the failover to the replica", timeout)


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[ClusterNodes]:
    """A running cluster for the ``with`` block."""
    nodes = ClusterNodes(masters)
    with nodes:
        yield nodes
