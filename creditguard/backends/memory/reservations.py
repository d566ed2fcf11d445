"""The account's reservations: admission (a call reserves its cost on a trusted balance,
or waits for a read or for calls in flight), and settling (a finished spend keeps its
reservation until a read that includes it comes back, or its paid call's report stands in
for that read)."""

from __future__ import annotations

import time
from collections.abc import Callable

from creditguard.backends.memory.reads import AccountReads
from creditguard.core.balance import AllowanceExceeded, InsufficientCredits
from creditguard.core.errors import AdmissionTimeout
from creditguard.core.models import CreditBalance
from creditguard.core.settling import MAX_SETTLING, after_report
from creditguard.core.steps import (
    Admission,
    Flight,
    Ops,
    Reservation,
    Step,
    Waiter,
    Window,
    done,
    own_credits,
)

__all__ = ["AccountReservations"]


def _exceeded(cost: int, window: Window, spent: int, reserved: int) -> AllowanceExceeded:
    return AllowanceExceeded(
        cost,
        subject=window.subject,
        limit=window.limit,
        spent=spent,
        resets_at=window.resets_at,
        reserved=reserved,
    )


_monotonic = time.monotonic


class AccountReservations(AccountReads):
    """The reservations of one account: admitting calls and settling their spends."""

    __slots__ = ()

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

    def try_admit(
        self, cost: int, ttl: float, defer: bool = True, keep: int = 0, window: Window | None = None
    ) -> Reservation | None:
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
                or (cost > cached.total_balance - self.reserved - keep and cost)
            ):
                return None
            if window is None:
                self.reserved += cost
                self.inflight += 1
                return Reservation(cost, cached, self.cache_gen)
            book = self.windows.get(window.key)
            used = 0 if book is None else book.spent + book.reserved
            if cost > window.limit - used and cost:
                return None
            reservation = Reservation(cost, cached, self.cache_gen)
            self._reserve_in(window, reservation)
            self.reserved += cost
            self.inflight += 1
            return reservation

    def _reserve_in(self, window: Window, reservation: Reservation) -> None:
        """Under the lock: count ``reservation`` in its subject's window, and note when it
        takes the window past the allowance's warning for the first time."""
        book = self._book(window.key, window.end)
        book.reserved += reservation.cost
        reservation.window = window
        warn = window.warn
        if warn is not None and not book.warned and book.spent + book.reserved >= warn:
            book.warned = True
            reservation.warned = True

    def _window_blocks(self, cost: int, window: Window) -> bool:
        """Under the lock: raise :class:`AllowanceExceeded` when the subject's window
        cannot take ``cost`` even if its calls in flight charge nothing; else whether
        those calls stand in the way (wait for them)."""
        if not cost:
            return False
        book = self.windows.get(window.key)
        if book is None:
            if cost > window.limit:
                raise _exceeded(cost, window, 0, 0)
            return False
        if cost > window.limit - book.spent:
            raise _exceeded(cost, window, book.spent, book.reserved)
        return cost > window.limit - book.spent - book.reserved

    def window_usage(self, window: Window) -> Ops[tuple[int, int]]:
        """What the subject's window holds: (charged, reserved by calls in flight)."""
        with self.lock:
            book = self.windows.get(window.key)
            return done((0, 0) if book is None else (book.spent, book.reserved))

    def admit(self, asking: Admission, flight: Flight | None) -> Ops[Reservation | Step]:
        """Reserve ``asking.cost`` on a trusted balance, or name what to wait for or
        perform. With ``asking.settle``, when the cost does not fit and finished spends
        wait for a read (see :meth:`defer`), perform or join that read and decide again.
        Raises :class:`InsufficientCredits` when the account cannot pay even if the calls
        in flight charge nothing, and :class:`AdmissionTimeout` when only they stand in
        the way and the caller may not wait any longer (nothing reserved either way).
        """
        cost, sync, until = asking.cost, asking.sync, asking.until
        keep, window = asking.keep, asking.window
        self._sweep()
        with self.lock:
            # The subject's allowance first: it needs no balance.
            blocked = window is not None and self._window_blocks(cost, window)
            balance = self._usable(flight, asking.ttl)
            if balance is None:
                return done(self._join_or_lead(self.floor, sync))
            total = balance.total_balance
            reserved = self.reserved
            if not blocked and (cost <= total - reserved - keep or not cost):
                # (a free call always fits)
                self.reserved = reserved + cost
                self.inflight += 1
                gen = self.cache_gen if balance is self.cached else -1
                reservation = Reservation(cost, balance, gen)
                if window is not None:
                    self._reserve_in(window, reservation)
                return done(reservation)
            own = own_credits(asking.enclosing)
            committed = self.holds.credits + own
            if cost > total - committed - keep:
                raise InsufficientCredits(
                    cost, max(0, total - committed - keep), balance, reserved=reserved, keep=keep
                )
            settling = self.settling
            if settling and asking.settle and not blocked:
                # Spends that finished and wait for a read hold credits a read would
                # show (they may have cost less than declared): read, then decide.
                return done(self._join_or_lead(settling[-1].after, sync))
            if until is not None and _monotonic() < until:
                waiter = Waiter(cost, own, keep, window)
                self.waiters.append(waiter)
                return done(Step(waiter, False, until))
            raise AdmissionTimeout(cost, max(0, total - reserved), reserved=reserved)

    def forget(self, waiter: Waiter) -> None:
        """A waiter gave up (its wait timed out, or it was cancelled): drop it."""
        with self.lock:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def unchecked(self, cost: int) -> Ops[Reservation]:
        """Fail-open admission: count the call as in flight with no balance to check."""
        with self.lock:
            self.reserved += cost
            self.inflight += 1
            return done(Reservation(cost, None, -1))

    def unreserve(self, reservation: Reservation) -> None:
        """Give back a reservation whose action never started (nothing was spent)."""
        with self.lock:
            self._unhold(reservation)
            callbacks = self._wake_released()
            if self._charge(reservation, 0):
                callbacks += self._wake_windows()
        for notify in callbacks:
            notify()

    def give_back(self, reservation: Reservation) -> Ops[None]:
        """Release a reservation that spent nothing (see :meth:`unreserve`)."""
        self.unreserve(reservation)
        return done(None)

    # -- settling ------------------------------------------------------------------

    def record(
        self,
        flight: Flight,
        result: CreditBalance | None,
        error: BaseException | None,
    ) -> Ops[None]:
        """Record how a read ended (neither result nor error: abandoned), settle the spends
        it includes and wake waiters."""
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
        return done(None)

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

    def begin(self, settlement: Reservation, sync: bool) -> Ops[Step]:
        """The action of ``settlement`` finished: hold its reservation until a read that
        started after now comes back, and name the read to wait on/perform."""
        with self.lock:
            self.seq += 1
            settlement.after = self.seq
            self.settling.append(settlement)
            callbacks = self._wake_windows() if self._charge(settlement) else []
            step = self._join_or_lead(self.seq, sync)
        for notify in callbacks:
            notify()
        return done(step)

    def defer(self, settlement: Reservation) -> Ops[None]:
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
            self._charge(settlement)  # (its window's waiters are all woken below)
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
        return done(None)

    def pending(self) -> Ops[int]:
        """The ``seq`` a read must start at to include every finished spend still
        waiting for one (0: none waits)."""
        with self.lock:
            settling = self.settling
            return done(settling[-1].after if settling else 0)

    def end(self, settlement: Reservation, failed: bool) -> Ops[None]:
        """The caller saw its refresh (or its failure): release if a read has not yet, and
        on failure distrust every older read."""
        if settlement.released and not failed:
            # The read that included it released it (set last, under the lock).
            return done(None)
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
        return done(None)

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]:
        """Note that the balance may have changed upstream (an action finished, or a
        refresh was asked for): return the new ``seq`` and the read to wait on/perform.

        A read that starts from now on has ``start_seq >=`` the returned ``seq``.
        """
        with self.lock:
            self.seq += 1
            after = self.seq
            return done((after, self._join_or_lead(after, sync)))

    def reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> Ops[CreditBalance | None]:
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
                    return done(None)
                after = cached if cached is not None else reservation.balance
                self._unhold(reservation)
                self._charge(reservation, 0)
            else:
                self.seq += 1
                self.floor = self.seq
                self.cached = after
                self.cached_seq = self.seq
                self.cache_gen += 1
                self._unhold(reservation)
                self._charge(reservation)
            callbacks = self._wake_released() + self._wake_windows()
        for notify in callbacks:
            notify()
        return done(after)

    def drop(self, reservation: Reservation) -> Ops[None]:
        """Drop a reservation whose spend is unknown upstream; distrust every older read."""
        with self.lock:
            self._unhold(reservation)
            self._charge(reservation, 0)  # a failed call spends nothing of its allowance
            self._invalidate()
            callbacks = self._wake_released()
        for notify in callbacks:
            notify()
        return done(None)
