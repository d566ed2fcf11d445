"""A throwaway PostgreSQL server on a free loopback port, for the project's tests of the
PostgreSQL ledger (private: not part of ``creditguard.testing``).

``initdb`` into a temporary directory (trust authentication, user ``creditguard``), then
``postgres`` on 127.0.0.1 and a free port, with its socket in that directory and
``fsync=off``. PostgreSQL refuses to run as root: when the tests run as root, the
directory is given to the ``postgres`` user (Debian's package makes it) and the server
runs as that user. When the binaries cannot be found or the server does not answer, this
raises: tests that need PostgreSQL fail, they never skip. Set ``POSTGRES_BIN`` to the
directory of the binaries when they are not under ``/usr/lib/postgresql/*/bin`` nor on
``PATH``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

__all__ = ["PostgresServer", "PostgresServerError", "postgres_server"]

START_TIMEOUT = 30.0  # seconds for a server to accept connections
STOP_TIMEOUT = 10.0  # seconds for it to exit after SIGINT (fast shutdown), then SIGKILL


class PostgresServerError(RuntimeError):
    """PostgreSQL is missing, or did not start."""


def bindir() -> str:
    """The directory of ``initdb`` and ``postgres``; raises when there is none."""
    named = os.environ.get("POSTGRES_BIN")
    candidates = [named] if named else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for directory in candidates:
        if os.path.exists(os.path.join(directory, "initdb")):
            return directory
    raise PostgresServerError(
        "PostgreSQL's initdb not found (install it, e.g. apt-get install postgresql, or set"
        " POSTGRES_BIN to the directory of its binaries): the PostgreSQL tests need a real"
        " server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PostgresServer:
    """One PostgreSQL server: ``with PostgresServer() as server: server.dsn``.
    :meth:`stop` and :meth:`start` again keep its data (an outage and a recovery)."""

    def __init__(self) -> None:
        self.bin = bindir()
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}

    @property
    def dsn(self) -> str:
        return f"postgresql://creditguard@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir.name, "data")

    def _init(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="creditguard-pg-")
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self._dir.name, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid}
        done = subprocess.run(  # noqa: S603 - our own binary, found above
            [
                os.path.join(self.bin, "initdb"),
                "-D",
                self.data,
                "-U",
                "creditguard",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            capture_output=True,
            timeout=120,
            check=False,
            cwd=self._dir.name,
            **self._as,
        )
        if done.returncode != 0:
            raise PostgresServerError(f"initdb failed: {done.stderr.decode(errors='replace')}")

    def start(self) -> None:
        if self._proc is not None:
            raise PostgresServerError("already running")
        if self._dir is None:
            self._init()
            self.port = _free_port()
        assert self._dir is not None
        self._proc = subprocess.Popen(  # noqa: S603 - our own binary
            [
                os.path.join(self.bin, "postgres"),
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-k",
                self._dir.name,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self._dir.name,
            **self._as,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(self.port):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise PostgresServerError(f"postgres exited at start: {err[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresServerError(
                    f"postgres did not accept connections in {START_TIMEOUT}s"
                )
            time.sleep(0.05)
        self._ready(deadline)

    def _ready(self, deadline: float) -> None:
        """Connections are accepted once recovery is over: wait for a query to answer."""
        import psycopg

        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(2)  # SIGINT: fast shutdown
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        directory, self._dir = self._dir, None
        if directory is not None:
            with contextlib.suppress(OSError):
                directory.cleanup()

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server
