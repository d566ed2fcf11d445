"""The gate and holds of a ``RedisAccount`` (``redis.py``): the ``AccountState`` operations
``enter``, ``leave``, ``keep``, ``held``, ``claim`` and ``give_back`` over the scripts of
``_redis_gate``, with the memory fallback while Redis is down (``fallback="memory"``).

A caller without a turn looks at Redis again after a short pause (2 ms, growing to 20 ms),
and at once when a turn of this process is given back: turns are handed out by Redis, in
the order callers first asked, to whichever process looks next.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from creditguard.backends.redis.gate import HoldInfo
from creditguard.core.errors import BalanceUnavailable
from creditguard.core.steps import Kept, Ops, Reservation, Step, Turn, Waiter

if TYPE_CHECKING:
    from creditguard.backends.memory import Account
    from creditguard.backends.redis.backend import RedisAccount

__all__ = ["POLL_FIRST", "POLL_MAX", "GateOps"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic

# A waiter in the queue that has not looked for this long (its process died) loses its
# place; live waiters look at least every POLL_MAX (``redis.py``'s pauses between looks).
_ALIVE_MS = 5_000
POLL_FIRST = 0.002
POLL_MAX = 0.02


class _TurnWaiter(Waiter):
    """A caller waiting for a turn: it looks at Redis again when this ends. Its ``cost``
    is its ticket in the queue."""

    __slots__ = ()


class GateOps:
    """The gate and holds operations of :class:`~.backend.RedisAccount` (a
    base class of it)."""

    __slots__ = ()

    if TYPE_CHECKING:
        _local: Account | None

        def _gate_call(self, name: str, *args: Any) -> Any: ...
        def _degraded(self) -> Account | None: ...
        def _fallback(self, exc: BalanceUnavailable) -> Account | None: ...
        def _local_account(self) -> Account: ...
        def _wake_waiters(self) -> None: ...
        def _settle_call(self, reservation: Reservation, name: str, *args: Any) -> Ops[object]: ...
        def _reservation(self, info: HoldInfo, hold_id: str) -> Reservation: ...

    def _me(self) -> RedisAccount:
        return self  # type: ignore[return-value]

    # -- the gate ------------------------------------------------------------------------

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        me = self._me()
        local = None if turn.remote else self._degraded()
        if local is not None:
            return (yield from local.enter(turn, limit, sync, until))
        backend = me._backend
        try:
            got = yield self._gate_call("enter", turn.token, limit, backend._lease_ms, _ALIVE_MS)
        except BalanceUnavailable as exc:
            local = None if turn.remote else self._fallback(exc)
            if local is None:
                raise
            return (yield from local.enter(turn, limit, sync, until))
        turn.remote = True
        if got == 0:
            turn.granted = True
            backend._keep_turn(me._gate, turn.token)
            return True
        turn.looks += 1
        pause = min(POLL_MAX, POLL_FIRST * (2 ** min(turn.looks, 8)))
        waiter = _TurnWaiter(cast(int, got), 0)  # its ticket: the lowest is next
        with me.lock:
            me.waiters.append(waiter)
        return waiter, False, min(until, _monotonic() + pause)

    def leave(self, turn: Turn) -> Ops[None]:
        if turn.left:
            return
        if not turn.remote:  # taken on the fallback (or never asked for)
            yield from self._local_account().leave(turn)
            return
        turn.left = True
        me = self._me()
        me._backend._drop_turn(turn.token)
        try:
            yield self._gate_call("leave", turn.token)
        except BalanceUnavailable as exc:
            logger.warning(
                "could not give back a turn in Redis (%s): it expires with its lease", exc
            )
        self._wake_next()

    def _wake_next(self) -> None:
        """A turn of this process was given back: the caller of this process that waits
        for one with the lowest ticket looks at Redis now (the others keep to their
        pauses, rather than all asking for the one turn at once)."""
        me = self._me()
        with me.lock:
            waiting = [w for w in me.waiters if isinstance(w, _TurnWaiter) and not w.done]
            if not waiting:
                return
            first = min(waiting, key=lambda w: w.cost)
            me.waiters.remove(first)
            callbacks = first._finish()
        for notify in callbacks:
            notify()

    def queued(self) -> int:
        """How many callers wait for a turn (for tests and metrics)."""
        return self._me()._gate.queued()

    # -- holds ---------------------------------------------------------------------------

    def keep(self, reservation: Reservation, expires_in: float, turn: Turn | None) -> Ops[Kept]:
        rid = getattr(reservation, "id", None)
        if rid is None:  # a reservation on the fallback: the hold lives there too
            return (yield from self._local_account().keep(reservation, expires_in, turn))
        me = self._me()
        backend = me._backend
        token = turn.token if turn is not None and turn.remote and not turn.left else ""
        balance = "" if reservation.balance is None else me._encode(reservation.balance)
        ms = max(1, int(expires_in * 1000))
        due = yield self._gate_call(
            "keep", rid, ms, reservation.cost, reservation.gen, balance, token
        )
        if not isinstance(due, int):
            raise BalanceUnavailable(
                "the reservation's lease in Redis expired before the hold was kept"
            )
        # The hold's lease (and its turn) now live as long as the hold: no renewing.
        backend._release(rid)
        if token:
            backend._drop_turn(token)
        return Kept(rid, reservation, due / 1000, turn)

    def _find_hold(self, hold_id: str, claim: bool) -> Ops[Kept | None]:
        local = self._local
        if local is not None:
            kept = yield from (local.claim(hold_id) if claim else local.held(hold_id))
            if kept is not None:
                return kept
        me = self._me()
        info = yield self._gate_call("hold", hold_id, claim, me._backend._lease_ms)
        if not isinstance(info, HoldInfo):
            return None
        reservation = self._reservation(info, hold_id)
        if claim:  # an ordinary reservation again, until its caller settles it
            me._backend._hold(me._redis, hold_id, info.cost)
        return Kept(hold_id, reservation, info.expires_ms / 1000, None)

    def held(self, hold_id: str) -> Ops[Kept | None]:
        return (yield from self._find_hold(hold_id, False))

    def claim(self, hold_id: str) -> Ops[Kept | None]:
        return (yield from self._find_hold(hold_id, True))

    def give_back(self, reservation: Reservation) -> Ops[None]:
        if getattr(reservation, "id", None) is None:
            return (yield from self._local_account().give_back(reservation))
        yield from self._settle_call(reservation, "release", False)
        reservation.released = True
