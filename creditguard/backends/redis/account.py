"""One account's guard state in Redis, as the guard drives it: :class:`RedisAccount`, the
``AccountState`` of the Redis backend.

The state and its rules live in Redis (:mod:`.scripts`: one Lua script per change, so
every decision is atomic). This module admits calls and settles their spends; the balance
reads are :mod:`.reads`'s, the gate and holds :mod:`.holds`'s; what the three share (the
script calls, this process's lock and waiters) is an :class:`~.context.AccountContext`.
Reservations are leases that the backend's renewer keeps alive (:mod:`.leases`).

Every operation needs Redis: when it does not answer, the operation raises
:class:`BalanceUnavailable` naming Redis (``fallback="memory"`` is a wrapper around this
account: :mod:`.fallback`). Admission starts with one script call (:meth:`RedisAccount.ask`)
and decides on its answer (:meth:`RedisAccount.answer`), so a caller may decide elsewhere
when that call fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import NamedTuple, cast

from creditguard.backends.redis.answers import OverAllowance
from creditguard.backends.redis.calls import Link, unavailable
from creditguard.backends.redis.context import (
    POLL_MAX,
    AccountContext,
    RedisReservation,
    charged_of,
    item_of,
)
from creditguard.backends.redis.gate import Entered, Unpayable
from creditguard.backends.redis.holds import ALIVE_MS, GateAndHolds
from creditguard.backends.redis.reads import Reads, RedisFlight
from creditguard.backends.redis.scripts import (
    Admitted,
    Busy,
    ReadNeeded,
    Refused,
    WaitNeeded,
    encode_balance,
)
from creditguard.backends.redis.side import window_spec
from creditguard.core.balance import AllowanceExceeded, InsufficientCredits
from creditguard.core.errors import AdmissionTimeout, BalanceUnavailable
from creditguard.core.models import AccountSnapshot, CreditBalance
from creditguard.core.settling import MAX_SETTLING, after_report
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

__all__ = ["Asked", "RedisAccount"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic


class _LookAgain(Waiter):
    """Decide again after a short wait: calls in flight (maybe elsewhere) may settle."""

    __slots__ = ()


class Asked(NamedTuple):
    """An admission asked of Redis (:meth:`RedisAccount.ask`): its ``answer``, and what
    deciding on it needs (the reservation's id, the balance named as known, when Redis was
    asked, the caller's deadline)."""

    answer: object
    rid: str
    cost: int
    known: tuple[str, CreditBalance] | None
    looked: float
    until: float | None
    asking: Admission


class RedisAccount:
    """The guard state of one account, in Redis (see the module's docstring)."""

    def __init__(self, link: Link, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.ctx = ctx = AccountContext(link, fingerprint)
        self.lock = ctx.lock  # local waits only
        self.released_at = 0.0
        self.reads = Reads(ctx)
        self.gate = GateAndHolds(ctx)
        # The balance the last admission was sent, by its tag in Redis (``Admitted.tag``):
        # admissions on the same one are answered without it.
        self._known: tuple[str, CreditBalance] | None = None
        self._blocked_until = 0.0

    def __repr__(self) -> str:
        return f"<RedisAccount {self.fingerprint}>"

    @property
    def flights(self) -> list[RedisFlight]:
        """The reads this process's callers share, oldest first."""
        return self.reads.flights

    @property
    def waiters(self) -> list[Waiter]:
        """This process's callers waiting at admission or for a turn."""
        return self.ctx.waiters

    def owns(self, reservation: Reservation) -> bool:
        """Whether ``reservation`` is held in Redis (made by this account)."""
        return isinstance(reservation, RedisReservation)

    def spent_outside(self) -> None:
        """This process spent outside Redis while it was unreachable: its cached balance
        is distrusted when it is back."""
        self.ctx.outside = True

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
        asked = yield from self.ask(asking, flight)
        return (yield from self.answer(asked, asking.sync))

    def ask(self, asking: Admission, flight: Flight | None) -> Ops[Asked]:
        """The first step of :meth:`admit`: ask Redis (raises :class:`BalanceUnavailable`
        when it does not answer; nothing is reserved then)."""
        cost, until, enclosing = asking.cost, asking.until, asking.enclosing
        ctx = self.ctx
        rid = os.urandom(12).hex()
        may_wait = until is not None and _monotonic() < until
        own = [r.id for r in enclosing if isinstance(r, RedisReservation)] if enclosing else ()
        waited_for = None
        if flight is not None and flight.result is not None and flight.start_seq >= 0:
            waited_for = flight.start_seq
        ttl_ms = int(asking.ttl * 1000)
        known = self._known
        looked = _monotonic()
        if ctx.outside:
            yield from ctx.rejoin()
        # The spends of this process that finished since it last told Redis travel with
        # this call: Redis marks them finished before it decides (see :meth:`defer`).
        state = ctx.calls.redis
        leases = ctx.link.leases
        finished = leases._take_finished(state)
        try:
            answer = yield ctx.call(
                "admit",
                rid,
                cost,
                ttl_ms,
                asking.settle,
                may_wait,
                own,
                waited_for,
                "" if known is None else known[0],
                finished,
                asking.keep,
                "" if asking.window is None else window_spec(asking.window),
            )
        except BaseException:
            leases._put_back(state, finished)  # it may not have reached Redis
            raise
        finally:
            leases._told(state, finished)
        return Asked(answer, rid, cost, known, looked, until, asking)

    def answer(self, asked: Asked, sync: bool) -> Ops[Reservation | Step]:
        """The rest of :meth:`admit`: the reservation Redis made, or what to do first."""
        answer, cost = asked.answer, asked.cost
        if isinstance(answer, Admitted):
            if answer.balance is None:  # admitted on the balance this process knows
                known = asked.known
                assert known is not None
                balance = known[1]
            else:
                balance = self.ctx.decode(answer.balance)
                if answer.tag:
                    self._known = (answer.tag, balance)
            reservation = RedisReservation(cost, balance, answer.gen, asked.rid)
            reservation.window = asked.asking.window
            reservation.warned = answer.warned
            self.ctx.link.leases._hold(self.ctx.calls.redis, asked.rid, cost)
            return reservation
        if isinstance(answer, ReadNeeded):
            return (yield from self.reads.need_read(answer.after, sync, asked.looked))
        if isinstance(answer, Refused):
            balance = self.ctx.decode(answer.balance)
            keep = asked.asking.keep
            raise InsufficientCredits(
                cost, answer.available, balance, reserved=answer.reserved, keep=keep
            )
        if isinstance(answer, OverAllowance):
            window = asked.asking.window
            assert window is not None
            raise AllowanceExceeded(
                cost,
                subject=window.subject,
                limit=window.limit,
                spent=answer.spent,
                resets_at=window.resets_at,
                reserved=answer.reserved,
            )
        if isinstance(answer, Busy):
            raise AdmissionTimeout(cost, answer.available, reserved=answer.reserved)
        # Wait: calls in flight, maybe in other processes, may settle. Look again soon.
        until = asked.until
        assert until is not None
        assert isinstance(answer, WaitNeeded)
        waiter = _LookAgain(cost, answer.own)
        with self.lock:
            self.ctx.waiters.append(waiter)
        return Step(waiter, False, min(until, _monotonic() + POLL_MAX))

    def unchecked(self, cost: int) -> Ops[Reservation]:
        rid = os.urandom(12).hex()
        yield self.ctx.call("reserve_unchecked", rid, cost)
        self.ctx.link.leases._hold(self.ctx.calls.redis, rid, cost)
        return RedisReservation(cost, None, -1, rid)

    def forget(self, waiter: Waiter) -> None:
        """A waiter looked again (its pause ended) or gave up: drop it."""
        with self.lock:
            if waiter in self.ctx.waiters:
                self.ctx.waiters.remove(waiter)

    # -- settling ------------------------------------------------------------------------

    def defer(self, settlement: Reservation) -> Ops[None]:
        ctx = self.ctx
        if not isinstance(settlement, RedisReservation):
            return
        # No round trip of its own: Redis learns that the spend finished from this
        # process's next admission on the account (or from the renewer, within
        # FLUSH_AFTER, or when the backend closes). Until then it counts in Redis as in
        # flight: no admission anywhere counts its credits as free, no read settles it,
        # and if this process dies first, its lease expires like any call's in flight.
        ctx.link.leases._finished_later(ctx.calls.redis, settlement.id, item_of(settlement))
        if ctx.waiters:
            ctx.wake_waiters()  # they look again now, and tell Redis
        # Finished spends wait in Redis for a read, and the scripts that settle them look
        # at each: past MAX_SETTLING of this process's since its last read, distrust the
        # cached balance, so that the next call (in any process) reads and settles them.
        with self.lock:
            ctx.deferred += 1
            full = ctx.deferred >= MAX_SETTLING
            if full:
                ctx.deferred = 0
        if full:
            with contextlib.suppress(BalanceUnavailable):
                yield from ctx.tell_finished()
                yield ctx.call("invalidate")

    def begin(self, settlement: Reservation, sync: bool) -> Ops[Step]:
        after = yield from self.ctx.settle_call(settlement, "finish")
        if not isinstance(after, int) or after <= 0:
            # Redis failed or the lease expired: read on our own, stored if Redis lets us.
            flight = RedisFlight(0, sync, None)
            return Step(flight, True, None)
        settlement.after = after
        try:
            return (yield from self.reads.need_read(after, sync))
        except BalanceUnavailable:
            return Step(RedisFlight(after, sync, None), True, None)

    def end(self, settlement: Reservation, failed: bool) -> Ops[None]:
        # A read that started after the action released it; a failed refresh distrusts.
        charged = charged_of(settlement)
        if failed:
            yield from self.ctx.settle_call(settlement, "release", True, charged)
        elif not settlement.released:
            yield from self.ctx.settle_call(settlement, "release", False, charged)
        settlement.released = True

    def drop(self, reservation: Reservation) -> Ops[None]:
        yield from self.ctx.settle_call(reservation, "release", True, 0)
        reservation.released = True

    def reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> Ops[CreditBalance | None]:
        ctx = self.ctx
        before = reservation.balance
        if charged == 0:
            yield from ctx.settle_call(reservation, "release", False)
            reservation.released = True
            return before
        if before is None:
            return None
        after = after_report(before, charged, total_after, balance_after)
        if after is None:
            return None
        text, total = encode_balance(after)
        done = yield from ctx.settle_call(
            reservation, "settle_alone", reservation.gen, text, total, charged_of(reservation)
        )
        if done:
            reservation.released = True
            return after
        assert isinstance(reservation, RedisReservation)
        # still held: settle with a read
        ctx.link.leases._hold(ctx.calls.redis, reservation.id, reservation.cost)
        return None

    def unreserve(self, reservation: Reservation) -> None:
        assert isinstance(reservation, RedisReservation)
        link = self.ctx.link
        link.leases._release(reservation.id)
        try:
            self.ctx.calls.redis.release(reservation.id, False)
        except link.errors as exc:  # the lease expires on its own
            logger.warning("could not give back a reservation in Redis: %s", exc)
        reservation.released = True

    def window_usage(self, window: Window) -> Ops[tuple[int, int]]:
        # This process's finished spends first: what they were charged is in the figures.
        yield from self.ctx.tell_finished()
        books = yield self.ctx.call("window", window)
        return cast("tuple[int, int]", books)

    def flip(self, name: str, low: bool) -> Ops[bool | None]:
        before = yield self.ctx.call("flip", name, low)
        return cast("bool | None", before)

    # -- reads (:mod:`.reads`) -----------------------------------------------------------

    def read(self, ttl: float, flight: Flight | None, sync: bool) -> Ops[CreditBalance | Step]:
        return self.reads.read(ttl, flight, sync)

    def read_after(
        self, after: int, flight: Flight | None, sync: bool
    ) -> Ops[CreditBalance | Step]:
        return self.reads.read_after(after, flight, sync)

    def pending(self) -> Ops[int]:
        return self.reads.pending()

    def committed(self) -> Ops[int]:
        return self.reads.committed()

    def survey(self) -> Ops[AccountSnapshot]:
        return self.reads.survey()

    def bumped(self, sync: bool) -> Ops[tuple[int, Step]]:
        return self.reads.bumped(sync)

    def record(
        self, flight: Flight, result: CreditBalance | None, error: BaseException | None
    ) -> Ops[None]:
        if isinstance(flight, RedisFlight):
            yield from self.reads.record(flight, result, error)

    def watch(self, flight: Flight) -> Ops[None] | None:
        return self.reads.watch(flight)

    def overdue(self, flight: Flight) -> None:
        self.reads.overdue(flight)

    # -- the gate and holds (:mod:`.holds`) ----------------------------------------------

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        """One script: refuse a caller new at the gate that the account cannot pay
        (``turn.check``; ``False`` when that takes a read), take a turn or stand in the
        queue, and with the turn admit the call when the cached balance covers it
        (``turn.admit``). A turn handed over by a leave of this process needs no call."""
        gate = self.gate
        if turn.granted:
            return True
        turn.limit = limit  # a turn given back goes on to the next only within it
        ctx = self.ctx
        link = ctx.link
        asking = turn.asking
        check = turn.check and asking is not None
        admit = turn.admit and asking is not None
        if (check or admit) and ctx.outside:
            yield from ctx.rejoin()
        cost = ttl_ms = 0
        rid = ""
        own: list[str] = []
        known = self._known
        finished: list[str] = []
        if asking is not None:
            cost, ttl_ms = asking.cost, int(asking.ttl * 1000)
            own = [r.id for r in asking.enclosing if isinstance(r, RedisReservation)]
        if admit:
            rid = os.urandom(12).hex()
            finished = link.leases._take_finished(ctx.calls.redis)
        tag = "" if known is None or not admit else known[0]
        try:
            got = yield ctx.gate_call(
                "enter_admit",
                turn.token,
                limit,
                link.lease_ms,
                ALIVE_MS,
                check,
                cost,
                ttl_ms,
                rid,
                tag,
                finished,
                own,
            )
        except BaseException:
            link.leases._put_back(ctx.calls.redis, finished)  # it may not have reached Redis
            raise
        # Refused, or asked to check first: not queued (nothing to give back in Redis).
        if isinstance(got, Unpayable):
            balance = ctx.decode(got.balance)
            raise InsufficientCredits(cost, got.available, balance, reserved=got.held)
        if not isinstance(got, Entered):  # CHECK_FIRST: no balance to tell without a read
            return False
        turn.remote = True
        if got.ticket:
            return gate.wait(turn, until)
        gate.granted(turn)
        if got.gen is not None:
            if got.balance is None:  # admitted on the balance this process knows
                assert known is not None
                balance = known[1]
            else:
                balance = ctx.decode(got.balance)
                if got.tag:
                    self._known = (got.tag, balance)
            turn.admitted = RedisReservation(cost, balance, got.gen, rid)
            link.leases._hold(ctx.calls.redis, rid, cost)
        return True

    def leave(self, turn: Turn) -> Ops[None]:
        if turn.remote:
            yield from self.gate.leave(turn)
        else:  # never taken in Redis: nothing to give back there
            turn.left = True

    def keep(self, reservation: Reservation, expires_in: float, turn: Turn | None) -> Ops[Kept]:
        assert isinstance(reservation, RedisReservation)
        return self.gate.keep(reservation, expires_in, turn)

    def held(self, hold_id: str) -> Ops[Kept | None]:
        return self.gate.held(hold_id)

    def claim(self, hold_id: str) -> Ops[Kept | None]:
        return self.gate.claim(hold_id)

    def give_back(self, reservation: Reservation) -> Ops[None]:
        return self.gate.give_back(reservation)

    def queued(self) -> int:
        """How many callers wait for a turn (for tests and metrics)."""
        return self.gate.queued()

    # -- the rest ------------------------------------------------------------------------

    def block(self, seconds: float) -> None:
        until = _monotonic() + seconds
        if until > self._blocked_until:
            self._blocked_until = until

    def blocked(self) -> float | None:
        left = self._blocked_until - _monotonic()
        return left if left > 0 else None

    def invalidate(self) -> None:
        link = self.ctx.link
        try:
            self.ctx.calls.redis.invalidate()
        except link.errors as exc:
            raise unavailable(exc) from exc

    def snapshot(self) -> tuple[CreditBalance | None, int, int]:
        link = self.ctx.link
        try:
            snap = self.ctx.calls.redis.state()
        except link.errors as exc:
            raise unavailable(exc) from exc
        balance = None if snap.balance is None else self.ctx.decode(snap.balance)
        return balance, snap.reserved, snap.inflight

    def fresh(self, ttl: float) -> bool:
        return False  # no request here: callers that need to know ask Redis through Ops
