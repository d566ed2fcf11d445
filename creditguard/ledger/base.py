"""What both ledgers share: the observer the guard tells of each call, the bounded buffer
it appends to, and the writer thread that empties it into the database.

A paid call never waits for the database and never fails because of it. The observer's
methods only append a row to the buffer (under a lock held for an append) and return. A
daemon thread, started with the first row, writes the buffer in batches, each one
transaction: every ``interval`` seconds, or at once when ``batch`` rows are waiting.
While the database is down, rows stay in the buffer (up to ``buffer`` of them; those
beyond are dropped and counted in :attr:`Ledger.dropped`), a warning is logged (at most
once a minute), and the writer tries again, backing off up to ``max_backoff`` seconds.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from creditguard.core.observe import Entry
from creditguard.ledger import queries
from creditguard.ledger.schema import (
    INSERT_BALANCE,
    INSERT_ENTRY,
    UPSERT_REFUSALS,
    Dialect,
    LedgerError,
    migrate,
)
from creditguard.telemetry.otel import dropped_counter

if TYPE_CHECKING:
    from creditguard.core.calls import Guarded, Held
    from creditguard.core.engine import Engine
    from creditguard.core.models import CreditBalance
    from creditguard.ledger.queries import LedgerTotal

__all__ = ["Ledger"]

logger = logging.getLogger("creditguard.ledger")

WARN_EVERY = 60.0  # seconds between two warnings of the same kind
_ENTRY, _REFUSAL, _SAMPLE = 0, 1, 2
_open: weakref.WeakSet[Ledger] = weakref.WeakSet()  # closed at exit, reset after a fork


class Ledger:
    """The spend ledger: pass it as ``CreditGuard(..., ledger=...)``. Use
    :class:`~creditguard.ledger.SQLiteLedger` or :class:`~creditguard.ledger.PostgresLedger`.

    ``buffer``: rows kept while the database is slow or down (beyond: dropped, counted);
    ``batch``: rows written in one transaction at most, and the count that wakes the
    writer early; ``interval``: seconds between writes; ``sample_every``: seconds
    between two balance samples of one account; ``close_timeout``: how long
    :meth:`close` waits for the rows it holds to be written; ``max_backoff``: the longest
    pause between two attempts while the database is down."""

    dialect: Dialect

    def __init__(
        self,
        *,
        buffer: int = 100_000,
        batch: int = 1000,
        interval: float = 0.5,
        sample_every: float = 60.0,
        close_timeout: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        for name, value in (("buffer", buffer), ("batch", batch)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, seconds in (
            ("interval", interval),
            ("sample_every", sample_every),
            ("close_timeout", close_timeout),
            ("max_backoff", max_backoff),
        ):
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {seconds!r}")
        self._limit = buffer
        self._batch = batch
        self._interval = float(interval)
        self._sample_every = float(sample_every)
        self._close_timeout = float(close_timeout)
        self._max_backoff = max(float(max_backoff), 0.05)
        self._reset()
        self._dropped = 0
        self._closed = False
        self._migrated = False
        self._warned: dict[str, float] = {}
        self._counter: Any = None
        _open.add(self)

    def _reset(self) -> None:
        """The state of the writer (again in a forked child: the parent's rows and thread
        are the parent's)."""
        self._lock = threading.Lock()  # taken by the callers for an append: a C-level lock
        self._cond = threading.Condition(self._lock)
        self._buffer: collections.deque[tuple[int, Any]] = collections.deque()
        self._added = 0  # rows appended to the buffer, ever
        self._written = 0  # rows taken out of it (written, or given up at close)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._conn: Any = None
        self._sampled: dict[str, float] = {}

    # -- what the database does (SQLiteLedger, PostgresLedger) --------------------------

    @property
    def where(self) -> str:
        """The database, as it may be shown (no password)."""
        raise NotImplementedError

    def _connect(self) -> Any:
        """A new connection."""
        raise NotImplementedError

    def _transaction(self, conn: Any, write: bool = True) -> contextlib.AbstractContextManager[Any]:
        """A transaction on ``conn`` (a write one holds the database's write lock from its
        start): a cursor; committed at the end, rolled back if it raises."""
        raise NotImplementedError

    def _close_connection(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    # -- the observer (called by the guard; never blocks, never raises) -----------------

    def begin(self, engine: Engine, call: Guarded) -> object:
        """A guarded call starts: nothing to do until it ends."""
        return None

    def decided(
        self,
        engine: Engine,
        call: Guarded,
        token: object,
        outcome: str,
        reason: str | None,
        seconds: float,
    ) -> None:
        """Count a refused or busy call (in its hour)."""
        if outcome == "refused" or outcome == "busy":
            hour = int(time.time() // 3600) * 3600
            subject, action = call._subject, call._action
            key = (hour, engine.account.fingerprint, subject or "", action or "", outcome)
            self._put(_REFUSAL, (*key, reason or ""))

    def ended(self, engine: Engine, call: Guarded | Held, token: object, entry: Entry) -> None:
        """Record a spend or hold that ended."""
        self._put(_ENTRY, entry)

    def read(
        self,
        engine: Engine,
        balance: CreditBalance | None,
        error: BaseException | None,
        started: float,
        seconds: float,
    ) -> None:
        """Sample a balance read (at most one every ``sample_every`` seconds an account)."""
        if balance is None:
            return
        account = engine.account.fingerprint
        last = self._sampled.get(account)
        if last is not None and started - last < self._sample_every:
            return
        self._sampled[account] = started
        self._put(_SAMPLE, (started, account, balance.total_balance))

    def _put(self, kind: int, row: Any) -> None:
        with self._lock:
            full = len(self._buffer) >= self._limit
            if full:
                self._dropped += 1
            else:
                self._buffer.append((kind, row))
                self._added += 1
                waiting = len(self._buffer)
        if full:
            self._count_drop(1)
            return
        if self._thread is None:
            self._start()
        if waiting >= self._batch and not self._wake.is_set():
            self._wake.set()

    # -- the writer -----------------------------------------------------------------------

    def _start(self) -> None:
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self._run, name="creditguard-ledger", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        pause = self._interval
        deadline: float | None = None
        while True:
            if not self._stopping:
                self._wake.wait(pause)
                self._wake.clear()
            if self._stopping and deadline is None:
                deadline = time.monotonic() + self._close_timeout
            ok = self._write_all()
            if deadline is not None and (ok or time.monotonic() >= deadline):
                self._give_up()
                break
            if ok:
                pause = self._interval
            else:
                pause = min(max(pause * 2, 0.1), self._max_backoff)
                if deadline is not None:
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _write_all(self) -> bool:
        """Write what the buffer holds, a batch at a time; ``False`` when a write failed."""
        while True:
            with self._cond:
                batch = list(itertools.islice(self._buffer, self._batch))
            if not batch:
                return True
            try:
                self._write(batch)
            except Exception as exc:
                self._failed(exc)
                return False
            with self._cond:
                for _ in batch:
                    self._buffer.popleft()
                self._written += len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[tuple[int, Any]]) -> None:
        dialect = self.dialect
        entries, balances = [], []
        refusals: collections.Counter[tuple[Any, ...]] = collections.Counter()
        for kind, row in batch:
            if kind == _ENTRY:
                entries.append(_entry_row(row, dialect))
            elif kind == _REFUSAL:
                refusals[row] += 1
            else:
                at = dialect.to_db(datetime.fromtimestamp(row[0], timezone.utc))
                balances.append((at, row[1], row[2]))
        if self._conn is None:
            self._conn = self._connect()
        with self._transaction(self._conn) as cursor:
            if not self._migrated:
                migrate(cursor, dialect)
            if entries:
                cursor.executemany(dialect.sql(INSERT_ENTRY), entries)
            if refusals:
                counted = [
                    (dialect.to_db(datetime.fromtimestamp(key[0], timezone.utc)), *key[1:], n)
                    for key, n in refusals.items()
                ]
                cursor.executemany(dialect.sql(UPSERT_REFUSALS), counted)
            if balances:
                cursor.executemany(dialect.sql(INSERT_BALANCE), balances)
        self._migrated = True
        if self._warned.pop("down", None) is not None:
            logger.warning("creditguard ledger: %s is back; writing again", self.where)

    def _failed(self, exc: Exception) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close_connection(conn)
        if isinstance(exc, LedgerError):
            self._warn("schema", "creditguard ledger: %s: %s", self.where, exc)
        else:
            self._warn(
                "down",
                "creditguard ledger: cannot write to %s (%s: %s); keeping up to %d rows"
                " in memory and trying again",
                self.where,
                type(exc).__name__,
                exc,
                self._limit,
            )

    def _warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._warned.get(kind)
        if last is None or now - last >= WARN_EVERY:
            self._warned[kind] = now
            logger.warning(message, *args)

    def _count_drop(self, n: int) -> None:
        if self._closed:
            self._warn(
                "closed", "creditguard ledger: closed: dropping rows (%d so far)", self._dropped
            )
        else:
            self._warn(
                "full",
                "creditguard ledger: the buffer is full (%d rows): dropping rows (%d so far)",
                self._limit,
                self._dropped,
            )
        if self._counter is None:
            self._counter = dropped_counter()
        if self._counter is not False:
            with contextlib.suppress(Exception):
                self._counter.add(n)

    def _give_up(self) -> None:
        """At close, after the last attempt: what is still in the buffer is lost."""
        with self._cond:
            lost = len(self._buffer)
            self._buffer.clear()
            self._written += lost
            self._dropped += lost
            self._cond.notify_all()
        if lost:
            logger.error(
                "creditguard ledger: %s did not take the last %d rows in time: dropped",
                self.where,
                lost,
            )
            self._count_drop(lost)
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close_connection(conn)

    # -- the public side ------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Rows lost: the buffer was full (the database down or too slow for too long),
        or :meth:`close` gave up on a database that stayed down."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Rows in the buffer, not written yet."""
        return len(self._buffer)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row recorded before this call is written (at most
        ``timeout`` seconds, ``close_timeout`` by default): ``True`` when they are."""
        limit = self._close_timeout if timeout is None else timeout
        with self._cond:
            target = self._added
            if self._written >= target:
                return True
        if self._thread is None:
            self._start()
        self._wake.set()
        with self._cond:
            return self._cond.wait_for(lambda: self._written >= target, limit)

    def close(self) -> None:
        """Write what the buffer holds (waiting at most ``close_timeout`` seconds) and stop
        the writer. Called at exit for a ledger still open. Rows recorded afterwards are
        dropped."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is None and self._buffer:
                thread = self._thread = threading.Thread(
                    target=self._run, name="creditguard-ledger", daemon=True
                )
                thread.start()
            self._limit = 0  # nothing more is taken
        _open.discard(self)
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(self._close_timeout + 5.0)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading it -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        """A cursor on a connection of its own (the schema made if it is not there)."""
        if not self._closed:
            self.flush()  # what this process recorded is seen
        conn = self._connect()
        try:
            if not self._migrated:
                with self._transaction(conn) as cursor:
                    migrate(cursor, self.dialect)
                self._migrated = True
            with self._transaction(conn, write=False) as cursor:
                yield cursor
        finally:
            self._close_connection(conn)

    def totals(
        self,
        by: Literal["subject", "action", "day"] = "subject",
        since: datetime | timedelta | None = None,
        *,
        account: str | None = None,
    ) -> list[LedgerTotal]:
        """Credits charged, calls and refusals per subject, action or day (UTC), since
        ``since`` (an aware datetime, or a timedelta back from now; ``None``: all), for
        one ``account`` (a fingerprint) or all. Charged credits are each row's
        ``charged``, else its ``cost`` when it was ``spent``. Refusals are counted by the
        hour: those of the hour ``since`` falls in count whole."""
        with self._reading() as cursor:
            return queries.totals(cursor, self.dialect, by, queries.since_of(since), account)

    def entries(
        self,
        since: datetime | timedelta | None = None,
        *,
        subject: str | None = None,
        account: str | None = None,
        limit: int | None = None,
    ) -> list[Entry]:
        """The recorded spends and holds, oldest first: since ``since``, of one
        ``subject``, of one ``account``, the first ``limit``."""
        with self._reading() as cursor:
            return queries.entries(
                cursor, self.dialect, queries.since_of(since), subject, account, limit
            )

    def outside(
        self, since: datetime | timedelta | None = None, *, account: str | None = None
    ) -> int:
        """Credits that left the pool other than through the guard since ``since`` (all
        accounts, or one): see :func:`creditguard.ledger.queries.outside`."""
        with self._reading() as cursor:
            return queries.outside(cursor, self.dialect, queries.since_of(since), account)


def _entry_row(entry: Entry, dialect: Dialect) -> tuple[object, ...]:
    return (
        entry.id,
        dialect.to_db(entry.at),
        entry.account,
        entry.subject,
        entry.action,
        entry.cost,
        entry.charged,
        entry.balance_before,
        entry.balance_after,
        entry.outcome,
        entry.trace_id,
        entry.duration,
    )


def _close_all() -> None:
    for ledger in list(_open):
        with contextlib.suppress(Exception):
            ledger.close()


def _after_fork() -> None:
    for ledger in list(_open):
        ledger._reset()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
