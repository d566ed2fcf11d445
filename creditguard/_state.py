"""Per-account state: the cached balance, reservations and the balance read in flight.

This module does no I/O and never waits. Every decision is one short section under the
account's ``threading.Lock``; the guard's sync and async paths are thin drivers over it
(see ``_guard.py``), so the admission logic exists once.

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

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.lowlevel
import cachetools

from ._errors import InsufficientCredits
from ._models import CreditBalance

__all__ = ["Account", "Flight", "MemoryBackend", "StateBackend"]

# Balance reads one account may have in progress at once. Two let a caller that needs a
# read newer than the one in progress start it at once instead of queueing behind it.
MAX_FLIGHTS = 2

_monotonic = time.monotonic
_get_ident = threading.get_ident


class Flight:
    """One upstream balance read that any number of callers may wait on."""

    __slots__ = ("_callbacks", "_event", "abandoned", "error", "result", "start_seq", "thread")

    def __init__(self, start_seq: int) -> None:
        self.start_seq = start_seq
        self.thread = _get_ident()
        self.result: CreditBalance | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        # Waiters register here; None once the read has finished.
        self._callbacks: list[Callable[[], None]] | None = []
        # Made only when a thread waits (most reads have no sync waiter).
        self._event: threading.Event | None = None

    def wait(self, lock: threading.Lock) -> None:
        """Block this thread until the read finished (or was abandoned)."""
        with lock:
            if self._callbacks is None:
                return
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        event.wait()

    async def await_done(self, lock: threading.Lock) -> None:
        """Wait in the current task; the leader may be a thread or a task of another loop."""
        event = anyio.Event()
        me = _get_ident()
        native = anyio.lowlevel.current_token().native_token
        call_soon: Callable[[Callable[[], object]], object] = (
            native.call_soon_threadsafe
            if isinstance(native, asyncio.AbstractEventLoop)
            else native.run_sync_soon  # type: ignore[attr-defined]  # trio.lowlevel.TrioToken
        )

        def notify() -> None:
            if _get_ident() == me:
                event.set()
            else:
                # RuntimeError: that loop has closed, so nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    call_soon(event.set)

        with lock:
            callbacks = self._callbacks
            if callbacks is None:
                return
            callbacks.append(notify)
        await event.wait()

    def _finish(self) -> list[Callable[[], None]]:
        """Under the account lock: mark finished and hand back the waiters to notify."""
        callbacks = self._callbacks or []
        self._callbacks = None
        event = self._event
        if event is not None:
            callbacks.append(event.set)
        return callbacks


class Settlement:
    """A finished spend whose reservation waits for a read that includes it."""

    __slots__ = ("after", "cost", "released")

    def __init__(self, after: int, cost: int) -> None:
        self.after = after
        self.cost = cost
        self.released = False


class Account:
    """The guard state of one account (base URL + API key), shared by every caller."""

    __slots__ = (
        "__weakref__",
        "cached",
        "cached_at",
        "cached_seq",
        "fingerprint",
        "flights",
        "floor",
        "inflight",
        "lock",
        "reserved",
        "seq",
        "settling",
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
        # Reads in progress, oldest first (at most MAX_FLIGHTS).
        self.flights: list[Flight] = []
        # Spends waiting for a read that includes them (their credits still reserved).
        self.settling: list[Settlement] = []

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
                raise flight.error
            return flight.result
        return None

    def _join_or_lead(self, after: int) -> tuple[Flight, bool]:
        """Under the lock: the read to wait on, and whether the caller must perform it.

        The caller needs a read that started at ``seq >= after``. It joins the newest
        read in progress if that one started late enough; otherwise it starts a new one,
        unless ``MAX_FLIGHTS`` are already in progress, in which case it waits for the
        oldest to end and looks again. So a caller waits at most about two round trips,
        and any number of callers that finish together share a handful of reads.
        """
        flights = self.flights
        if flights:
            newest = flights[-1]
            if newest.start_seq >= after:
                return newest, False
            if len(flights) >= MAX_FLIGHTS:
                return flights[0], False
        flight = Flight(self.seq)
        flights.append(flight)
        return flight, True

    def private_flight(self) -> Flight:
        """A read that nobody else joins (for a sync caller that must not block on a
        read led by a task of the event loop running in its own thread)."""
        with self.lock:
            return Flight(self.seq)

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
            if result is not None:
                flight.result = result
                start = flight.start_seq
                if start >= self.floor and (self.cached is None or start >= self.cached_seq):
                    self.cached = result
                    self.cached_seq = start
                    self.cached_at = _monotonic()
                if self.settling:
                    self._settle_up_to(start)
            elif error is not None:
                flight.error = error
            else:
                flight.abandoned = True
            callbacks = flight._finish()
        for notify in callbacks:
            notify()

    def read_step(self, ttl: float, flight: Flight | None) -> CreditBalance | tuple[Flight, bool]:
        """A balance through the cache, or the read to wait on / perform."""
        with self.lock:
            balance = self._usable(flight, ttl)
            if balance is not None:
                return balance
            return self._join_or_lead(self.floor)

    # -- admission -----------------------------------------------------------------

    def try_admit(self, cost: int, ttl: float) -> CreditBalance | None:
        """Fast path: admit on a fresh cached balance, or ``None`` to go the slow way."""
        with self.lock:
            cached = self.cached
            if (
                cached is None
                or self.cached_seq < self.floor
                or _monotonic() - self.cached_at >= ttl
            ):
                return None
            self._reserve(cost, cached)
            return cached

    def admit_step(
        self, cost: int, ttl: float, flight: Flight | None
    ) -> CreditBalance | tuple[Flight, bool]:
        """Reserve ``cost`` on a trusted balance, or name the read to wait on / perform.

        Raises :class:`InsufficientCredits` (nothing reserved) when the balance minus the
        credits reserved by calls in flight is below ``cost``.
        """
        with self.lock:
            balance = self._usable(flight, ttl)
            if balance is None:
                return self._join_or_lead(self.floor)
            self._reserve(cost, balance)
            return balance

    def _reserve(self, cost: int, balance: CreditBalance) -> None:
        available = max(0, balance.total_balance - self.reserved)
        if cost > available:
            raise InsufficientCredits(cost, available, balance)
        self.reserved += cost
        self.inflight += 1

    def reserve_unchecked(self, cost: int) -> None:
        """Fail-open admission: count the call as in flight with no balance to check."""
        with self.lock:
            self.reserved += cost
            self.inflight += 1

    # -- settling ------------------------------------------------------------------

    def _settle_up_to(self, start: int) -> None:
        """Under the lock: a read that started at ``start`` came back, so every spend that
        finished before it is in that balance: release their reservations now, not when
        their callers wake (which would count the spend twice in the meantime)."""
        settling = self.settling
        waiting: list[Settlement] | None = None
        for settlement in settling:
            if settlement.after <= start:
                self._release(settlement)
            elif waiting is None:
                waiting = [settlement]
            else:
                waiting.append(settlement)
        if waiting is None:
            settling.clear()
        else:
            self.settling = waiting

    def _release(self, settlement: Settlement) -> None:
        self.reserved -= settlement.cost
        self.inflight -= 1
        if settlement.after > self.floor:
            self.floor = settlement.after
        settlement.released = True

    def begin_settle(self, cost: int) -> tuple[Settlement, tuple[Flight, bool]]:
        """An action that reserved ``cost`` finished: hold the reservation until a read
        that started after now comes back, and name the read to wait on/perform."""
        with self.lock:
            self.seq += 1
            settlement = Settlement(self.seq, cost)
            self.settling.append(settlement)
            return settlement, self._join_or_lead(self.seq)

    def end_settle(self, settlement: Settlement, *, failed: bool = False) -> None:
        """The caller saw its refresh (or its failure): release if a read has not yet, and
        on failure distrust every older read."""
        if settlement.released and not failed:
            return  # the read that included it released it (set last, under the lock)
        with self.lock:
            if not settlement.released:
                self.settling.remove(settlement)
                self._release(settlement)
            if failed:
                self._invalidate()

    def bump(self) -> tuple[int, tuple[Flight, bool]]:
        """Note that the balance may have changed upstream (an action finished, or a
        refresh was asked for): return the new ``seq`` and the read to wait on/perform.

        A read that starts from now on has ``start_seq >=`` the returned ``seq``.
        """
        with self.lock:
            self.seq += 1
            after = self.seq
            return after, self._join_or_lead(after)

    def settle_step(self, after: int, flight: Flight | None) -> CreditBalance | tuple[Flight, bool]:
        """A balance read that started at or after ``after``, or the read to wait on/perform."""
        with self.lock:
            if flight is not None and flight.start_seq >= after:
                if flight.result is not None:
                    return flight.result
                if flight.error is not None:
                    raise flight.error
            if self.cached is not None and self.cached_seq >= after:
                return self.cached
            return self._join_or_lead(after)

    def release_invalidate(self, cost: int) -> None:
        """Drop a reservation whose spend is unknown upstream; distrust every older read."""
        with self.lock:
            self.reserved -= cost
            self.inflight -= 1
            self._invalidate()

    def invalidate(self) -> None:
        with self.lock:
            self._invalidate()

    def _invalidate(self) -> None:
        self.seq += 1
        self.floor = self.seq
        self.cached = None

    def snapshot(self) -> tuple[CreditBalance | None, int, int]:
        """(cached balance, credits reserved, calls in flight), for tests and metrics."""
        with self.lock:
            return self.cached, self.reserved, self.inflight


class StateBackend(Protocol):
    """Where account state lives. The memory backend keeps it in this process."""

    def account(self, fingerprint: str) -> Account: ...


class MemoryBackend:
    """Account state in this process.

    The ``max_accounts`` most recently used accounts stay cached; an account evicted
    while calls are still in flight on it stays alive (and shared) until they finish,
    so eviction never forgets a reservation.
    """

    def __init__(self, max_accounts: int = 10_000) -> None:
        if type(max_accounts) is not int or max_accounts < 1:
            raise ValueError(f"max_accounts must be an int >= 1, got {max_accounts!r}")
        self._recent: cachetools.LRUCache[str, Account] = cachetools.LRUCache(max_accounts)
        self._live: weakref.WeakValueDictionary[str, Account] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def account(self, fingerprint: str) -> Account:
        with self._lock:
            account = self._live.get(fingerprint)
            if account is None:
                account = self._live[fingerprint] = Account(fingerprint)
            self._recent[fingerprint] = account
            return account

    def __len__(self) -> int:
        return len(self._live)
