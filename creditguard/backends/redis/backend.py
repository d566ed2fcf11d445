"""The Redis backend: one account's guard state shared by every process that uses it.

``CreditGuard(..., backend=RedisBackend("redis://127.0.0.1:6379/0"))`` makes guards in any
number of processes (gunicorn or uvicorn workers, Celery workers, pods) admit against the
same cached balance and the same reservations, so two workers cannot both spend the last
credits, and read the balance upstream about once per TTL between them.

The state and its rules live in Redis (:mod:`creditguard.backends.redis.scripts`: one Lua script per
change, so every decision is atomic); this module plugs them into the guard as an
``AccountState``; its reads are in ``_redis_reads``, its gate and holds in ``_redis_holds``.
Reads are shared across processes with a lock in Redis: the process that takes it reads,
the others look again every few milliseconds until its balance is stored (bounded: if the
leader dies its lock expires and another takes over). Waiting is polling, not pub/sub, so
a lost message can never strand a caller.

From sync code the guard uses redis-py's ``redis.Redis``; from asyncio, ``redis.asyncio``
(one client per event loop when built from a URL); from trio, which ``redis.asyncio`` does
not support, the sync client in a worker thread (``anyio.to_thread``), so the event loop is
never blocked by a Redis round trip.

Reservations are leases (``lease`` seconds): a background thread renews the leases of the
calls this process has in flight, so a worker killed mid-action (SIGKILL) strands its
credits for at most ``lease`` seconds, after which the cached balance is distrusted (its
spend is unknown). :meth:`RedisBackend.close` stops that thread. The renewer also records
again the reservations Redis lost (a restart, a flush, an eviction): see ``_redis_leases``.

A script call is never cut in two by a cancellation: anyio's shield holds anyio's and
trio's, but not asyncio's own (``asyncio.wait_for``, ``Task.cancel``), so under asyncio the
call runs in a task of its own; a caller cancelled meanwhile waits for it and undoes what
the script did for it (``_undo``: a reservation, a turn, a read lock) before the
cancellation goes on (``_redis_leases.uncut``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from creditguard.backends.memory import Account
from creditguard.backends.redis.gate import HoldInfo, RedisGate
from creditguard.backends.redis.holds import POLL_MAX, GateOps
from creditguard.backends.redis.leases import (
    LeaseKeeper,
    acheck_eviction,
    check_eviction,
    on_asyncio,
    uncut,
)
from creditguard.backends.redis.reads import ReadOps, _RedisFlight
from creditguard.backends.redis.scripts import (
    DEFAULT_PREFIX,
    Admitted,
    Busy,
    ReadBegun,
    ReadNeeded,
    RedisAccountState,
    Refused,
    WaitNeeded,
    decode_balance,
    encode_balance,
)
from creditguard.core.balance import InsufficientCredits
from creditguard.core.checks import _check_seconds
from creditguard.core.errors import AdmissionTimeout, BalanceUnavailable
from creditguard.core.models import CreditBalance
from creditguard.core.settling import MAX_SETTLING, after_report
from creditguard.core.steps import Call, Flight, Ops, Reservation, Step, Waiter, own_error

if TYPE_CHECKING:
    import redis as redis_py
    import redis.asyncio as redis_asyncio

__all__ = ["RedisBackend"]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic

# The longest a caller waits before it looks at Redis again while calls in flight
# elsewhere settle (it looks at once when a spend of this process settles).
_POLL_MAX = POLL_MAX
# After Redis failed, how long the fallback serves before Redis is tried again.
_RETRY_AFTER = 1.0
# Clients made from a URL: every Redis round trip is bounded, and so are the connections
# one process opens (a caller beyond them waits its turn, at most ``timeout`` seconds).
_TIMEOUTS: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
_POOL: dict[str, Any] = {"max_connections": 64, "timeout": 30.0, **_TIMEOUTS}


class _RedisReservation(Reservation):
    """A reservation held in Redis, by its id."""

    __slots__ = ("id",)

    def __init__(self, cost: int, balance: CreditBalance | None, gen: int, rid: str) -> None:
        super().__init__(cost, balance, gen)
        self.id = rid


class _LookAgain(Waiter):
    """Decide again after a short wait: calls in flight (maybe elsewhere) may settle."""

    __slots__ = ()


def _undo(name: str, args: tuple[Any, ...], result: object) -> tuple[str, tuple[Any, ...]] | None:
    """The call that undoes script call ``name(*args)`` that answered ``result``, when
    its caller was cancelled before it saw the answer; ``None``: nothing to undo."""
    if (name == "admit" and isinstance(result, Admitted)) or name == "reserve_unchecked":
        return "release", (args[0], False)  # the reservation: its action never ran
    if name == "read_begin" and isinstance(result, ReadBegun) and result.lead:
        return "read_failed", (args[0],)  # the read lock: nobody reads
    if name == "enter" and result == 0:
        return "leave", (args[0],)  # the turn at the gate
    return None


def _unavailable(exc: Exception) -> BalanceUnavailable:
    error = BalanceUnavailable(f"Redis is unavailable ({type(exc).__name__}): {exc}")
    error.__cause__ = exc
    return error


class RedisAccount(GateOps, ReadOps):
    """The guard state of one account, in Redis (see the module's docstring); its reads
    are in ``_redis_reads``, its gate and holds operations in ``_redis_holds``."""

    def __init__(self, backend: RedisBackend, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.lock = threading.Lock()  # local waits only
        self.released_at = 0.0
        self._backend = backend
        self._redis = RedisAccountState(
            backend._client, None, backend.prefix, fingerprint, backend._lease_ms
        )
        self._flights: list[_RedisFlight] = []  # reads this process leads, oldest first
        # The last read of this process that came back with a balance: a caller whose
        # look at Redis raced with storing it uses it instead of reading again.
        self._last: _RedisFlight | None = None
        # Calls of this process waiting at admission (they look again at Redis every few
        # milliseconds, and at once when a spend of this process settles).
        self.waiters: list[Waiter] = []
        self._blocked_until = 0.0
        self._deferred = 0  # spends finished here since this process's last read
        self._stale: list[str] = []  # read locks of abandoned reads, to give up
        # This process spent outside Redis (unchecked, or on the fallback) since Redis
        # was last reachable: distrust its cached balance when it is back.
        self._outside = False
        self._decoded: tuple[str, CreditBalance] | None = None
        # The balance the last admission was sent, by its tag in Redis (``Admitted.tag``):
        # admissions on the same one are answered without it.
        self._known: tuple[str, CreditBalance] | None = None
        self._local: Account | None = None  # fallback="memory", while Redis is down
        self._down_until = 0.0
        self._gate = RedisGate(backend._client, None, backend.prefix, fingerprint)
        self._agates: weakref.WeakKeyDictionary[Any, RedisGate] = weakref.WeakKeyDictionary()
        self._astates: weakref.WeakKeyDictionary[Any, RedisAccountState] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"<RedisAccount {self.fingerprint}>"

    def _decode(self, text: str) -> CreditBalance:
        """The balance stored as ``text``; the last one decoded is kept (a balance is
        immutable, and most admissions in a TTL see the same one)."""
        last = self._decoded
        if last is not None and last[0] == text:
            return last[1]
        balance = decode_balance(text)
        self._decoded = (text, balance)
        return balance

    def _wake_waiters(self) -> None:
        """A spend of this process settled (or finished): its waiters look again now."""
        with self.lock:
            waiters, self.waiters = self.waiters, []
            callbacks = [notify for waiter in waiters for notify in waiter._finish()]
        for notify in callbacks:
            notify()

    # -- the I/O edge ------------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> Call:
        """One script call, as a ``Call`` for the guard's driver; Redis errors become
        :class:`BalanceUnavailable` naming Redis."""
        return self._script_call(self._redis, self._async_state, name, args)

    def _gate_call(self, name: str, *args: Any) -> Call:
        """One call of the gate's and holds' scripts (``_redis_gate``), as :meth:`_call`."""
        return self._script_call(self._gate, self._async_gate, name, args)

    def _script_call(
        self, target: object, async_target: Callable[[Any], object], name: str, args: Any
    ) -> Call:
        backend = self._backend

        def run() -> object:
            try:
                backend._check_eviction()
                return getattr(target, name)(*args)
            except backend._errors as exc:
                raise _unavailable(exc) from exc

        async def once(op: str, op_args: tuple[Any, ...]) -> object:
            client = backend._async_client_here()
            try:
                if client is None:  # trio, or no asyncio client: the sync one, in a thread
                    sync_op = getattr(target, op)

                    def in_thread() -> object:
                        backend._check_eviction()
                        return sync_op(*op_args)

                    return await anyio.to_thread.run_sync(in_thread)
                await backend._acheck_eviction(client)
                result: object = await getattr(async_target(client), "a" + op)(*op_args)
                return result
            except backend._errors as exc:
                raise _unavailable(exc) from exc

        def undo(result: object) -> Awaitable[object] | None:
            call = _undo(name, args, result)
            return None if call is None else once(*call)

        async def arun() -> object:
            # Uncut: a call cut short by a cancellation (anyio's, trio's or asyncio's own)
            # would leave Redis changed with nobody knowing (a reservation, a turn, a read
            # lock): it finishes, and what it did is undone if its caller is gone. Each
            # call is bounded by the client's socket timeouts.
            return await uncut(lambda: once(name, args), undo)

        return Call(run, arun)

    def _async_gate(self, client: redis_asyncio.Redis) -> RedisGate:
        """The account's gate and holds scripts on an asyncio client (one per loop)."""
        gate = self._agates.get(client)
        if gate is None:
            gate = self._agates[client] = RedisGate(
                None, client, self._backend.prefix, self.fingerprint
            )
        return gate

    def _encode(self, balance: CreditBalance) -> str:
        return encode_balance(balance)[0]

    def _reservation(self, info: HoldInfo, hold_id: str) -> Reservation:
        """A hold's reservation, as this process settles it."""
        balance = self._decode(info.balance) if info.balance else None
        return _RedisReservation(info.cost, balance, info.gen, hold_id)

    def _async_state(self, client: redis_asyncio.Redis) -> RedisAccountState:
        """The account's scripts on an asyncio client (one per event loop)."""
        state = self._astates.get(client)
        if state is None:
            backend = self._backend
            state = RedisAccountState(
                None, client, backend.prefix, self.fingerprint, backend._lease_ms
            )
            self._astates[client] = state
        return state

    def _fallback(self, exc: BalanceUnavailable) -> Account | None:
        """Redis failed: the local account to use instead (``fallback="memory"``), if any."""
        if self._backend.fallback != "memory":
            return None
        if _monotonic() >= self._down_until:
            logger.warning(
                "%s: account %s runs on this process's memory until it is back"
                " (fallback='memory'; other processes are not coordinated)",
                exc,
                self.fingerprint,
            )
        self._down_until = _monotonic() + _RETRY_AFTER
        self._outside = True
        return self._local_account()

    def _rejoin(self) -> Ops[None]:
        """Back on Redis after spending outside it (fail-open or fallback calls while it
        was unreachable): its cached balance cannot include those spends, so it is
        distrusted first. Raises :class:`BalanceUnavailable` if Redis is still down."""
        if self._outside:
            yield self._call("invalidate")
            self._outside = False

    def _degraded(self) -> Account | None:
        """The local account while Redis was seen down a moment ago (fallback only)."""
        if self._local is not None and _monotonic() < self._down_until:
            return self._local
        return None

    # -- admission -----------------------------------------------------------------------

    def try_admit(self, cost: int, ttl: float, defer: bool = True) -> Reservation | None:
        return None  # every admission is a script call: the slow path

    def admit(
        self,
        cost: int,
        ttl: float,
        flight: Flight | None,
        sync: bool,
        until: float | None,
        enclosing: tuple[Reservation, ...],
        settle: bool,
    ) -> Ops[Reservation | Step]:
        if flight is not None and flight.error is not None:
            raise own_error(flight.error)  # the read this caller waited for failed
        local = self._degraded()
        if local is not None:
            mine = tuple(r for r in enclosing if not isinstance(r, _RedisReservation))
            return (yield from local.admit(cost, ttl, flight, sync, until, mine, settle))
        rid = os.urandom(12).hex()
        may_wait = until is not None and _monotonic() < until
        own = [r.id for r in enclosing if isinstance(r, _RedisReservation)] if enclosing else ()
        waited_for = None
        if flight is not None and flight.result is not None and flight.start_seq >= 0:
            waited_for = flight.start_seq
        ttl_ms = int(ttl * 1000)
        known = self._known
        looked = _monotonic()
        try:
            if self._outside:
                yield from self._rejoin()
            answer = yield self._call(
                "admit",
                rid,
                cost,
                ttl_ms,
                settle,
                may_wait,
                own,
                waited_for,
                "" if known is None else known[0],
            )
        except BalanceUnavailable as exc:
            local = self._fallback(exc)
            if local is None:
                raise
            mine = tuple(r for r in enclosing if not isinstance(r, _RedisReservation))
            return (yield from local.admit(cost, ttl, flight, sync, until, mine, settle))
        if isinstance(answer, Admitted):
            if answer.balance is None:  # admitted on the balance this process knows
                assert known is not None
                balance = known[1]
            else:
                balance = self._decode(answer.balance)
                if answer.tag:
                    self._known = (answer.tag, balance)
            reservation = _RedisReservation(cost, balance, answer.gen, rid)
            self._backend._hold(self._redis, rid, cost)
            return reservation
        if isinstance(answer, ReadNeeded):
            return (yield from self._need_read(answer.after, sync, looked))
        if isinstance(answer, Refused):
            balance = self._decode(answer.balance)
            raise InsufficientCredits(cost, answer.available, balance, reserved=answer.reserved)
        if isinstance(answer, Busy):
            raise AdmissionTimeout(cost, answer.available, reserved=answer.reserved)
        # Wait: calls in flight, maybe in other processes, may settle. Look again soon.
        assert until is not None
        assert isinstance(answer, WaitNeeded)
        waiter = _LookAgain(cost, answer.own)
        with self.lock:
            self.waiters.append(waiter)
        return waiter, False, min(until, _monotonic() + _POLL_MAX)

    def unchecked(self, cost: int) -> Ops[Reservation]:
        local = self._degraded()
        if local is not None:
            return (yield from local.unchecked(cost))
        rid = os.urandom(12).hex()
        try:
            yield self._call("reserve_unchecked", rid, cost)
        except BalanceUnavailable as exc:
            # Failing open with Redis down: counted in this process only.
            local = self._fallback(exc) or self._local_account()
            self._outside = True
            return (yield from local.unchecked(cost))
        self._backend._hold(self._redis, rid, cost)
        return _RedisReservation(cost, None, -1, rid)

    def forget(self, waiter: Waiter) -> None:
        """A waiter looked again (its pause ended) or gave up: drop it."""
        with self.lock:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    # -- settling ------------------------------------------------------------------------

    def _settle_call(self, reservation: Reservation, name: str, *args: Any) -> Ops[object]:
        """A settling call: it runs after the action, so a Redis failure must not hide
        the action's result. Logged; the lease then expires, and with it the trust in
        the cached balance (the spend is unknown)."""
        if not isinstance(reservation, _RedisReservation):
            return None
        self._backend._release(reservation.id)
        try:
            done = yield self._call(name, reservation.id, *args)
        except BalanceUnavailable as exc:
            logger.warning(
                "could not settle a spend of %d credits in Redis (%s): its lease expires"
                " in at most %.0fs, then the cached balance is distrusted",
                reservation.cost,
                exc,
                self._backend.lease,
            )
            return None
        if self.waiters:
            self._wake_waiters()
        return done

    def _local_account(self) -> Account:
        if self._local is None:
            self._local = Account(self.fingerprint)
        return self._local

    def _local_for(self, reservation: Reservation) -> Account | None:
        """The local account that holds ``reservation`` (not one in Redis), if any."""
        if isinstance(reservation, _RedisReservation):
            return None
        return self._local_account()

    def defer(self, settlement: Reservation) -> Ops[None]:
        local = self._local_for(settlement)
        if local is not None:
            return (yield from local.defer(settlement))
        yield from self._settle_call(settlement, "finish")
        # Finished spends wait in Redis for a read, and the scripts that settle them look
        # at each: past MAX_SETTLING of this process's since its last read, distrust the
        # cached balance, so that the next call (in any process) reads and settles them.
        with self.lock:
            self._deferred += 1
            full = self._deferred >= MAX_SETTLING
            if full:
                self._deferred = 0
        if full:
            with contextlib.suppress(BalanceUnavailable):
                yield self._call("invalidate")

    def begin(self, settlement: Reservation, sync: bool) -> Ops[Step]:
        local = self._local_for(settlement)
        if local is not None:
            return (yield from local.begin(settlement, sync))
        after = yield from self._settle_call(settlement, "finish")
        if not isinstance(after, int) or after <= 0:
            # Redis failed or the lease expired: read on our own, stored if Redis lets us.
            flight = _RedisFlight(0, sync, None)
            return flight, True, None
        settlement.after = after
        try:
            return (yield from self._need_read(after, sync))
        except BalanceUnavailable:
            return _RedisFlight(after, sync, None), True, None

    def end(self, settlement: Reservation, failed: bool) -> Ops[None]:
        local = self._local_for(settlement)
        if local is not None:
            return (yield from local.end(settlement, failed))
        # A read that started after the action released it; a failed refresh distrusts.
        if failed:
            yield from self._settle_call(settlement, "release", True)
        elif not settlement.released:
            yield from self._settle_call(settlement, "release", False)
        settlement.released = True

    def drop(self, reservation: Reservation) -> Ops[None]:
        local = self._local_for(reservation)
        if local is not None:
            return (yield from local.drop(reservation))
        yield from self._settle_call(reservation, "release", True)
        reservation.released = True

    def reported(
        self,
        reservation: Reservation,
        charged: int | None,
        total_after: int | None,
        balance_after: CreditBalance | None,
    ) -> Ops[CreditBalance | None]:
        local = self._local_for(reservation)
        if local is not None:
            return (yield from local.reported(reservation, charged, total_after, balance_after))
        before = reservation.balance
        if charged == 0:
            yield from self._settle_call(reservation, "release", False)
            reservation.released = True
            return before
        if before is None:
            return None
        after = after_report(before, charged, total_after, balance_after)
        if after is None:
            return None
        text, total = encode_balance(after)
        done = yield from self._settle_call(
            reservation, "settle_alone", reservation.gen, text, total
        )
        if done:
            reservation.released = True
            return after
        assert isinstance(reservation, _RedisReservation)
        # still held: settle with a read
        self._backend._hold(self._redis, reservation.id, reservation.cost)
        return None

    def unreserve(self, reservation: Reservation) -> None:
        local = self._local_for(reservation)
        if local is not None:
            local.unreserve(reservation)
            return
        assert isinstance(reservation, _RedisReservation)
        self._backend._release(reservation.id)
        try:
            self._redis.release(reservation.id, False)
        except self._backend._errors as exc:  # the lease expires on its own
            logger.warning("could not give back a reservation in Redis: %s", exc)
        reservation.released = True

    # -- the rest ------------------------------------------------------------------------

    def block(self, seconds: float) -> None:
        until = _monotonic() + seconds
        if until > self._blocked_until:
            self._blocked_until = until

    def blocked(self) -> float | None:
        left = self._blocked_until - _monotonic()
        return left if left > 0 else None

    def invalidate(self) -> None:
        if self._local is not None:
            self._local.invalidate()
        try:
            self._redis.invalidate()
        except self._backend._errors as exc:
            raise _unavailable(exc) from exc

    def snapshot(self) -> tuple[CreditBalance | None, int, int]:
        try:
            snap = self._redis.state()
        except self._backend._errors as exc:
            raise _unavailable(exc) from exc
        balance = None if snap.balance is None else self._decode(snap.balance)
        return balance, snap.reserved, snap.inflight

    def fresh(self, ttl: float) -> bool:
        return False  # no request here: callers that need to know ask Redis through Ops


async def _closer(
    client: redis_asyncio.Redis, owner: weakref.ref[RedisBackend], loop: object
) -> AsyncGenerator[None, None]:
    """Closes ``client`` (and its pool) when the event loop it was made for shuts down,
    and forgets it: advanced once inside that loop, the loop's async-generator hooks
    finalize it then."""
    try:
        yield
    finally:
        backend = owner()
        if backend is not None:
            backend._loop_clients.pop(loop, None)  # type: ignore[call-overload]
            backend._closers.pop(loop, None)  # type: ignore[call-overload]
        with contextlib.suppress(Exception):  # a connection already broken
            await client.aclose(close_connection_pool=True)


class RedisBackend(LeaseKeeper):
    """Account state in Redis (or Valkey), shared by every process that uses the same
    server and ``prefix``.

    ``url`` defaults to ``CREDITGUARD_REDIS_URL``. Or pass ``client`` (a ``redis.Redis``,
    including one from a Sentinel, or a ``redis.cluster.RedisCluster``) and, for asyncio,
    ``async_client`` (``redis.asyncio``; without it, one is made per event loop from
    ``url``, or the sync client runs in a worker thread). ``lease`` (seconds, above 0.1
    and at most ``MAX_SECONDS``) is how long a call's reservation outlives its process.
    The first script call asks Redis for its ``maxmemory-policy`` first and logs a warning
    unless it is ``noeviction`` (an evicting Redis may drop the guard's
    keys; see "Running many workers"). ``fallback="memory"``: while Redis is
    unreachable, keep this process running on state of its own (logged; processes are
    then not coordinated); by default the guard's ``on_unavailable`` policy applies, with
    a :class:`~creditguard.BalanceUnavailable` that names Redis.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis_py.Redis | None = None,
        async_client: redis_asyncio.Redis | None = None,
        prefix: str = DEFAULT_PREFIX,
        lease: float = 60.0,
        fallback: Literal["memory"] | None = None,
    ) -> None:
        try:
            import redis as redis_py
            import redis.asyncio
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ImportError(
                "RedisBackend needs redis-py: pip install 'creditguard[redis]'"
            ) from exc
        if url is None and client is None:
            url = os.environ.get("CREDITGUARD_REDIS_URL")
            if not url:
                raise ValueError("RedisBackend needs a url, a client, or CREDITGUARD_REDIS_URL")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix must not contain '{{' or '}}' (got {prefix!r}): every key of an"
                " account carries its fingerprint as the hash tag, so that Redis Cluster"
                " keeps them in one slot"
            )
        lease = _check_seconds("lease", lease, positive=True)
        if not lease > 0.1:
            raise ValueError(f"lease must be a number of seconds above 0.1, got {lease!r}")
        if fallback not in (None, "memory"):
            raise ValueError(f"fallback must be None or 'memory', got {fallback!r}")
        super().__init__()
        self.prefix = prefix
        self.lease = float(lease)
        self.fallback = fallback
        self._lease_ms = int(lease * 1000)
        self._url = url
        self._own_client = client is None
        self._client = (
            client
            if client is not None
            else redis_py.Redis(
                connection_pool=redis_py.BlockingConnectionPool.from_url(str(url), **_POOL)
            )
        )
        self._async_client = async_client
        self._closers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncGenerator[None, None]
        ] = weakref.WeakKeyDictionary()
        self._loop_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis_asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        self._errors: tuple[type[Exception], ...] = (redis_py.RedisError, OSError)
        self._accounts: weakref.WeakValueDictionary[str, RedisAccount] = (
            weakref.WeakValueDictionary()
        )
        # Redis's eviction policy, asked once, before the first script call (on the same
        # connection: see check_eviction).
        self.eviction_checked = threading.Event()
        self._eviction_asked = False

    def __repr__(self) -> str:
        return f"<RedisBackend prefix={self.prefix!r} lease={self.lease:g}>"

    def account(self, fingerprint: str) -> RedisAccount:
        """The state of the account ``fingerprint`` (kept in Redis)."""
        with self._lock:
            account = self._accounts.get(fingerprint)
            if account is None:
                account = self._accounts[fingerprint] = RedisAccount(self, fingerprint)
            return account

    def _ask_eviction(self) -> bool:
        """Whether the caller asks Redis for its eviction policy now (the first call)."""
        if self._eviction_asked:
            return False
        with self._lock:
            first, self._eviction_asked = not self._eviction_asked, True
        return first

    def _check_eviction(self) -> None:
        if self._ask_eviction():
            try:
                check_eviction(self._client)
            finally:
                self.eviction_checked.set()

    async def _acheck_eviction(self, client: redis_asyncio.Redis) -> None:
        if self._ask_eviction():
            try:
                await acheck_eviction(client)
            finally:
                self.eviction_checked.set()

    def _async_client_here(self) -> redis_asyncio.Redis | None:
        """The asyncio client for the running loop, or ``None`` under trio."""
        if not on_asyncio():
            return None
        if self._async_client is not None:
            return self._async_client
        if self._url is None:
            return None
        loop = asyncio.get_running_loop()
        client = self._loop_clients.get(loop)
        if client is None:
            import redis.asyncio

            pool = redis.asyncio.BlockingConnectionPool.from_url(self._url, **_POOL)
            client = redis.asyncio.Redis(connection_pool=pool)
            self._loop_clients[loop] = client
            # Closed by its loop when the loop shuts down (asyncio.run, anyio.run: they
            # finalize the async generators still alive), so its sockets never outlive it.
            closer = _closer(client, weakref.ref(self), loop)
            with contextlib.suppress(StopIteration):
                closer.asend(None).send(None)
            self._closers[loop] = closer
        return client

    def close(self) -> None:
        """Stop renewing leases and close the sync client (asyncio clients: see
        :meth:`aclose`)."""
        self._stop.set()
        renewer = self._renewer
        if renewer is not None:
            renewer.join(5)
        self._close_sync()

    def _close_sync(self) -> None:
        self._client.close()
        if self._own_client:  # a pool it made: its connections too
            self._client.connection_pool.disconnect()

    async def aclose(self) -> None:
        """:meth:`close`, and close the running loop's asyncio client."""
        self._stop.set()
        renewer = self._renewer
        if renewer is not None:
            await anyio.to_thread.run_sync(renewer.join, 5)
        if on_asyncio():
            loop = asyncio.get_running_loop()
            client = self._loop_clients.pop(loop, None)
            closer = self._closers.pop(loop, None)
            if closer is not None:
                await closer.aclose()  # closes the client
            elif client is not None:
                await client.aclose(close_connection_pool=True)
        self._close_sync()
