"""Per-account state: the cached balance, reservations and the balance read in flight.

This module does no I/O. Every decision is one short section under the account's
``threading.Lock`` that never waits; what a caller must wait for (a read, a release) is
handed back to the guard's sync or async driver (see ``_guard.py``), so the admission
logic exists once.

Sequence numbers
----------------
``seq`` counts events that may have changed the balance upstream (a guarded action that
finished, ``invalidate()``, ``balance(refresh=True)``). A read records the ``seq`` it
started at. ``floor`` is the oldest start a balance may have and still be trusted:

* a hard invalidation (``invalidate()``, an action that raised or was cancelled, a failed
  post-spend refresh) sets ``floor`` to the new ``seq`` and drops the cache, so a read
  that started before it is neither stored nor used to admit a call;
* a successful spend keeps its reservation until a read that started after the action
  finished has come back (and been stored); only then is the reservation released and
  ``floor`` raised to that spend's ``seq``.

So any balance at or above ``floor`` either includes every released spend, or the spend
is still counted in ``reserved``: admission on ``balance - reserved`` can never admit
credits that are already gone (as long as the guard is the only spender).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable

import cachetools

from creditguard.backends.memory.commitments import LocalGate, LocalHolds
from creditguard.core.balance import InsufficientCredits
from creditguard.core.errors import AdmissionTimeout
from creditguard.core.models import AccountSnapshot, CreditBalance, OpenHold
from creditguard.core.roles import AccountState, StateBackend
from creditguard.core.settling import MAX_SETTLING, after_report
from creditguard.core.steps import (
    Call,
    Flight,
    Kept,
    Ops,
    Reservation,
    Step,
    Turn,
    Waiter,
    own_credits,
    own_error,
)

__all__ = [
    "Account",
    "AccountState",
    "Call",
    "Flight",
    "MemoryBackend",
    "Ops",
    "Reservation",
    "StateBackend",
    "Step",
    "Waiter",
]

# Balance reads one account may have in progress at once. Two let a caller that needs a
# read newer than the one in progress start it at once instead of queueing behind it.
MAX_FLIGHTS = 2

_monotonic = time.monotonic


class Account:
    """The guard state of one account (base URL + API key), shared by every caller."""

    __slots__ = (
        "__weakref__",
        "blocked_until",
        "cache_gen",
        "cached",
        "cached_at",
        "cached_seq",
        "fingerprint",
        "flights",
        "floor",
        "gate",
        "holds",
        "inflight",
        "lock",
        "released_at",
        "reserved",
        "seq",
        "settling",
        "waiters",
    )

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.lock = threading.Lock()
        self.seq = 0
        self.floor = 0
        self.cached: CreditBalance | None = None
        self.cached_seq = 0
        self.cached_at = 0.0
        self.reserved = 0
        self.inflight = 0
        # Counts the balances cached: a reservation admitted on the current one knows
        # that balance cannot include its charge (see settle_reported).
        self.cache_gen = 0
        # Reads in progress, oldest first (at most MAX_FLIGHTS).
        self.flights: list[Flight] = []
        # Spends waiting for a read that includes them (their credits still reserved).
        self.settling: list[Reservation] = []
        # Calls waiting at admission for spends in flight to settle, and when a
        # reservation was last released (their sign of progress).
        self.waiters: list[Waiter] = []
        self.released_at = 0.0
        # No balance request before this (monotonic seconds): the service said the rate
        # limit is used up (X-RateLimit-Remaining: 0, or a 429's Retry-After).
        self.blocked_until = 0.0
        # The gate (max_concurrent) and the holds open on this account.
        self.gate = LocalGate()
        self.holds = LocalHolds()

    def __repr__(self) -> str:
        return (
            f"<Account {self.fingerprint} reserved={self.reserved} inflight={self.inflight}"
            f" seq={self.seq}>"
        )

    # -- reads ---------------------------------------------------------------------

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
                return newest, False, None
        if len(flights) < MAX_FLIGHTS:
            flight = Flight(self.seq, sync)
            flights.append(flight)
            return flight, True, None
        if joinable:
            return joinable[0], False, None
        return Flight(self.seq, sync), True, None

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

    def complete(
        self,
        flight: Flight,
        result: CreditBalance | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Record how a read ended (neither result nor error: abandoned) and wake waiters."""
        with self.lock:
            if flight in self.flights:
                self.flights.remove(flight)
            released = None
            if result is not None:
                flight.result = result
                start = flight.start_seq
                if start >= self.floor and (self.cached is None or start >= self.cached_seq):
                    self._store(result, start)
                if self.settling:
                    released = self._settle_up_to(start)
            elif error is not None:
                flight.error = error
            else:
                flight.abandoned = True
            callbacks = flight._finish()
            if released is not None:
                callbacks += released
            elif result is not None and self.waiters:
                callbacks += self._wake_released()  # a new balance: a cost may fit now
        for notify in callbacks:
            notify()

    def _store(self, balance: CreditBalance, start: int) -> None:
        """Under the lock: cache ``balance``, read from ``start``. Every reservation
        admitted so far is ambiguous about it."""
        self.cached = balance
        self.cached_seq = start
        self.cached_at = _monotonic()
        self.cache_gen += 1

    def read_step(self, ttl: float, flight: Flight | None, sync: bool) -> CreditBalance | Step:
        """A balance through the cache, or the read to wait on / perform."""
        with self.lock:
            balance = self._usable(flight, ttl)
            if balance is not None:
                return balance
            return self._join_or_lead(self.floor, sync)

    # -- admission -----------------------------------------------------------------
    #
    # With a trusted balance B, R credits reserved by everything in flight (guarded calls
    # and holds), H the credits of open holds and O the caller's own enclosing spends
    # (a guarded call made inside another: they cannot settle while it waits), a call of
    # cost c is decided as follows (see docs/consistency.md, "Exact admission"):
    #
    # * c <= B - R: admitted. Safe whatever B includes of the spends in flight.
    # * c > B - H - O: refused. Holds are commitments that will not settle while the
    #   caller waits; the other calls in flight may charge nothing, fail or charge less,
    #   so they never stand in the way of a refusal: the account cannot pay even if they
    #   charge nothing.
    # * otherwise only calls in flight stand in the way: read first if finished spends
    #   wait for one (they may have cost less than declared), else wait until one
    #   settles and decide again, until ``until``; then ``AdmissionTimeout`` (busy, not
    #   insufficient).

    def try_admit(self, cost: int, ttl: float, defer: bool = True) -> Reservation | None:
        """Fast path: admit on a fresh cached balance, or ``None`` to go the slow way
        (always, with ``defer=False``, while finished spends wait for a read)."""
        with self.lock:
            cached = self.cached
            now = _monotonic()
            if (
                cached is None
                or (not defer and self.settling)
                or self.cached_seq < self.floor
                or now - self.cached_at >= ttl
                or now >= self.holds.due
                or (cost > cached.total_balance - self.reserved and cost)
            ):
                return None
            self.reserved += cost
            self.inflight += 1
            return Reservation(cost, cached, self.cache_gen)

    def admit_step(
        self,
        cost: int,
        ttl: float,
        flight: Flight | None,
        sync: bool,
        until: float | None,
        enclosing: tuple[Reservation, ...] = (),
        settle: bool = True,
    ) -> Reservation | Step:
        """Reserve ``cost`` on a trusted balance, or name what to wait for / perform.

        ``until`` is how long the caller may wait for spends in flight to settle
        (monotonic seconds; ``None``: it may not wait); ``enclosing`` the reservations
        of the caller's own enclosing spends. ``settle``: when the cost does not fit
        and finished spends wait for a read (see :meth:`defer_settle`), perform or join
        that read and decide again. Raises :class:`InsufficientCredits` when the account
        cannot pay even if the calls in flight charge nothing, and
        :class:`AdmissionTimeout` when only they stand in the way and the caller may not
        wait any longer (nothing reserved either way).
        """
        with self.lock:
            balance = self._usable(flight, ttl)
            if balance is None:
                return self._join_or_lead(self.floor, sync)
            total = balance.total_balance
            reserved = self.reserved
            if cost <= total - reserved or not cost:  # a free call always fits
                self.reserved = reserved + cost
                self.inflight += 1
                gen = self.cache_gen if balance is self.cached else -1
                return Reservation(cost, balance, gen)
            own = own_credits(enclosing)
            committed = self.holds.credits + own
            if cost > total - committed:
                raise InsufficientCredits(
                    cost, max(0, total - committed), balance, reserved=reserved
                )
            settling = self.settling
            if settling and settle:
                # Spends that finished and wait for a read hold credits a read would
                # show (they may have cost less than declared): read, then decide.
                return self._join_or_lead(settling[-1].after, sync)
            if until is not None and _monotonic() < until:
                waiter = Waiter(cost, own)
                self.waiters.append(waiter)
                return waiter, False, until
            raise AdmissionTimeout(cost, max(0, total - reserved), reserved=reserved)

    def forget(self, waiter: Waiter) -> None:
        """A waiter gave up (its wait timed out, or it was cancelled): drop it."""
        with self.lock:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def reserve_unchecked(self, cost: int) -> Reservation:
        """Fail-open admission: count the call as in flight with no balance to check."""
        with self.lock:
            self.reserved += cost
            self.inflight += 1
            return Reservation(cost, None, -1)

    def unreserve(self, reservation: Reservation) -> None:
        """Give back a reservation whose action never started (nothing was spent)."""
        with self.lock:
            self._unhold(reservation)
            callbacks = self._wake_released()
        for notify in callbacks:
            notify()

    def _unhold(self, reservation: Reservation) -> None:
        """Under the lock: stop counting ``reservation`` as in flight."""
        self.released_at = _monotonic()
        self.reserved -= reservation.cost
        self.inflight -= 1
        reservation.released = True

    # -- settling ------------------------------------------------------------------

    def _wake_released(self) -> list[Callable[[], None]]:
        """Under the lock: reservations or the cached balance changed. Finish the waiters
        whose decision may have changed (the cost now fits, or the account can no longer
        pay it even if the calls in flight charge nothing, or there is no trusted balance
        left to decide on) and
        hand back what to notify. The others keep waiting: a wake that cannot change a
        decision would only cost them a look."""
        waiters = self.waiters
        if not waiters:
            return []
        cached = self.cached
        if cached is None or self.cached_seq < self.floor:
            wake_all, room, free = True, 0, 0
        else:
            room = cached.total_balance - self.reserved
            free = cached.total_balance - self.holds.credits
            wake_all = False
        callbacks: list[Callable[[], None]] = []
        keep: list[Waiter] = []
        for waiter in waiters:
            if waiter.done:
                continue  # gave up (timed out or cancelled) and looked again
            if wake_all or waiter.cost <= room or waiter.cost > free - waiter.own:
                callbacks += waiter._finish()
            else:
                keep.append(waiter)
        self.waiters = keep
        return callbacks

    def _settle_up_to(self, start: int) -> list[Callable[[], None]] | None:
        """Under the lock: a read that started at ``start`` came back, so every spend that
        finished before it is in that balance: release their reservations now, not when
        their callers wake (which would count the spend twice in the meantime). Returns
        the callers to wake, if any spend was released."""
        settling = self.settling
        waiting: list[Reservation] | None = None
        any_released = False
        for settlement in settling:
            if settlement.after <= start:
                self._release(settlement)
                any_released = True
            elif waiting is None:
                waiting = [settlement]
            else:
                waiting.append(settlement)
        if waiting is None:
            settling.clear()
        else:
            self.settling = waiting
        return self._wake_released() if any_released else None

    def _release(self, settlement: Reservation) -> None:
        self._unhold(settlement)
        if settlement.after > self.floor:
            self.floor = settlement.after

    def begin_settle(self, settlement: Reservation, sync: bool) -> Step:
        """The action of ``settlement`` finished: hold its reservation until a read that
        started after now comes back, and name the read to wait on/perform."""
        with self.lock:
            self.seq += 1
            settlement.after = self.seq
            self.settling.append(settlement)
            return self._join_or_lead(self.seq, sync)

    def defer_settle(self, settlement: Reservation) -> None:
        """The action of ``settlement`` finished and its caller does not wait for the
        refresh: hold its reservation until a read that starts after now comes back,
        whoever performs it (the next admission that needs the credits, the next
        balance asked for, or the next read after the TTL).

        Callers waiting at admission are woken: they may now read to settle it. Past
        ``MAX_SETTLING`` spends waiting, they are all released and the cached balance is
        distrusted instead (safe: no read older than them is trusted any more)."""
        with self.lock:
            self.seq += 1
            settlement.after = self.seq
            settling = self.settling
            settling.append(settlement)
            callbacks: list[Callable[[], None]] = []
            if len(settling) > MAX_SETTLING:
                for pending in settling:
                    self._unhold(pending)
                settling.clear()
                self._invalidate()
                callbacks = self._wake_released()
            elif self.waiters:
                for waiter in self.waiters:
                    callbacks += waiter._finish()
                self.waiters = []
        for notify in callbacks:
            notify()

    def pending_after(self) -> int:
        """The ``seq`` a read must start at to include every finished spend still
        waiting for one (0: none waits)."""
        with self.lock:
            settling = self.settling
            return settling[-1].after if settling else 0

    def end_settle(self, settlement: Reservation, *, failed: bool = False) -> None:
        """The caller saw its refresh (or its failure): release if a read has not yet, and
        on failure distrust every older read."""
        if settlement.released and not failed:
            return  # the read that included it released it (set last, under the lock)
        with self.lock:
            callbacks: list[Callable[[], None]] = []
            if not settlement.released:
                self.settling.remove(settlement)
                self._release(settlement)
                callbacks = self._wake_released()
            if failed:
                self._invalidate()
        for notify in callbacks:
            notify()

    def bump(self, sync: bool) -> tuple[int, Step]:
        """Note that the balance may have changed upstream (an action finished, or a
        refresh was asked for): return the new ``seq`` and the read to wait on/perform.

        A read that starts from now on has ``start_seq >=`` the returned ``seq``.
        """
        with self.lock:
            self.seq += 1
            after = self.seq
            return after, self._join_or_lead(after, sync)

    def settle_step(self, after: int, flight: Flight | None, sync: bool) -> CreditBalance | Step:
        """A balance read that started at or after ``after``, or the read to wait on/perform."""
        with self.lock:
            if flight is not None and flight.start_seq >= after:
                if flight.result is not None:
                    return flight.result
                if flight.error is not None:
                    raise own_error(flight.error)
            if self.cached is not None and self.cached_seq >= after:
                return self.cached
            return self._join_or_lead(after, sync)

    def settle_reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> CreditBalance | None:
        """A finished spend whose paid call reported what it did: settle it from the
        report when the report can stand in for a refresh, and return the balance after
        it; ``None`` (nothing changed) to settle it with a refresh instead.

        * Nothing charged (``charged == 0``): the balance did not move because of this
          call, so its reservation is released at once, whatever else is in flight.
        * Otherwise the report replaces the refresh only when it is provably the newest
          thing known: this call was the only one in flight, no read is in flight, and the
          cached balance was read before it was admitted (so it cannot include the
          charge). The cache becomes the balance after the charge (the reported balance,
          or the cached one less what the report says was spent), read "now": reads that
          started earlier are no longer trusted. Its age is the cached read's: spending
          the guard cannot see is still bounded by the TTL.
        """
        with self.lock:
            cached = self.cached
            alone = (
                cached is not None
                and self.inflight == 1
                and not self.settling
                and not self.flights
                and self.cached_seq >= self.floor
                and reservation.gen == self.cache_gen
            )
            if alone and cached is not None:
                after = after_report(cached, charged, total_after, balance_after)
            else:
                after = None
            if after is None:
                if charged != 0:
                    return None
                after = cached if cached is not None else reservation.balance
                self._unhold(reservation)
            else:
                self.seq += 1
                self.floor = self.seq
                self.cached = after
                self.cached_seq = self.seq
                self.cache_gen += 1
                self._unhold(reservation)
            callbacks = self._wake_released()
        for notify in callbacks:
            notify()
        return after

    def release_invalidate(self, reservation: Reservation) -> None:
        """Drop a reservation whose spend is unknown upstream; distrust every older read."""
        with self.lock:
            self._unhold(reservation)
            self._invalidate()
            callbacks = self._wake_released()
        for notify in callbacks:
            notify()

    def invalidate(self) -> None:
        with self.lock:
            self._invalidate()

    def _invalidate(self) -> None:
        self.seq += 1
        self.floor = self.seq
        self.cached = None
        self.cache_gen += 1

    # -- holds and the gate --------------------------------------------------------

    def expire_holds(self) -> None:
        """Give back the credits of the holds whose time is up. What they spent is
        unknown, so the cached balance is distrusted (and reads in flight with it)."""
        with self.lock:
            gone = self.holds.expired(_monotonic())
            if not gone:
                return
            callbacks: list[Callable[[], None]] = []
            for kept in gone:
                self._unhold(kept.reservation)
                if kept.turn is not None:
                    callbacks += self.gate.leave(kept.turn)
            self._invalidate()
            callbacks += self._wake_released()
        for notify in callbacks:
            notify()

    def _sweep(self) -> None:
        if _monotonic() >= self.holds.due:
            self.expire_holds()

    def enter_gate(self, turn: Turn, limit: int, until: float) -> bool | Step:
        """``turn`` has its turn at the gate (True), or the wait for it: until it is
        handed one, ``until``, or the next hold expiry (which may free one)."""
        self._sweep()
        with self.lock:
            if self.gate.enter(turn, limit):
                return True
            return turn, False, min(until, self.holds.due)

    def leave_gate(self, turn: Turn) -> None:
        with self.lock:
            callbacks = self.gate.leave(turn)
        for notify in callbacks:
            notify()

    # The operations the guard drives, as ``Ops`` generators (see ``AccountState``). In memory
    # nothing needs I/O, so each returns at once; the ``yield`` after ``return`` only makes
    # them generators.

    def admit(
        self,
        cost: int,
        ttl: float,
        flight: Flight | None,
        sync: bool,
        until: float | None,
        enclosing: tuple[Reservation, ...],
        settle: bool,
    ) -> Ops[Reservation | Step]:
        self._sweep()
        return self.admit_step(cost, ttl, flight, sync, until, enclosing, settle)
        yield  # pragma: no cover

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]:
        self._sweep()
        return self.read_step(ttl, flight, sync)
        yield  # pragma: no cover

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]:
        self._sweep()
        return self.settle_step(after, flight, sync)
        yield  # pragma: no cover

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        return self.enter_gate(turn, limit, until)
        yield  # pragma: no cover

    def leave(self, turn: Turn) -> Ops[None]:
        self.leave_gate(turn)
        return
        yield  # pragma: no cover

    def keep(self, reservation: Reservation, expires_in: float, turn: Turn | None) -> Ops[Kept]:
        with self.lock:
            return self.holds.keep(reservation, expires_in, turn)
        yield  # pragma: no cover

    def held(self, hold_id: str) -> Ops[Kept | None]:
        self._sweep()
        with self.lock:
            return self.holds.open.get(hold_id)
        yield  # pragma: no cover

    def claim(self, hold_id: str) -> Ops[Kept | None]:
        self._sweep()
        with self.lock:
            kept = self.holds.claim(hold_id)
            callbacks = [] if kept is None or kept.turn is None else self.gate.leave(kept.turn)
        for notify in callbacks:
            notify()
        return kept
        yield  # pragma: no cover

    def give_back(self, reservation: Reservation) -> Ops[None]:
        self.unreserve(reservation)
        return
        yield  # pragma: no cover

    def pending(self) -> Ops[int]:
        return self.pending_after()
        yield  # pragma: no cover

    def committed(self) -> Ops[int]:
        self._sweep()
        return self.holds.credits
        yield  # pragma: no cover

    def survey(self) -> Ops[AccountSnapshot]:
        self._sweep()
        with self.lock:
            trusted = self.cached is not None and self.cached_seq >= self.floor
            holds = self.holds
            open_holds = tuple(
                OpenHold(k.hold_id, k.reservation.cost, k.expires_at) for k in holds.open.values()
            )
            return AccountSnapshot(
                balance=self.cached if trusted else None,
                reserved=self.reserved - holds.credits,
                in_flight=self.inflight - len(open_holds),
                held=holds.credits,
                holds=len(open_holds),
                settling=len(self.settling),
                gate_waiting=len(self.gate.queue),
                backend="memory",
                open_holds=open_holds,
            )
        yield  # pragma: no cover

    def busy(self) -> bool:
        """Whether a call is in flight, a hold open or a caller waiting on the account: its
        state must not be forgotten. Calls that returned and wait for a read do not count:
        an account made anew reads a balance that includes them."""
        self._sweep()
        with self.lock:
            return bool(
                self.inflight > len(self.settling)
                or self.waiters
                or self.gate.active
                or self.gate.queue
                or self.holds.open
            )

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]:
        return self.bump(sync)
        yield  # pragma: no cover

    def begin(self, settlement: Reservation, sync: bool) -> Ops[Step]:
        return self.begin_settle(settlement, sync)
        yield  # pragma: no cover

    def defer(self, settlement: Reservation) -> Ops[None]:
        self.defer_settle(settlement)
        return
        yield  # pragma: no cover

    def end(self, settlement: Reservation, failed: bool) -> Ops[None]:
        self.end_settle(settlement, failed=failed)
        return
        yield  # pragma: no cover

    def reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> Ops[CreditBalance | None]:
        return self.settle_reported(reservation, charged, total_after, balance_after)
        yield  # pragma: no cover

    def drop(self, reservation: Reservation) -> Ops[None]:
        self.release_invalidate(reservation)
        return
        yield  # pragma: no cover

    def unchecked(self, cost: int) -> Ops[Reservation]:
        return self.reserve_unchecked(cost)
        yield  # pragma: no cover

    def record(
        self,
        flight: Flight,
        result: CreditBalance | None,
        error: BaseException | None,
    ) -> Ops[None]:
        self.complete(flight, result, error)
        return
        yield  # pragma: no cover

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

    def snapshot(self) -> tuple[CreditBalance | None, int, int]:
        """(cached balance, credits reserved, calls in flight), for tests and metrics."""
        self._sweep()
        with self.lock:
            return self.cached, self.reserved, self.inflight


