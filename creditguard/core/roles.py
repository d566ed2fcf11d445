"""The interface between the guard's flows and where account state lives, split by role:

* ``Reads``: the cached balance and the balance reads in flight (who leads a read, who
  joins one, which reads may be trusted);
* ``Reservations``: admission and settling (the credits of calls in flight, the calls
  that returned and wait for a read, the waiters);
* ``Gate``: turns at the account's gate (``max_concurrent``);
* ``Holds``: reservations kept open past their call, by id.

``AccountState`` is all four: the memory backend's ``Account`` and the Redis backend's
account implement it; ``StateBackend`` is where accounts live.

The operations the flows drive are ``Ops`` generators: they yield the I/O they need
(``Call``: a Redis script; the memory backend yields none) and return a result, a
reservation, or a ``Step`` (a balance read to lead or join, or something to wait for
until a deadline). Waiting is local to the process: a ``Step``'s waitable is finished by
this process's callers, or its deadline passes. The plain methods make no request and
never wait.
"""

from __future__ import annotations

import threading
from typing import Protocol

from creditguard.core.models import AccountSnapshot, CreditBalance
from creditguard.core.steps import (
    Admission,
    Flight,
    Kept,
    Ops,
    Reservation,
    Step,
    Turn,
    Waiter,
    Window,
)

__all__ = ["AccountState", "Gate", "Holds", "Reads", "Reservations", "StateBackend"]


