"""The gate and holds of a Redis account (:class:`GateAndHolds`): the ``AccountState``
operations ``enter``, ``leave``, ``keep``, ``held``, ``claim`` and ``give_back`` over the
scripts of :mod:`.gate`.

A caller without a turn looks at Redis again after a short pause (2 ms, growing to 20 ms),
and at once when a turn of this process is given back: turns are handed out by Redis, in
the order callers first asked, to whichever process looks next.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from creditguard.backends.redis.context import (
    POLL_FIRST,
    POLL_MAX,
    AccountContext,
    RedisReservation,
)
from creditguard.backends.redis.gate import HoldInfo
from creditguard.core.errors import BalanceUnavailable
from creditguard.core.steps import Kept, Ops, Reservation, Step, Turn, Waiter

__all__ = ["GateAndHolds"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic

# A waiter in the queue that has not looked for this long (its process died) loses its
# place; live waiters look at least every POLL_MAX (the pauses between looks).
_ALIVE_MS = 5_000


class _TurnWaiter(Waiter):
    """A caller waiting for a turn: it looks at Redis again when this ends. Its ``cost``
    is its ticket in the queue."""

    __slots__ = ()


class GateAndHolds:
    """The gate and holds of one Redis account (see the module)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: AccountContext) -> None:
        self.ctx = ctx

    # -- the gate ------------------------------------------------------------------------

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        ctx = self.ctx
        link = ctx.link
        got = yield ctx.gate_call("enter", turn.token, limit, link.lease_ms, _ALIVE_MS)
        turn.remote = True
        if got == 0:
            turn.granted = True
            link.leases._keep_turn(ctx.calls.redis_gate, turn.token)
            return True
        turn.looks += 1
        pause = min(POLL_MAX, POLL_FIRST * (2 ** min(turn.looks, 8)))
        waiter = _TurnWaiter(cast(int, got), 0)  # its ticket: the lowest is next
        with ctx.lock:
            ctx.waiters.append(waiter)
        return Step(waiter, False, min(until, _monotonic() + pause))

    def leave(self, turn: Turn) -> Ops[None]:
        """Give back ``turn``, taken in Redis (``turn.remote``), once."""
        if turn.left:
            return
        turn.left = True
        ctx = self.ctx
        ctx.link.leases._drop_turn(turn.token)
        try:
            yield ctx.gate_call("leave", turn.token)
        except BalanceUnavailable as exc:
            logger.warning(
                "could not give back a turn in Redis (%s): it expires with its lease", exc
            )
        self._wake_next()

    def _wake_next(self) -> None:
        """A turn of this process was given back: the caller of this process that waits
        for one with the lowest ticket looks at Redis now (the others keep to their
        pauses, rather than all asking for the one turn at once)."""
        ctx = self.ctx
        with ctx.lock:
            waiting = [w for w in ctx.waiters if isinstance(w, _TurnWaiter) and not w.done]
            if not waiting:
                return
            first = min(waiting, key=lambda w: w.cost)
            ctx.waiters.remove(first)
            callbacks = first._finish()
        for notify in callbacks:
            notify()

    def queued(self) -> int:
        """How many callers wait for a turn (for tests and metrics)."""
        return self.ctx.calls.redis_gate.queued()

    # -- holds ---------------------------------------------------------------------------

    def keep(
        self, reservation: RedisReservation, expires_in: float, turn: Turn | None
    ) -> Ops[Kept]:
        ctx = self.ctx
        rid = reservation.id
        leases = ctx.link.leases
        token = turn.token if turn is not None and turn.remote and not turn.left else ""
        balance = "" if reservation.balance is None else ctx.encode(reservation.balance)
        ms = max(1, int(expires_in * 1000))
        cost, gen = reservation.cost, reservation.gen
        due = yield ctx.gate_call("keep", rid, ms, cost, gen, balance, token)
        if not isinstance(due, int):
            raise BalanceUnavailable(
                "the reservation's lease in Redis expired before the hold was kept"
            )
        # The hold's lease (and its turn) now live as long as the hold: no renewing.
        leases._release(rid)
        if token:
            leases._drop_turn(token)
        return Kept(rid, reservation, due / 1000, turn)

    def find_hold(self, hold_id: str, claim: bool) -> Ops[Kept | None]:
        """The open hold ``hold_id`` in Redis (``claim``: ended, its reservation an
        ordinary one again until its caller settles it); ``None``: not open."""
        ctx = self.ctx
        link = ctx.link
        info = yield ctx.gate_call("hold", hold_id, claim, link.lease_ms)
        if not isinstance(info, HoldInfo):
            return None
        reservation = ctx.reservation(info, hold_id)
        if claim:  # an ordinary reservation again, until its caller settles it
            link.leases._hold(ctx.calls.redis, hold_id, info.cost)
        return Kept(hold_id, reservation, info.expires_ms / 1000, None)

    def held(self, hold_id: str) -> Ops[Kept | None]:
        return (yield from self.find_hold(hold_id, False))

    def claim(self, hold_id: str) -> Ops[Kept | None]:
        return (yield from self.find_hold(hold_id, True))

    def give_back(self, reservation: Reservation) -> Ops[None]:
        yield from self.ctx.settle_call(reservation, "release", False)
        reservation.released = True
