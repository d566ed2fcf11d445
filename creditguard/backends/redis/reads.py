"""The balance reads of a Redis account (:class:`Reads`): the ``AccountState`` operations
``read``, ``read_after``, ``pending``, ``committed``, ``survey``, ``bumped``, ``record``,
``watch`` and ``overdue``, over the scripts of :mod:`.scripts`.

Reads are shared across processes with a lock in Redis: the process that takes it reads,
the others look again every few milliseconds until its balance is stored (bounded: if the
leader dies its lock expires and another takes over). Within a process, callers share one
read as with the memory backend.

``read``, ``read_after`` and ``pending`` start with one look at the account in Redis
(:meth:`Reads.look`); the rest of each (``read_from``, ``read_after_from``) decides on
what it saw, so a caller may decide elsewhere when that look fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import cast

from creditguard.backends.redis.context import POLL_FIRST, POLL_MAX, AccountContext
from creditguard.backends.redis.scripts import ReadBegun, Snapshot, Survey, encode_balance
from creditguard.core.errors import BalanceUnavailable
from creditguard.core.models import AccountSnapshot, CreditBalance, OpenHold
from creditguard.core.steps import Flight, Ops, Step, own_error
from creditguard.core.steps import pause as pause_call

__all__ = ["Reads", "RedisFlight"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic

# The longest a read may hold the cross-process read lock (then another process leads).
_FLIGHT_MS = 10_000


class RedisFlight(Flight):
    """A balance read this process's callers share. Its leader either reads for every
    process (it holds the lock in Redis as ``token``; with ``token`` None, a read of its
    own that it stores if Redis lets it), or, when another process reads (``remote``),
    watches Redis until that read's balance is stored (:meth:`Reads.watch`)."""

    __slots__ = ("finished", "remote", "token")

    def __init__(self, start_seq: int, sync: bool, token: str | None) -> None:
        super().__init__(start_seq, sync)
        self.token = token
        self.remote = False
        self.finished = 0.0