class Reads(Protocol):
    """The cached balance and the reads that refresh it."""

    fingerprint: str
    """The account's name (a hash of base URL and key; never the key)."""
    lock: threading.Lock
    """Guards the account's decisions in this process (waiters register under it)."""

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]:
        """The balance, when one is cached and younger than ``ttl`` seconds; else the
        read to lead or join. ``flight`` is the read the caller just waited for, if any
        (its outcome is looked at first)."""
        ...

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]:
        """A balance from a read that started at or after the sequence number ``after``
        (so it includes every call that had returned by then), or the read to lead or
        join for one."""
        ...

    def pending(self) -> Ops[int]:
        """The sequence number a read must start at or after to settle every call that
        returned and waits for a read (``0``: none waits)."""
        ...

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]:
        """A refresh: every cached balance and read in flight is now too old; the
        sequence number a read must start at, and the read to lead or join."""
        ...

    def record(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> Ops[None]:
        """How the read ``flight`` ended: stores ``result`` when it may be trusted (it
        started after everything it must include, and nothing has distrusted it since),
        settles the calls it covers, and wakes whoever joined it."""
        ...

    def watch(self, flight: Flight) -> Ops[None] | None:
        """How to lead ``flight`` when the backend performs it itself (with Redis: another
        process is reading, and this one watches for the result); ``None``: the leader
        reads upstream."""
        ...

    def overdue(self, flight: Flight) -> None:
        """``flight`` outlived the read budget: nobody joins it any more."""
        ...

    def block(self, seconds: float) -> None:
        """The service's rate limit is used up for ``seconds``: no read until then."""
        ...

    def blocked(self) -> float | None:
        """Seconds until the rate limit resets (``None``: reads may go)."""
        ...

    def invalidate(self) -> None:
        """Forget the cached balance; reads in flight will not be trusted."""
        ...

    def snapshot(self) -> tuple[CreditBalance | None, int, int]:
        """This process's view, no I/O: the cached balance, the credits reserved, the
        calls in flight."""
        ...

    def fresh(self, ttl: float) -> bool:
        """Whether a cached balance younger than ``ttl`` seconds is known (no I/O)."""
        ...

    def survey(self) -> Ops[AccountSnapshot]:
        """What the account holds now (over Redis: across every process); no upstream
        request."""
        ...


class Reservations(Protocol):
    """Admission and settling: the credits of calls in flight."""

    released_at: float
    """When a reservation was last released (a waiter's cue to look again)."""

    def try_admit(
        self,
        cost: int,
        ttl: float,
        defer: bool = True,
        keep: int = 0,
        window: Window | None = None,
    ) -> Reservation | None:
        """The warm path, no I/O and no generator: reserve ``cost`` on a fresh cached
        balance that covers it beside every reservation and the floor ``keep``, and in
        the subject's ``window`` when one applies; ``None``: go the slow way."""
        ...

    def admit(self, asking: Admission, flight: Flight | None) -> Ops[Reservation | Step]:
        """Reserve ``asking.cost``, or say what to wait for: a read (to lead or join), or
        the calls in flight to settle (until ``asking.until``). Raises
        ``InsufficientCredits`` when the account cannot pay even if the calls in flight
        charge nothing (``asking.enclosing``, the caller's own, cannot settle while it
        waits), ``AdmissionTimeout`` when only they stand in the way and the caller may
        wait no longer. ``flight``: the read the caller just waited for, if any."""
        ...

    def committed(self) -> Ops[int]:
        """The credits of the account's open holds: commitments that will not settle while
        a caller waits (a refusal may count them as spent; see docs/consistency.md)."""
        ...

    def unchecked(self, cost: int) -> Ops[Reservation]:
        """Reserve ``cost`` without a balance (``on_unavailable="allow"``)."""
        ...

    def defer(self, settlement: Reservation) -> Ops[None]:
        """The call returned and nobody waits for the balance after it: keep its
        reservation until a read that started after now settles it."""
        ...

    def begin(self, settlement: Reservation, sync: bool) -> Ops[Step]:
        """The call returned and its caller waits for the balance after it: the read to
        lead or join (one that started after the call returned)."""
        ...

    def end(self, settlement: Reservation, failed: bool) -> Ops[None]:
        """Release a settlement begun with :meth:`begin` (``failed``: its read failed, so
        the cached balance is distrusted)."""
        ...

    def reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> Ops[CreditBalance | None]:
        """Settle from the paid call's own report, when it can stand in for a read: the
        balance after (cached when it cannot contradict what is known), or ``None``
        (settle with a read instead)."""
        ...

    def drop(self, reservation: Reservation) -> Ops[None]:
        """The call raised: release its reservation and distrust the cached balance (what
        it spent is unknown)."""
        ...

    def give_back(self, reservation: Reservation) -> Ops[None]:
        """Release a reservation that spent nothing (no read needed, nothing distrusted)."""
        ...

    def unreserve(self, reservation: Reservation) -> None:
        """Release at once, no I/O awaited (an interrupt between reserving and running)."""
        ...

    def forget(self, waiter: Waiter) -> None:
        """``waiter`` gave up (deadline or cancellation): it leaves the account's list."""
        ...

    def window_usage(self, window: Window) -> Ops[tuple[int, int]]:
        """What a subject's allowance window holds: the credits its calls were charged,
        and those its calls in flight reserve."""
        ...

    def flip(self, name: str, low: bool) -> Ops[bool | None]:
        """Record that the balance is now below (``low``) or above the low-balance
        threshold ``name``; returns the side recorded before (``None``: none), so that
        whoever sees a change first, in any process sharing the backend, tells it."""
        ...


class Gate(Protocol):
    """Turns at the account's gate: at most ``limit`` guarded calls in flight."""

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        """Take a turn at the account's gate: ``True`` when ``turn`` has one (at most
        ``limit`` in flight), else what to wait on before asking again. With
        ``turn.check``, first refuse (``InsufficientCredits``) a caller new at the gate
        the account cannot pay, or answer ``False`` when that takes a balance read (the
        flow checks, then asks again); with ``turn.admit``, it may admit the call as it
        grants the turn (``turn.admitted``)."""
        ...

    def leave(self, turn: Turn) -> Ops[None]:
        """Give the turn back, or leave the queue (twice: nothing)."""
        ...


class Holds(Protocol):
    """Reservations kept open past their call, by id, until their work is done."""

    def keep(self, reservation: Reservation, expires_in: float, turn: Turn | None) -> Ops[Kept]:
        """Keep ``reservation`` open as a hold, past its call, for ``expires_in`` seconds;
        the hold has ``turn`` until it ends (or the turn is given back)."""
        ...

    def held(self, hold_id: str) -> Ops[Kept | None]:
        """The open hold ``hold_id`` (``None``: unknown, ended or expired)."""
        ...

    def claim(self, hold_id: str) -> Ops[Kept | None]:
        """End the hold ``hold_id`` so its caller settles or releases its reservation (at
        most one caller gets it); ``None`` when it is not open."""
        ...


class AccountState(Reads, Reservations, Gate, Holds, Protocol):
    """The state of one account, as the guard's flows drive it: every role."""


class StateBackend(Protocol):
    """Where account state lives: :class:`MemoryBackend` keeps it in this process,
    ``creditguard.redis.RedisBackend`` in Redis, shared by every process using it."""

    def account(self, fingerprint: str) -> AccountState:
        """The state of the account ``fingerprint``, created on first use."""
        ...
