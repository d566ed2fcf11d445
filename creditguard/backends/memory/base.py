"""The state of one account in this process, and the bookkeeping every part of it shares.

The account (``Account``, in ``state.py``) is built in layers, each a module: this one
(its state; releasing a reservation, distrusting the cache, waking the callers waiting at
admission, expiring holds), ``reads.py`` (the balance cache and the reads in flight),
``reservations.py`` (admission and settling) and ``state.py`` (holds, the gate, what the
account holds).

No layer does I/O. Every decision is one short section under the account's
``threading.Lock`` that never waits; what a caller must wait for (a read, a release) is
handed back to the guard's sync or async driver (see ``creditguard/core/drive.py``), so the
admission logic exists once. The operations the guard drives are ``Ops`` generators (see
``AccountState``); in memory none needs I/O, so each computes its result at once and
returns it as ``done(result)``.

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

import os
import threading
import time
import weakref
from collections.abc import Callable

from creditguard.backends.memory.commitments import LocalGate, LocalHolds
from creditguard.core.models import CreditBalance
from creditguard.core.steps import Flight, Reservation, Waiter, WindowBook

__all__ = ["AccountBase"]

_monotonic = time.monotonic

# The accounts of this process, told when it forks (see :func:`_after_fork`).
_accounts: weakref.WeakSet[AccountBase] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child (gunicorn's workers after ``--preload``, a ``fork`` start
    method): each account starts with no call in flight. The parent's calls, reads, gate
    turns and holds belong to threads that are not in the child and would never end
    them, and a thread of the parent may have held the account's lock. The cached
    balance goes too (the next call reads one that includes what the parent spent);
    the allowance windows (the parent's calls in flight counted as spent), the
    low-balance sides and a rate-limit pause are kept."""
    for account in list(_accounts):
        account._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class AccountBase:
    """The state of one account (base URL + API key), and the changes to it under its
    lock that every layer of :class:`Account` makes."""

    __slots__ = (
        "__weakref__",
        "alerts",
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
        "windows",
        "windows_swept",
    )

    def __init__(self, fingerprint: str) -> None:
        _accounts.add(self)
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
        # that balance cannot include its charge (see ``reported``).
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
        # The allowance windows of the subjects that spent on the account (by key).
        self.windows: dict[str, WindowBook] = {}
        # Which side of each low-balance threshold the balance was last seen on.
        self.alerts: dict[str, bool] = {}
        self.windows_swept = 0.0

    def _forked(self) -> None:
        """In a forked child: this account as new, but for what outlives the parent's
        calls (see :func:`_after_fork`)."""
        windows, alerts, blocked_until = self.windows, self.alerts, self.blocked_until
        AccountBase.__init__(self, self.fingerprint)
        self.windows, self.alerts, self.blocked_until = windows, alerts, blocked_until
        for window in windows.values():
            # The parent's calls in flight end out of the child's sight: as for a call
            # whose outcome is unknown, their costs count as spent.
            window.spent += window.reserved
            window.reserved = 0

    def __repr__(self) -> str:
        return (
            f"<Account {self.fingerprint} reserved={self.reserved} inflight={self.inflight}"
            f" seq={self.seq}>"
        )

    def _unhold(self, reservation: Reservation) -> None:
        """Under the lock: stop counting ``reservation`` as in flight."""
        self.released_at = _monotonic()
        self.reserved -= reservation.cost
        self.inflight -= 1
        reservation.released = True

    def _charge(self, reservation: Reservation, charged: int | None = None) -> bool:
        """Under the lock: the call of ``reservation`` ended; count what it was charged
        (``charged``, else what its call reported, else its cost) in its subject's window,
        once. Returns whether a window changed (its waiters may now fit)."""
        window = reservation.window
        if window is None:
            return False
        reservation.window = None
        book = self.windows.get(window.key)
        if book is None:
            return False
        if charged is None:
            charged = reservation.cost if reservation.charge is None else reservation.charge
        book.reserved -= reservation.cost
        book.spent += charged
        return True

    def _wake_windows(self) -> list[Callable[[], None]]:
        """Under the lock: a window's calls in flight settled: the waiters held back by an
        allowance look again."""
        callbacks: list[Callable[[], None]] = []
        keep: list[Waiter] = []
        for waiter in self.waiters:
            if waiter.window is not None and not waiter.done:
                callbacks += waiter._finish()
            elif not waiter.done:
                keep.append(waiter)
        self.waiters = keep
        return callbacks

    def _book(self, key: str, end: float) -> WindowBook:
        """Under the lock: the book of window ``key`` (made on first use; books of windows
        that ended with nothing in flight are dropped now and then)."""
        book = self.windows.get(key)
        if book is None:
            now = time.time()
            if now - self.windows_swept > 60:
                self.windows_swept = now
                for old, ended in list(self.windows.items()):
                    if ended.end < now and ended.reserved <= 0:
                        del self.windows[old]
            book = self.windows[key] = WindowBook(end)
        return book

    def _invalidate(self) -> None:
        """Under the lock: distrust the cached balance and every read started before now."""
        self.seq += 1
        self.floor = self.seq
        self.cached = None
        self.cache_gen += 1

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
            floor = waiter.keep
            if wake_all or waiter.cost <= room - floor or waiter.cost > free - waiter.own - floor:
                callbacks += waiter._finish()
            else:
                keep.append(waiter)
        self.waiters = keep
        return callbacks

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
                self._charge(kept.reservation)  # its outcome unknown: counted as spent
                if kept.turn is not None:
                    callbacks += self.gate.leave(kept.turn)
            self._invalidate()
            callbacks += self._wake_released()
        for notify in callbacks:
            notify()

    def _sweep(self) -> None:
        """Expire the holds whose time is up, if any (before an operation that looks at
        the cache, the reservations or the holds)."""
        if _monotonic() >= self.holds.due:
            self.expire_holds()
