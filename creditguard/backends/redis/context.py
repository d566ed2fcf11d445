"""What the parts of one Redis account (:mod:`.account`, :mod:`.reads`, :mod:`.holds`)
share: its script calls, and what this process keeps of it between calls (its lock, the
callers waiting, the last balance decoded), with the few steps they all take (decoding a
balance, waking the callers waiting, a settling call that never hides an action's result,
distrusting the cached balance after spending outside Redis).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from creditguard.backends.redis.calls import Link, ScriptCalls
from creditguard.backends.redis.gate import HoldInfo
from creditguard.backends.redis.scripts import decode_balance, encode_balance
from creditguard.core.errors import BalanceUnavailable
from creditguard.core.models import CreditBalance
from creditguard.core.steps import Call, Ops, Reservation, Turn, Waiter, pause

__all__ = [
    "POLL_FIRST",
    "POLL_MAX",
    "AccountContext",
    "RedisReservation",
    "charged_of",
    "item_of",
]

logger = logging.getLogger("creditguard")

# How long a caller waits between two looks at Redis (another process reads the balance,
# calls in flight elsewhere settle, a turn at the gate): short first, then longer; it
# looks at once when something of this process it waits for happens.
POLL_FIRST = 0.002
POLL_MAX = 0.02
# At most how long telling Redis of this process's finished spends waits for another
# caller that is telling it of some (one script call; past this, they may settle at a
# later read, as if they had finished later).
TELL_WAIT = 0.25

_monotonic = time.monotonic


class RedisReservation(Reservation):
    """A reservation held in Redis, by its id."""

    __slots__ = ("id",)

    def __init__(self, cost: int, balance: CreditBalance | None, gen: int, rid: str) -> None:
        super().__init__(cost, balance, gen)
        self.id = rid


def item_of(reservation: RedisReservation) -> str:
    """How a finished spend is told to Redis: its id, with what its call was charged
    (``id=charged``) when that is known (for its subject's window; else its cost)."""
    charge = reservation.charge
    return reservation.id if charge is None else f"{reservation.id}={charge}"


def charged_of(reservation: Reservation) -> int:
    """What the call of ``reservation`` was charged: what it reported, else its cost."""
    return reservation.cost if reservation.charge is None else reservation.charge


class AccountContext:
    """One account's script calls and this process's state of it (see the module)."""

    __slots__ = (
        "_decoded",
        "calls",
        "deferred",
        "fingerprint",
        "link",
        "lock",
        "outside",
        "turns",
        "waiters",
    )

    def __init__(self, link: Link, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.link = link
        self.calls = ScriptCalls(link, fingerprint)
        self.lock = threading.Lock()  # local waits only
        # Calls of this process waiting at admission or for a turn (they look again at
        # Redis every few milliseconds, and at once when a spend or a turn of this
        # process is given back).
        self.waiters: list[Waiter] = []
        # Turns of this process that wait in the gate's queue, by token: a turn given
        # back here goes to one of them without a round trip of its own.
        self.turns: dict[str, Turn] = {}
        self.deferred = 0  # spends finished here since this process's last read
        # This process spent outside Redis (unchecked, or on a fallback) since Redis was
        # last reachable: distrust its cached balance when it is back.
        self.outside = False
        self._decoded: tuple[str, CreditBalance] | None = None

    def call(self, name: str, *args: Any) -> Call:
        """One call of the account state's scripts."""
        return self.calls.state(name, *args)

    def gate_call(self, name: str, *args: Any) -> Call:
        """One call of the gate's and holds' scripts."""
        return self.calls.gate(name, *args)

    def decode(self, text: str) -> CreditBalance:
        """The balance stored as ``text``; the last one decoded is kept (a balance is
        immutable, and most admissions in a TTL see the same one)."""
        last = self._decoded
        if last is not None and last[0] == text:
            return last[1]
        balance = decode_balance(text)
        self._decoded = (text, balance)
        return balance

    def encode(self, balance: CreditBalance) -> str:
        return encode_balance(balance)[0]

    def reservation(self, info: HoldInfo, hold_id: str) -> RedisReservation:
        """A hold's reservation, as this process settles it."""
        balance = self.decode(info.balance) if info.balance else None
        return RedisReservation(info.cost, balance, info.gen, hold_id)

    def wake_waiters(self) -> None:
        """A spend of this process settled (or finished): its waiters look again now."""
        with self.lock:
            waiters, self.waiters = self.waiters, []
            callbacks = [notify for waiter in waiters for notify in waiter._finish()]
        for notify in callbacks:
            notify()

    def rejoin(self) -> Ops[None]:
        """Back on Redis after spending outside it (fail-open or fallback calls while it
        was unreachable): its cached balance cannot include those spends, so it is
        distrusted first. Raises :class:`BalanceUnavailable` if Redis is still down."""
        if self.outside:
            yield self.call("invalidate")
            self.outside = False

    def tell_finished(self) -> Ops[None]:
        """Tell Redis now of this process's spends that finished and that no admission
        carried yet (see ``RedisAccount.defer``): before a look that must see them (a
        balance that includes every finished call, a survey). Raises
        :class:`BalanceUnavailable` when Redis does not answer (they are told later)."""
        state = self.calls.redis
        leases = self.link.leases
        finished = leases._take_finished(state)
        if finished:
            try:
                yield self.call("finish", *finished)
            except BaseException:
                leases._put_back(state, finished)
                raise
            finally:
                leases._told(state, finished)
        # Another caller (the renewer, an admission) may be telling Redis of others right
        # now: until its call is done, a look or a read starting next might not see them
        # finished (a read would then not settle them). Wait for it, briefly.
        if leases._being_told(state):
            until = _monotonic() + TELL_WAIT
            while leases._being_told(state) and _monotonic() < until:
                yield pause(POLL_FIRST)

    def settle_call(self, reservation: Reservation, name: str, *args: Any) -> Ops[object]:
        """A settling call: it runs after the action, so a Redis failure must not hide
        the action's result. Logged; the lease then expires, and with it the trust in
        the cached balance (the spend is unknown)."""
        if not isinstance(reservation, RedisReservation):
            return None
        self.link.leases._release(reservation.id)
        first = item_of(reservation) if name == "finish" else reservation.id
        try:
            done = yield self.call(name, first, *args)
        except BalanceUnavailable as exc:
            logger.warning(
                "could not settle a spend of %d credits in Redis (%s): its lease expires"
                " in at most %.0fs, then the cached balance is distrusted",
                reservation.cost,
                exc,
                self.link.lease,
            )
            return None
        if self.waiters:
            self.wake_waiters()
        return done