class MemoryBackend:
    """Account state in this process.

    The ``max_accounts`` most recently used idle accounts stay cached. An account that
    is busy (calls in flight, open holds, callers waiting at admission or at its gate)
    is never forgotten: pushed out of the recent ones, it is kept aside until it is idle
    again. (Calls that returned and only wait for a read do not keep it: an account made
    anew reads a balance that includes them.) So memory is bounded by ``max_accounts``
    idle accounts plus the accounts with work in flight, which holds bound by expiring.
    """

    def __init__(self, max_accounts: int = 10_000) -> None:
        if type(max_accounts) is not int or max_accounts < 1:
            raise ValueError(f"max_accounts must be an int >= 1, got {max_accounts!r}")
        # Accounts pushed out of the recent ones while busy, until they are idle.
        self._busy: dict[str, Account] = {}
        self._recent = _Recent(max_accounts, self._busy)
        self._live: weakref.WeakValueDictionary[str, Account] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def account(self, fingerprint: str) -> Account:
        """The state of the account ``fingerprint``, created on first use."""
        with self._lock:
            account = self._live.get(fingerprint)
            if account is None:
                account = self._live[fingerprint] = Account(fingerprint)
            busy = self._busy
            if busy:
                busy.pop(fingerprint, None)
                if busy:  # look at one kept aside (in turn): forget it if idle now
                    name = next(iter(busy))
                    kept = busy.pop(name)
                    if kept.busy():
                        busy[name] = kept
            self._recent[fingerprint] = account
            return account

    def __len__(self) -> int:
        return len(self._live)


class _Recent(cachetools.LRUCache[str, Account]):
    """The most recently used accounts; one pushed out while busy is kept in ``busy``."""

    def __init__(self, maxsize: int, busy: dict[str, Account]) -> None:
        super().__init__(maxsize)
        self._busy = busy

    def popitem(self) -> tuple[str, Account]:
        name, account = super().popitem()
        if account.busy():
            self._busy[name] = account
        return name, account
