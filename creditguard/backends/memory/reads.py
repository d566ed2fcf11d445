"""The account's balance cache and its balance reads in flight: which balance may be
trusted, which read a caller joins or leads, and the service's rate limit."""

from __future__ import annotations

import time

from creditguard.backends.memory.base import AccountBase
from creditguard.core.models import CreditBalance
from creditguard.core.steps import Flight, Ops, Step, done, own_error

__all__ = ["MAX_FLIGHTS", "AccountReads"]

# Balance reads one account may have in progress at once. Two let a caller that needs a
# read newer than the one in progress start it at once instead of queueing behind it.
MAX_FLIGHTS = 2

_monotonic = time.monotonic


class AccountReads(AccountBase):
    """The reads of one account: its cached balance and the reads in flight."""

    __slots__ = ()

    def _usable(self, flight: Flight | None, ttl: float) -> CreditBalance | None:
        """Under the lock: a balance admission may trust, if there is one."""
        cached = self.cached
        if (
            cached is not None
            and self.cached_seq >= self.floor
            and _monotonic() - self.cached_at < ttl
        ):
            return cached
        if flight is not None and flight.start_seq >= self.floor:
            if flight.error is not None:
                raise own_error(flight.error)
            return flight.result
        return None

    def _join_or_lead(self, after: int, sync: bool) -> Step:
        """Under the lock: the read to wait on, and whether the caller must perform it.

        The caller needs a read that started at ``seq >= after``. It joins the newest
        read in progress if that one started late enough; otherwise it starts a new one,
        unless ``MAX_FLIGHTS`` are already in progress, in which case it waits for the
        oldest to end and looks again. So a caller waits at most about two round trips,
        and any number of callers that finish together share a handful of reads.

        A sync caller (a blocked thread) joins only reads led by sync code, which never
        wait for anything: a read led by a task needs that task's loop to run, and the
        loop's thread may be the caller itself or a thread waiting for the caller. When
        only task-led reads are in progress and no new one may start, the sync caller
        reads on its own (a read nobody joins, stored like any other).
        """
        flights = self.flights
        joinable = [f for f in flights if f.sync] if sync else flights
        if joinable:
            newest = joinable[-1]
            if newest.start_seq >= after:
                return Step(newest, False, None)
        if len(flights) < MAX_FLIGHTS:
            flight = Flight(self.seq, sync)
            flights.append(flight)
            return Step(flight, True, None)
        if joinable:
            return Step(joinable[0], False, None)
        return Step(Flight(self.seq, sync), True, None)

    def _store(self, balance: CreditBalance, start: int) -> None:
        """Under the lock: cache ``balance``, read from ``start``. Every reservation
        admitted so far is ambiguous about it."""
        self.cached = balance
        self.cached_seq = start
        self.cached_at = _monotonic()
        self.cache_gen += 1

    def block(self, seconds: float) -> None:
        """Make no balance request for ``seconds`` (the rate limit is used up)."""
        with self.lock:
            until = _monotonic() + seconds
            if until > self.blocked_until:
                self.blocked_until = until

    def blocked(self) -> float | None:
        """Seconds left before a balance request may be made, or ``None``."""
        left = self.blocked_until - _monotonic()
        return left if left > 0 else None

    def overdue(self, flight: Flight) -> None:
        """A read outlived the guard's read budget without finishing (its leader stopped
        making progress, e.g. its loop was stopped): no caller joins it any more."""
        with self.lock:
            if flight in self.flights:
                self.flights.remove(flight)

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]:
        """A balance through the cache, or the read to wait on / perform."""
        self._sweep()
        with self.lock:
            balance = self._usable(flight, ttl)
            if balance is not None:
                return done(balance)
            return done(self._join_or_lead(self.floor, sync))

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]:
        """A balance read that started at or after ``after``, or the read to wait on/perform."""
        self._sweep()
        with self.lock:
            if flight is not None and flight.start_seq >= after:
                if flight.result is not None:
                    return done(flight.result)
                if flight.error is not None:
                    raise own_error(flight.error)
            if self.cached is not None and self.cached_seq >= after:
                return done(self.cached)
            return done(self._join_or_lead(after, sync))

    def watch(self, flight: Flight) -> Ops[None] | None:
        """In memory, every read is performed by its leader."""
        return None

    def fresh(self, ttl: float) -> bool:
        """Whether a cached balance younger than ``ttl`` may be trusted (no request)."""
        self._sweep()
        with self.lock:
            return (
                self.cached is not None
                and self.cached_seq >= self.floor
                and _monotonic() - self.cached_at < ttl
            )

    def invalidate(self) -> None:
        """Distrust the cached balance and every read started before now."""
        with self.lock:
            self._invalidate()
