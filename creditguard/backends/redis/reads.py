"""The balance reads of a ``RedisAccount`` (``redis.py``): the ``AccountState`` operations
``read``, ``read_after``, ``pending``, ``committed``, ``survey``, ``bumped``, ``record``,
``watch`` and ``overdue``, over the scripts of ``_redis_state``, with the memory fallback
while Redis is down (``fallback="memory"``).

Reads are shared across processes with a lock in Redis: the process that takes it reads,
the others look again every few milliseconds until its balance is stored (bounded: if the
leader dies its lock expires and another takes over). Within a process, callers share one
read as with the memory backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from creditguard.backends.redis.holds import POLL_FIRST, POLL_MAX
from creditguard.backends.redis.scripts import ReadBegun, Snapshot, Survey, encode_balance
from creditguard.core.errors import BalanceUnavailable
from creditguard.core.models import AccountSnapshot, CreditBalance, OpenHold
from creditguard.core.steps import Flight, Ops, Step, Waiter, own_error
from creditguard.core.steps import pause as pause_call

if TYPE_CHECKING:
    from creditguard.backends.memory import Account
    from creditguard.core.steps import Call

__all__ = ["ReadOps"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic

# How long a caller waits between two looks at Redis while another process reads the
# balance: short first, then longer.
_POLL_FIRST = POLL_FIRST
_POLL_MAX = POLL_MAX
# The longest a read may hold the cross-process read lock (then another process leads).
_FLIGHT_MS = 10_000


class _RedisFlight(Flight):
    """A balance read this process's callers share. Its leader either reads for every
    process (it holds the lock in Redis as ``token``; with ``token`` None, a read of its
    own that it stores if Redis lets it), or, when another process reads (``remote``),
    watches Redis until that read's balance is stored (:meth:`RedisAccount.watch`)."""

    __slots__ = ("finished", "remote", "token")

    def __init__(self, start_seq: int, sync: bool, token: str | None) -> None:
        super().__init__(start_seq, sync)
        self.token = token
        self.remote = False
        self.finished = 0.0


