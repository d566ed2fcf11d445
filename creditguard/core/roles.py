"""The interface between the guard and where account state lives: ``AccountState`` (one
account; implemented by the memory backend's ``Account`` and by the Redis backend) and
``StateBackend`` (where accounts live)."""

from __future__ import annotations

import threading
from typing import Protocol

from creditguard.core.models import AccountSnapshot, CreditBalance
from creditguard.core.steps import Flight, Kept, Ops, Reservation, Step, Turn, Waiter

__all__ = ["AccountState", "StateBackend"]


class AccountState(Protocol):
    """The state of one account, as the guard drives it: the interface the memory backend
    (:class:`Account`) and the Redis backend implement.

    The operations the guard drives are ``Ops`` generators: they yield the I/O they need
    (``Call``) and return a result, a reservation, or a ``Step`` (a balance read to lead or
    join, or something to wait for until a deadline). Waiting is local to the process: a
    ``Step``'s waitable is finished by this process's callers, or its deadline passes. The
    plain methods make no request (``try_admit`` may answer ``None``: go the slow way).
    """

    fingerprint: str
    lock: threading.Lock
    released_at: float

    def try_admit(self, cost: int, ttl: float, defer: bool = True) -> Reservation | None: ...

    def admit(
        self,
        cost: int,
        ttl: float,
        flight: Flight | None,
        sync: bool,
        until: float | None,
        enclosing: tuple[Reservation, ...],
        settle: bool,
    ) -> Ops[Reservation | Step]: ...

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]: ...

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]: ...

    def pending(self) -> Ops[int]: ...

    def committed(self) -> Ops[int]:
        """The credits of the account's open holds: commitments that will not settle while
        a caller waits (a refusal may count them as spent; see docs/consistency.md)."""
        ...

    def survey(self) -> Ops[AccountSnapshot]:
        """What the account holds now (over Redis: across every process); no upstream
        request."""
        ...

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]: ...

    def begin(self, settlement: Reservation, sync: bool) -> Ops[Step]: ...

    def defer(self, settlement: Reservation) -> Ops[None]: ...

    def end(self, settlement: Reservation, failed: bool) -> Ops[None]: ...

    def reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> Ops[CreditBalance | None]: ...

    def drop(self, reservation: Reservation) -> Ops[None]: ...

    def unchecked(self, cost: int) -> Ops[Reservation]: ...

    def record(
        self,
        flight: Flight,
        result: CreditBalance | None,
        error: BaseException | None,
    ) -> Ops[None]: ...

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        """Take a turn at the account's gate: ``True`` when ``turn`` has one (at most
        ``limit`` in flight), else what to wait on before asking again."""
        ...

    def leave(self, turn: Turn) -> Ops[None]:
        """Give the turn back, or leave the queue (twice: nothing)."""
        ...

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

    def give_back(self, reservation: Reservation) -> Ops[None]:
        """Release a reservation that spent nothing (no read needed, nothing distrusted)."""
        ...

    def watch(self, flight: Flight) -> Ops[None] | None:
        """How to lead ``flight`` when the backend performs it itself (with Redis: another
        process is reading, and this one watches for the result); ``None``: the leader
        reads upstream."""
        ...

    def unreserve(self, reservation: Reservation) -> None: ...

    def forget(self, waiter: Waiter) -> None: ...

    def overdue(self, flight: Flight) -> None: ...

    def block(self, seconds: float) -> None: ...

    def blocked(self) -> float | None: ...

    def invalidate(self) -> None: ...

    def snapshot(self) -> tuple[CreditBalance | None, int, int]: ...

    def fresh(self, ttl: float) -> bool: ...


class StateBackend(Protocol):
    """Where account state lives: :class:`MemoryBackend` keeps it in this process,
    ``creditguard.redis.RedisBackend`` in Redis, shared by every process
    using it."""

    def account(self, fingerprint: str) -> AccountState:
        """The state of the account ``fingerprint``, created on first use."""
        ...