class Reads:
    """The reads of one Redis account (see the module)."""

    __slots__ = ("_last", "ctx", "flights", "stale")

    def __init__(self, ctx: AccountContext) -> None:
        self.ctx = ctx
        self.flights: list[RedisFlight] = []  # reads this process leads, oldest first
        # The last read of this process that came back with a balance: a caller whose
        # look at Redis raced with storing it uses it instead of reading again.
        self._last: RedisFlight | None = None
        self.stale: list[str] = []  # read locks of abandoned reads, to give up

    def need_read(self, after: int, sync: bool, looked: float | None = None) -> Ops[Step]:
        """A read that starts at ``seq >= after``: join one this process's callers share,
        or lead one: read for every process if no other process is reading, else watch
        Redis for that read's balance. (A thread joins only reads led by threads, as in
        memory: a task's loop may be blocked by the very thread waiting for it.)"""
        ctx = self.ctx
        with ctx.lock:
            for joined in reversed(self.flights):
                if joined.start_seq >= after and (joined.sync or not sync):
                    return Step(joined, False, None)
            # A read of this process that came back after the caller looked at Redis (at
            # ``looked``) and starts late enough: the caller's look raced with storing it.
            last = self._last
            if (
                looked is not None
                and last is not None
                and last.start_seq >= after
                and last.finished >= looked
            ):
                return Step(last, False, None)  # finished: no wait
            flight = RedisFlight(after, sync, None)  # seq only grows: it starts >= after
            self.flights.append(flight)
            stale = bool(self.stale)
        if stale:
            yield from self._give_up_stale()
        token = os.urandom(12).hex()
        try:
            begun = cast(ReadBegun, (yield ctx.call("read_begin", token, _FLIGHT_MS)))
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
        return Step(flight, True, None)

    def watch(self, flight: Flight) -> Ops[None] | None:
        """How to lead ``flight`` when another process performs the read: watch Redis
        until its balance is stored; ``None``: read upstream as usual."""
        if isinstance(flight, RedisFlight) and flight.remote:
            return self._watch(flight)
        return None

    def _watch(self, flight: RedisFlight) -> Ops[None]:
        """Look at Redis every few milliseconds (backing off) until a balance read at or
        after ``flight.start_seq`` is stored, then finish ``flight`` with it. If the
        other process's read ends without one (it failed, or its process died and its
        lock expired), or the read budget runs out, finish it as abandoned: a waiter
        leads the next read."""
        ctx = self.ctx
        pause = POLL_FIRST
        give_up = _monotonic() + _FLIGHT_MS / 1000
        try:
            while True:
                yield pause_call(pause)
                snap = cast(Snapshot, (yield ctx.call("state")))
                if snap.balance is not None and snap.cached_seq >= max(
                    flight.start_seq, snap.floor
                ):
                    self._finish(flight, ctx.decode(snap.balance), None)
                    return
                if not snap.flight or _monotonic() >= give_up:
                    self._finish(flight, None, None)
                    return
                pause = min(pause * 2, POLL_MAX)
        except BaseException as exc:
            self._finish(flight, None, exc if isinstance(exc, Exception) else None)
            raise

    def _fresh(self, snap: Snapshot, ttl: float) -> CreditBalance | None:
        if snap.balance is None or snap.age_ms is None or snap.cached_seq < snap.floor:
            return None
        if snap.age_ms >= ttl * 1000:
            return None
        return self.ctx.decode(snap.balance)

    def look(self) -> Ops[Snapshot]:
        """The account's state in Redis (distrusting its cached balance first if this
        process spent outside Redis); raises :class:`BalanceUnavailable` when Redis does
        not answer."""
        ctx = self.ctx
        yield from ctx.rejoin()
        yield from ctx.tell_finished()  # a look must see every call that returned here
        return cast(Snapshot, (yield ctx.call("state")))

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]:
        if flight is not None and flight.error is not None:
            raise own_error(flight.error)  # the read this caller waited for failed
        looked = _monotonic()
        snap = yield from self.look()
        return (yield from self.read_from(snap, ttl, flight, sync, looked))

    def read_from(
        self, snap: Snapshot, ttl: float, flight: Flight | None, sync: bool, looked: float
    ) -> Ops[CreditBalance | Step]:
        """:meth:`read`, on ``snap`` (what :meth:`look` saw at ``looked``)."""
        balance = self._fresh(snap, ttl)
        if balance is not None:
            return balance
        if flight is not None and flight.result is not None and flight.start_seq >= snap.floor:
            return flight.result
        return (yield from self.need_read(snap.floor, sync, looked))

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]:
        known = answered(after, flight)
        if known is not None:
            return known
        looked = _monotonic()
        snap = yield from self.look()
        return (yield from self.read_after_from(snap, after, sync, looked))

    def read_after_from(
        self, snap: Snapshot, after: int, sync: bool, looked: float
    ) -> Ops[CreditBalance | Step]:
        """:meth:`read_after`, on ``snap`` (what :meth:`look` saw at ``looked``)."""
        if snap.balance is not None and snap.cached_seq >= max(after, snap.floor):
            return self.ctx.decode(snap.balance)
        return (yield from self.need_read(after, sync, looked))

    def pending(self) -> Ops[int]:
        snap = yield from self.look()
        return snap.settling_after

    def committed(self) -> Ops[int]:
        return cast(int, (yield self.ctx.call("committed")))

    def survey(self) -> Ops[AccountSnapshot]:
        yield from self.ctx.tell_finished()
        got = cast(Survey, (yield self.ctx.call("survey")))
        decode = self.ctx.decode
        return AccountSnapshot(
            balance=None if got.balance is None else decode(got.balance),
            reserved=got.reserved,
            in_flight=got.in_flight,
            held=got.held,
            holds=got.holds,
            settling=got.settling,
            gate_waiting=got.gate_waiting,
            backend="redis",
            open_holds=tuple(OpenHold(hid, cost, due / 1000) for hid, cost, due in got.open_holds),
        )

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]:
        yield from self.ctx.tell_finished()  # so that the refresh settles them
        seq = cast(int, (yield self.ctx.call("bump")))
        return seq, (yield from self.need_read(seq, sync))

    def record(
        self, flight: RedisFlight, result: CreditBalance | None, error: BaseException | None
    ) -> Ops[None]:
        ctx = self.ctx
        token = flight.token
        stale = result is None and token is not None
        try:
            if result is not None and token is not None:
                # (A token that does not hold the lock stores the balance all the same.)
                text, total = encode_balance(result)
                yield ctx.call("read_done", token, flight.start_seq, text, total)
        except Exception as exc:  # whatever it is, the read is finished below
            logger.warning("could not store a balance read in Redis: %s", exc)
            stale = token is not None  # its lock in Redis: given up below
        finally:
            if stale:
                # Give up the lock in Redis. An abandoned read (cancelled) records
                # without I/O: the next read of this process gives it up first.
                with ctx.lock:
                    self.stale.append(cast(str, token))
            self._finish(flight, result, error)
        if result is not None:
            ctx.deferred = 0
        if result is not None and ctx.waiters:
            ctx.wake_waiters()  # a new balance: their cost may fit now
        if stale:
            yield from self._give_up_stale()

    def _give_up_stale(self) -> Ops[None]:
        """Release the Redis read locks of this process's failed or abandoned reads."""
        ctx = self.ctx
        while True:
            with ctx.lock:
                if not self.stale:
                    return
                token = self.stale[-1]
            # Taken off the list only once given up (the call may not be made: a read
            # abandoned on cancellation records without I/O).
            with contextlib.suppress(BalanceUnavailable):  # it expires on its own
                yield ctx.call("read_failed", token)
            with ctx.lock:
                if token in self.stale:
                    self.stale.remove(token)

    def _finish(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> None:
        with self.ctx.lock:
            if flight in self.flights:
                self.flights.remove(flight)
            if result is not None:
                flight.result = result
                if isinstance(flight, RedisFlight) and (
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
        with self.ctx.lock:
            if flight in self.flights:
                self.flights.remove(flight)


def answered(after: int, flight: Flight | None) -> CreditBalance | None:
    """What ``read_after(after, flight)`` answers without a look at Redis: the result of
    ``flight`` when it started late enough (its error, raised); ``None``: look."""
    if flight is not None and flight.start_seq >= after:
        if flight.result is not None:
            return flight.result
        if flight.error is not None:
            raise own_error(flight.error)
    return None