class ReadOps:
    """The read operations of :class:`~.backend.RedisAccount` (a base class
    of it)."""

    if TYPE_CHECKING:
        lock: threading.Lock
        waiters: list[Waiter]
        _flights: list[_RedisFlight]
        _last: _RedisFlight | None
        _stale: list[str]
        _deferred: int
        _local: Account | None

        def _call(self, name: str, *args: Any) -> Call: ...
        def _decode(self, text: str) -> CreditBalance: ...
        def _degraded(self) -> Account | None: ...
        def _fallback(self, exc: BalanceUnavailable) -> Account | None: ...
        def _local_account(self) -> Account: ...
        def _rejoin(self) -> Ops[None]: ...
        def _wake_waiters(self) -> None: ...

    @property
    def flights(self) -> list[_RedisFlight]:
        """The reads this process's callers share, oldest first."""
        return self._flights

    def _need_read(self, after: int, sync: bool, looked: float | None = None) -> Ops[Step]:
        """A read that starts at ``seq >= after``: join one this process's callers share,
        or lead one: read for every process if no other process is reading, else watch
        Redis for that read's balance. (A thread joins only reads led by threads, as in
        memory: a task's loop may be blocked by the very thread waiting for it.)"""
        with self.lock:
            for joined in reversed(self._flights):
                if joined.start_seq >= after and (joined.sync or not sync):
                    return joined, False, None
            # A read of this process that came back after the caller looked at Redis (at
            # ``looked``) and starts late enough: the caller's look raced with storing it.
            last = self._last
            if (
                looked is not None
                and last is not None
                and last.start_seq >= after
                and last.finished >= looked
            ):
                return last, False, None  # finished: no wait
            flight = _RedisFlight(after, sync, None)  # seq only grows: it starts >= after
            self._flights.append(flight)
            stale = bool(self._stale)
        if stale:
            yield from self._give_up_stale()
        token = os.urandom(12).hex()
        try:
            begun = cast(ReadBegun, (yield self._call("read_begin", token, _FLIGHT_MS)))
        except BaseException as exc:
            self._finish(flight, None, exc if isinstance(exc, Exception) else None)
            raise
        if begun.lead:
            flight.token = token
            flight.start_seq = begun.start_seq
        elif sync:
            # Another process, or a task of this one, reads. A thread never waits for a
            # task's read (the task's loop may be blocked by this very thread): it reads
            # on its own and stores the result like any read. Its start is ``after``, a
            # lower bound of where it really starts, so it settles nothing it may miss.
            flight.token = token
        else:
            flight.remote = True
        return flight, True, None

    def watch(self, flight: Flight) -> Ops[None] | None:
        """How to lead ``flight`` when another process performs the read: watch Redis
        until its balance is stored; ``None``: read upstream as usual."""
        if isinstance(flight, _RedisFlight) and flight.remote:
            return self._watch(flight)
        return None

    def _watch(self, flight: _RedisFlight) -> Ops[None]:
        """Look at Redis every few milliseconds (backing off) until a balance read at or
        after ``flight.start_seq`` is stored, then finish ``flight`` with it. If the
        other process's read ends without one (it failed, or its process died and its
        lock expired), or the read budget runs out, finish it as abandoned: a waiter
        leads the next read."""
        pause = _POLL_FIRST
        give_up = _monotonic() + _FLIGHT_MS / 1000
        try:
            while True:
                yield pause_call(pause)
                snap = cast(Snapshot, (yield self._call("state")))
                if snap.balance is not None and snap.cached_seq >= max(
                    flight.start_seq, snap.floor
                ):
                    self._finish(flight, self._decode(snap.balance), None)
                    return
                if not snap.flight or _monotonic() >= give_up:
                    self._finish(flight, None, None)
                    return
                pause = min(pause * 2, _POLL_MAX)
        except BaseException as exc:
            self._finish(flight, None, exc if isinstance(exc, Exception) else None)
            raise

    def _fresh(self, snap: Snapshot, ttl: float) -> CreditBalance | None:
        if snap.balance is None or snap.age_ms is None or snap.cached_seq < snap.floor:
            return None
        if snap.age_ms >= ttl * 1000:
            return None
        return self._decode(snap.balance)

    def _look(self) -> Ops[Snapshot | None]:
        """The account's state in Redis, or ``None``: Redis is unreachable and the
        fallback serves (``fallback="memory"``). Without a fallback, raises
        :class:`BalanceUnavailable`."""
        if self._degraded() is not None:
            return None
        try:
            yield from self._rejoin()
            return cast(Snapshot, (yield self._call("state")))
        except BalanceUnavailable as exc:
            if self._fallback(exc) is None:
                raise
            return None

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]:
        if flight is not None and flight.error is not None:
            raise own_error(flight.error)  # the read this caller waited for failed
        looked = _monotonic()
        snap = yield from self._look()
        if snap is None:
            return (yield from self._local_account().read(ttl, flight, sync))
        balance = self._fresh(snap, ttl)
        if balance is not None:
            return balance
        if flight is not None and flight.result is not None and flight.start_seq >= snap.floor:
            return flight.result
        return (yield from self._need_read(snap.floor, sync, looked))

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]:
        if flight is not None and flight.start_seq >= after:
            if flight.result is not None:
                return flight.result
            if flight.error is not None:
                raise own_error(flight.error)
        looked = _monotonic()
        snap = yield from self._look()
        if snap is None:
            return (yield from self._local_account().read_after(after, flight, sync))
        if snap.balance is not None and snap.cached_seq >= max(after, snap.floor):
            return self._decode(snap.balance)
        return (yield from self._need_read(after, sync, looked))

    def pending(self) -> Ops[int]:
        snap = yield from self._look()
        if snap is None:
            return (yield from self._local_account().pending())
        return snap.settling_after

    def committed(self) -> Ops[int]:
        local = self._degraded()
        if local is None:
            try:
                return cast(int, (yield self._call("committed")))
            except BalanceUnavailable as exc:
                local = self._fallback(exc)
                if local is None:
                    raise
        return (yield from local.committed())

    def survey(self) -> Ops[AccountSnapshot]:
        local = self._degraded()
        if local is None:
            try:
                got = cast(Survey, (yield self._call("survey")))
            except BalanceUnavailable as exc:
                local = self._fallback(exc)
                if local is None:
                    raise
            else:
                return AccountSnapshot(
                    balance=None if got.balance is None else self._decode(got.balance),
                    reserved=got.reserved,
                    in_flight=got.in_flight,
                    held=got.held,
                    holds=got.holds,
                    settling=got.settling,
                    gate_waiting=got.gate_waiting,
                    backend="redis",
                    open_holds=tuple(
                        OpenHold(hid, cost, due / 1000) for hid, cost, due in got.open_holds
                    ),
                )
        return (yield from local.survey())

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]:
        seq = cast(int, (yield self._call("bump")))
        return seq, (yield from self._need_read(seq, sync))

    def record(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> Ops[None]:
        if not isinstance(flight, _RedisFlight):  # a read of the fallback's own
            if self._local is not None:
                yield from self._local.record(flight, result, error)
            return
        token = flight.token
        stale = result is None and token is not None
        try:
            if result is not None and token is not None:
                # (A token that does not hold the lock stores the balance all the same.)
                text, total = encode_balance(result)
                yield self._call("read_done", token, flight.start_seq, text, total)
        except Exception as exc:  # whatever it is, the read is finished below
            logger.warning("could not store a balance read in Redis: %s", exc)
            stale = token is not None  # its lock in Redis: given up below
        finally:
            if stale:
                # Give up the lock in Redis. An abandoned read (cancelled) records
                # without I/O: the next read of this process gives it up first.
                with self.lock:
                    self._stale.append(cast(str, token))
            self._finish(flight, result, error)
        if result is not None:
            self._deferred = 0
        if result is not None and self.waiters:
            self._wake_waiters()  # a new balance: their cost may fit now
        if stale:
            yield from self._give_up_stale()

    def _give_up_stale(self) -> Ops[None]:
        """Release the Redis read locks of this process's failed or abandoned reads."""
        while True:
            with self.lock:
                if not self._stale:
                    return
                token = self._stale[-1]
            # Taken off the list only once given up (the call may not be made: a read
            # abandoned on cancellation records without I/O).
            with contextlib.suppress(BalanceUnavailable):  # it expires on its own
                yield self._call("read_failed", token)
            with self.lock:
                if token in self._stale:
                    self._stale.remove(token)

    def _finish(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> None:
        with self.lock:
            if flight in self._flights:
                self._flights.remove(flight)
            if result is not None:
                flight.result = result
                if isinstance(flight, _RedisFlight) and (
                    self._last is None or flight.start_seq >= self._last.start_seq
                ):
                    flight.finished = _monotonic()
                    self._last = flight
            elif error is not None:
                flight.error = error
            else:
                flight.abandoned = True
            callbacks = flight._finish()
        for notify in callbacks:
            notify()

    def overdue(self, flight: Flight) -> None:
        with self.lock:
            if flight in self._flights:
                self._flights.remove(flight)
