"""A throwaway ``redis-server`` on a free loopback port, for the project's tests and
benchmarks against a real Redis (private: not part of ``creditguard.testing``).

No persistence (``--save ''``, ``--appendonly no``), its files in a temporary directory.
When ``redis-server`` cannot be found or does not answer, this raises: tests that need
Redis fail, they never skip. Set ``REDIS_SERVER`` to use a binary outside ``PATH`` (and
``REDIS_SENTINEL``, ``REDIS_CLI`` for the other binaries of
:mod:`creditguard.testing._redis_topologies`, which starts clusters and sentinels with
the same :class:`RedisServer`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from types import TracebackType

__all__ = ["RedisServer", "RedisServerError", "binary", "redis_server"]

START_TIMEOUT = 10.0  # seconds for a server to answer PING
STOP_TIMEOUT = 10.0  # seconds for it to exit after SIGTERM (then SIGKILL)


class RedisServerError(RuntimeError):
    """``redis-server`` is missing, or did not start."""


# binary -> (the variable that names it, the Debian package that installs it)
_BINARIES = {
    "redis-server": ("REDIS_SERVER", "redis-server"),
    "redis-sentinel": ("REDIS_SENTINEL", "redis-sentinel"),
    "redis-cli": ("REDIS_CLI", "redis-tools"),
}


def binary(name: str = "redis-server") -> str:
    """The path of Redis's binary ``name`` (``redis-server``, ``redis-sentinel``,
    ``redis-cli``): the variable that names it, or ``PATH``; raises when it is missing."""
    variable, package = _BINARIES[name]
    path = os.environ.get(variable) or shutil.which(name)
    if not path:
        raise RedisServerError(
            f"{name} not found on PATH (install it, e.g. apt-get install {package},"
            f" or set {variable} to its path): the Redis tests need a real server"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process. ``with RedisServer() as server: server.url``.

    :meth:`restart` stops it and starts a new one on the same port (an outage: every key
    and every loaded script is gone, as after a crash without persistence; its directory,
    and so a cluster node's ``nodes.conf``, is kept).

    ``args`` are more options (``("--cluster-enabled", "yes")``); ``config`` is the text
    of a configuration file written to its directory and given first (``redis-sentinel``
    needs one, and rewrites it); ``program`` is the binary (``"redis-sentinel"``).
    """

    def __init__(
        self, args: Sequence[str] = (), config: str | None = None, program: str = "redis-server"
    ) -> None:
        self.binary = binary(program)
        self.args = tuple(args)
        self.config = config
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self._proc is not None:
            raise RedisServerError("already running")
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="creditguard-redis-")
        if self.port:
            self._spawn(self.port)
            return
        # A free port can be taken between the probe and the bind: try a few.
        error: RedisServerError | None = None
        for _ in range(5):
            port = _free_port()
            try:
                self._spawn(port)
            except RedisServerError as e:
                error = e
                continue
            self.port = port
            return
        assert error is not None
        raise error

    def _spawn(self, port: int) -> None:
        assert self._dir is not None
        log = os.path.join(self._dir.name, f"redis-{port}.log")
        conf: list[str] = []
        if self.config is not None:
            conf = [os.path.join(self._dir.name, "redis.conf")]
            if not os.path.exists(conf[0]):  # a restart keeps what the server wrote there
                with open(conf[0], "w", encoding="utf-8") as f:
                    f.write(self.config)
        args = [
            self.binary,
            *conf,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            self._dir.name,
            "--logfile",
            log,
            *self.args,
        ]
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # noqa: S603
        except OSError as e:
            raise RedisServerError(f"could not run {self.binary}: {e}") from e
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with {proc.returncode} on port {port}: {_tail(log)}"
                )
            if _pings(port):
                self._proc = proc
                return
            if time.monotonic() > deadline:
                _terminate(proc)
                raise RedisServerError(
                    f"redis-server did not answer PING on port {port} within"
                    f" {START_TIMEOUT} s: {_tail(log)}"
                )
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash (no shutdown, no last save)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop the server and start a fresh one on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
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


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: str) -> str:
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-2000:].strip() or "(no log)"
    return "(no log)"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A running server for the ``with`` block; yields its URL."""
    with RedisServer() as server:
        yield server.url
