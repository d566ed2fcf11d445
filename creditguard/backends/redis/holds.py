"""The gate and holds of a Redis account (:class:`GateAndHolds`): the ``AccountState``
operations ``leave``, ``keep``, ``held``, ``claim`` and ``give_back`` over the scripts of
:mod:`.gate`, and what ``enter`` (:mod:`.account`: one script that may also admit) does
with the turn it asked for.

A turn given back goes at once, in the same script, to the first caller queued (in the
order callers first asked): when that caller waits in this process it is told at once,
with no round trip of its own; a caller of another process takes it at its next look. A
caller without a turn looks at Redis again after a short pause (2 ms, growing to 20 ms).
"""

from __future__ import annotations

import logging
import time

from creditguard.backends.redis.context import (
    POLL_FIRST,
    POLL_MAX,
    AccountContext,
    RedisReservation,
)
from creditguard.backends.redis.gate import HoldInfo
from creditguard.core.errors import BalanceUnavailable
from creditguard.core.steps import Kept, Ops, Reservation, Step, Turn

__all__ = ["ALIVE_MS", "GateAndHolds"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic

# A waiter in the queue that has not looked for this long (its process died) loses its
# place; live waiters look at least every POLL_MAX (the pauses between looks).
ALIVE_MS = 5_000


class GateAndHolds:
    """The gate and holds of one Redis account (see the module)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: AccountContext) -> None:
        self.ctx = ctx

    # -- the gate ------------------------------------------------------------------------

    def granted(self, turn: Turn) -> None:
        """Redis gave ``turn`` its turn: its lease is renewed until it is given back."""
        ctx = self.ctx
        turn.granted = True
        with ctx.lock:
            ctx.turns.pop(turn.token, None)
        ctx.link.leases._keep_turn(ctx.calls.redis_gate, turn.token)

    def wait(self, turn: Turn, until: float) -> bool | Step:
        """``turn`` stands in the queue: wait until a turn of this process is handed to
        it, or until its next look (``True``: it was handed one meanwhile)."""
        ctx = self.ctx
        turn.looks += 1
        pause = min(POLL_MAX, POLL_FIRST * (2 ** min(turn.looks, 8)))
        with ctx.lock:
            if turn.granted:
                return True
            ctx.turns[turn.token] = turn
        return Step(turn, False, min(until, _monotonic() + pause))

    def leave(self, turn: Turn) -> Ops[None]:
        """Give back ``turn``, taken in Redis (``turn.remote``), once; the caller of this
        process it goes to, if any, is told at once."""
        ctx = self.ctx
        with ctx.lock:
            if turn.left:
                return
            turn.left = True
            ctx.turns.pop(turn.token, None)
            waiting = list(ctx.turns)
        leases = ctx.link.leases
        leases._drop_turn(turn.token)
        try:
            handed = yield ctx.gate_call(
                "leave", turn.token, turn.limit, ctx.link.lease_ms, waiting
            )
        except BalanceUnavailable as exc:
            logger.warning(
                "could not give back a turn in Redis (%s): it expires with its lease", exc
            )
            return
        if not isinstance(handed, str) or not handed:
            return
        callbacks = []
        with ctx.lock:
            mine = ctx.turns.pop(handed, None)
            if mine is not None and not mine.left:
                mine.granted = True
                leases._keep_turn(ctx.calls.redis_gate, handed)
                callbacks = mine._finish()
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
