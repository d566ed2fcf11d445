"""Spends while Redis is down: :class:`FallbackAccount`, the account the Redis backend
hands the guard. It holds the account in Redis (``primary``, a
:class:`~.account.RedisAccount`) and one in this process's memory (``fallback``, the
memory backend's :class:`~creditguard.backends.memory.Account`), and routes each
operation to one of them.

* While Redis answers, every operation goes to ``primary``.
* ``fallback="memory"`` (``serve``): when the call an operation starts with finds Redis
  down (it raises :class:`BalanceUnavailable`; nothing was done in Redis), the operation
  goes to ``fallback`` instead, and so does every operation that starts in the next
  ``RETRY_AFTER`` seconds; then Redis is tried again. Each outage is logged once, when
  it starts. ``bumped``, ``snapshot``, ``block``, ``blocked``, ``overdue`` and ``forget``
  always go to ``primary`` (``invalidate`` to both), and so does the rest of an operation
  once Redis answered its first call: a failure then raises.
* Without it, only a spend run unchecked while Redis is down (the guard's
  ``on_unavailable="allow"``) is counted in ``fallback``; the rest raises.
* A reservation, a balance read, a turn at the gate or a hold goes back to the side that
  made it (a hold is looked for in memory first).
* A spend outside Redis makes ``primary`` distrust its cached balance when Redis is back
  (:meth:`~.account.RedisAccount.spent_outside`): it cannot include that spend.

Callers wait (on reads, turns, admissions) with ``primary``'s lock, on either side.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from creditguard.backends.memory import Account
from creditguard.backends.redis.account import RedisAccount
from creditguard.backends.redis.context import RedisReservation
from creditguard.backends.redis.reads import RedisFlight, answered
from creditguard.core.errors import BalanceUnavailable
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
    own_error,
)

__all__ = ["RETRY_AFTER", "FallbackAccount"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic
T = TypeVar("T")

# After Redis failed, how long the fallback serves before Redis is tried again.
RETRY_AFTER = 1.0


class _Down:
    """What :meth:`FallbackAccount._first` answers when the fallback serves."""


DOWN = _Down()


class FallbackAccount:
    """An account in Redis with one in this process's memory for when Redis is down (see
    the module)."""

    def __init__(self, primary: RedisAccount, fallback: Account, serve: bool) -> None:
        self.primary = primary
        self.fallback = fallback
        self.serve = serve  # fallback="memory": serve every operation while Redis is down
        self.fingerprint = primary.fingerprint
        self.lock = primary.lock
        self.released_at = 0.0
        self._down_until = 0.0

    def __repr__(self) -> str:
        return repr(self.primary)

    @property
    def flights(self) -> list[RedisFlight]:
        """The reads in Redis this process's callers share, oldest first."""
        return self.primary.flights

    @property
    def waiters(self) -> list[Waiter]:
        """This process's callers waiting in Redis, at admission or for a turn."""
        return self.primary.waiters

    def queued(self) -> int:
        """How many callers wait for a turn in Redis (for tests and metrics)."""
        return self.primary.queued()

    # -- where an operation goes ---------------------------------------------------------

    def _degraded(self) -> Account | None:
        """The fallback while Redis was seen down a moment ago (``serve`` only)."""
        if _monotonic() < self._down_until:
            return self.fallback
        return None

    def _down(self, exc: BalanceUnavailable) -> Account | None:
        """Redis failed: the fallback to use instead (``serve``), if any."""
        if not self.serve:
            return None
        if _monotonic() >= self._down_until:
            logger.warning(
                "%s: account %s runs on this process's memory until it is back"
                " (fallback='memory'; other processes are not coordinated)",
                exc,
                self.fingerprint,
            )
        self._down_until = _monotonic() + RETRY_AFTER
        self.primary.spent_outside()
        return self.fallback

    def _first(self, on_primary: Callable[[], Ops[T]]) -> Ops[T | _Down]:
        """``on_primary()`` (an operation's first call to Redis), or ``DOWN`` when Redis is
        down and the fallback serves (see the module). ``on_primary`` must raise
        :class:`BalanceUnavailable` only when its first call to Redis fails."""
        if self._degraded() is None:
            try:
                return (yield from on_primary())
            except BalanceUnavailable as exc:
                if self._down(exc) is None:
                    raise
        return DOWN

    def _route(self, on_primary: Callable[[], Ops[T]], on_fallback: Callable[[], Ops[T]]) -> Ops[T]:
        """``on_primary()``, unless Redis is down (see :meth:`_first`): ``on_fallback()``."""
        result = yield from self._first(on_primary)
        if isinstance(result, _Down):
            return (yield from on_fallback())
        return result

    def _side(self, reservation: Reservation) -> RedisAccount | Account:
        """The account that made ``reservation``."""
        return self.primary if isinstance(reservation, RedisReservation) else self.fallback

    # -- admission -----------------------------------------------------------------------

    def try_admit(
        self,
        cost: int,
        ttl: float,
        defer: bool = True,
        keep: int = 0,
        window: Window | None = None,
    ) -> Reservation | None:
        return None  # every admission is a script call: the slow path

    def admit(self, asking: Admission, flight: Flight | None) -> Ops[Reservation | Step]:
        if flight is not None and flight.error is not None:
            raise own_error(flight.error)  # the read this caller waited for failed
        primary = self.primary
        asked = yield from self._first(lambda: primary.ask(asking, flight))
        if not isinstance(asked, _Down):
            return (yield from primary.answer(asked, asking.sync))
        mine = tuple(r for r in asking.enclosing if not isinstance(r, RedisReservation))
        local = dataclasses.replace(asking, enclosing=mine)
        return (yield from self.fallback.admit(local, flight))

    def unchecked(self, cost: int) -> Ops[Reservation]:
        local = self._degraded()
        if local is None:
            try:
                return (yield from self.primary.unchecked(cost))
            except BalanceUnavailable as exc:
                # Failing open with Redis down: counted in this process only.
                local = self._down(exc) or self.fallback
                self.primary.spent_outside()
        return (yield from local.unchecked(cost))

    def forget(self, waiter: Waiter) -> None:
        self.primary.forget(waiter)

    def window_usage(self, window: Window) -> Ops[tuple[int, int]]:
        return self._route(
            lambda: self.primary.window_usage(window), lambda: self.fallback.window_usage(window)
        )

    def flip(self, name: str, low: bool) -> Ops[bool | None]:
        return self._route(
            lambda: self.primary.flip(name, low), lambda: self.fallback.flip(name, low)
        )

    # -- settling: on the side that made the reservation ----------------------------------

    def defer(self, settlement: Reservation) -> Ops[None]:
        return self._side(settlement).defer(settlement)

    def begin(self, settlement: Reservation, sync: bool) -> Ops[Step]:
        return self._side(settlement).begin(settlement, sync)

    def end(self, settlement: Reservation, failed: bool) -> Ops[None]:
        return self._side(settlement).end(settlement, failed)

    def drop(self, reservation: Reservation) -> Ops[None]:
        return self._side(reservation).drop(reservation)

    def reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> Ops[CreditBalance | None]:
        side = self._side(reservation)
        return side.reported(reservation, charged, total_after, balance_after)

    def unreserve(self, reservation: Reservation) -> None:
        self._side(reservation).unreserve(reservation)

    # -- reads ---------------------------------------------------------------------------

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]:
        if flight is not None and flight.error is not None:
            raise own_error(flight.error)  # the read this caller waited for failed
        reads = self.primary.reads
        looked = _monotonic()
        snap = yield from self._first(reads.look)
        if not isinstance(snap, _Down):
            return (yield from reads.read_from(snap, ttl, flight, sync, looked))
        return (yield from self.fallback.read(ttl, flight, sync))

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]:
        known = answered(after, flight)
        if known is not None:
            return known
        reads = self.primary.reads
        looked = _monotonic()
        snap = yield from self._first(reads.look)
        if not isinstance(snap, _Down):
            return (yield from reads.read_after_from(snap, after, sync, looked))
        return (yield from self.fallback.read_after(after, flight, sync))

    def pending(self) -> Ops[int]:
        return self._route(self.primary.pending, self.fallback.pending)

    def committed(self) -> Ops[int]:
        return self._route(self.primary.committed, self.fallback.committed)

    def survey(self) -> Ops[AccountSnapshot]:
        return self._route(self.primary.survey, self.fallback.survey)

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]:
        return self.primary.bumped(sync)

    def record(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> Ops[None]:
        side = self.primary if isinstance(flight, RedisFlight) else self.fallback
        return side.record(flight, result, error)

    def watch(self, flight: Flight) -> Ops[None] | None:
        side = self.primary if isinstance(flight, RedisFlight) else self.fallback
        return side.watch(flight)

    def overdue(self, flight: Flight) -> None:
        self.primary.overdue(flight)

    # -- the gate and holds --------------------------------------------------------------

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        primary = self.primary
        if turn.remote:  # asked for in Redis already: it stays there
            return primary.enter(turn, limit, sync, until)
        return self._route(
            lambda: primary.enter(turn, limit, sync, until),
            lambda: self.fallback.enter(turn, limit, sync, until),
        )

    def leave(self, turn: Turn) -> Ops[None]:
        if turn.left:
            return
        if turn.remote:
            yield from self.primary.leave(turn)
        else:  # taken on the fallback (or never asked for)
            yield from self.fallback.leave(turn)

    def keep(self, reservation: Reservation, expires_in: float, turn: Turn | None) -> Ops[Kept]:
        return self._side(reservation).keep(reservation, expires_in, turn)

    def held(self, hold_id: str) -> Ops[Kept | None]:
        kept = yield from self.fallback.held(hold_id)
        if kept is not None:
            return kept
        return (yield from self.primary.held(hold_id))

    def claim(self, hold_id: str) -> Ops[Kept | None]:
        kept = yield from self.fallback.claim(hold_id)
        if kept is not None:
            return kept
        return (yield from self.primary.claim(hold_id))

    def give_back(self, reservation: Reservation) -> Ops[None]:
        return self._side(reservation).give_back(reservation)

    # -- the rest ------------------------------------------------------------------------

    def block(self, seconds: float) -> None:
        self.primary.block(seconds)

    def blocked(self) -> float | None:
        return self.primary.blocked()

    def invalidate(self) -> None:
        self.fallback.invalidate()
        self.primary.invalidate()

    def snapshot(self) -> tuple[CreditBalance | None, int, int]:
        return self.primary.snapshot()

    def fresh(self, ttl: float) -> bool:
        return False  # no request here: callers that need to know ask Redis through Ops
