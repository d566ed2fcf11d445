"""One account's script calls, as the ``Call``s the guard's drivers perform.

A script call runs on the backend's sync client from threads; from asyncio on the running
loop's ``redis.asyncio`` client (the backend keeps one per loop); from trio, which
``redis.asyncio`` does not support, on the sync client in a worker thread
(``anyio.to_thread``), so an event loop is never blocked by a Redis round trip. Redis
errors become :class:`BalanceUnavailable` naming Redis.

A script call is never cut in two by a cancellation: anyio's shield holds anyio's and
trio's, but not asyncio's own (``asyncio.wait_for``, ``Task.cancel``), so under asyncio the
call runs in a task of its own; a caller cancelled meanwhile waits for it and undoes what
the script did for it (:func:`undo_of`: a reservation, a turn, a read lock) before the
cancellation goes on (:func:`~creditguard.backends.redis.leases.uncut`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from creditguard.backends.redis.gate import Entered, RedisGate
from creditguard.backends.redis.leases import LeaseKeeper, uncut
from creditguard.backends.redis.scripts import Admitted, ReadBegun, RedisAccountState
from creditguard.core.errors import BalanceUnavailable
from creditguard.core.steps import Call

if TYPE_CHECKING:
    from creditguard.backends.redis.clients import AsyncClient, SyncClient

__all__ = ["Link", "ScriptCalls", "unavailable", "undo_of"]


@dataclasses.dataclass(frozen=True)
class Link:
    """What every account of one backend reaches Redis with: the sync ``client``, the
    asyncio client for the running loop (``async_client()``; ``None`` under trio or
    without one), the eviction check made before the first script call (sync and async),
    the errors that mean Redis did not answer, the lease renewer (``leases``), and the
    key ``prefix`` and ``lease`` (seconds and ms) of the backend."""

    client: SyncClient
    async_client: Callable[[], AsyncClient | None]
    check_eviction: Callable[[], None]
    acheck_eviction: Callable[[AsyncClient], Awaitable[None]]
    errors: tuple[type[Exception], ...]
    leases: LeaseKeeper
    prefix: str
    lease: float
    lease_ms: int


def unavailable(exc: Exception) -> BalanceUnavailable:
    """The error a caller sees when Redis did not answer (``exc``)."""
    error = BalanceUnavailable(f"Redis is unavailable ({type(exc).__name__}): {exc}")
    error.__cause__ = exc
    return error


def undo_of(name: str, args: tuple[Any, ...], result: object) -> tuple[str, tuple[Any, ...]] | None:
    """The call that undoes script call ``name(*args)`` that answered ``result``, when
    its caller was cancelled before it saw the answer; ``None``: nothing to undo."""
    if (name == "admit" and isinstance(result, Admitted)) or name == "reserve_unchecked":
        return "release", (args[0], False)  # the reservation: its action never ran
    if name == "read_begin" and isinstance(result, ReadBegun) and result.lead:
        return "read_failed", (args[0],)  # the read lock: nobody reads
    if name == "enter" and result == 0:
        return "leave", (args[0],)  # the turn at the gate
    if name == "enter_admit" and isinstance(result, Entered) and result.ticket == 0:
        # the turn at the gate, and the reservation made with it
        return "undo_enter", (args[0], args[7] if result.gen is not None else "")
    return None


class ScriptCalls:
    """The script calls of one account: those of its state (``scripts``) and of its gate
    and holds (``gate``), on the sync client (``redis``, ``redis_gate``) and on one
    asyncio client per event loop (made when first used)."""

    __slots__ = ("_agates", "_astates", "fingerprint", "link", "redis", "redis_gate")

    def __init__(self, link: Link, fingerprint: str) -> None:
        self.link = link
        self.fingerprint = fingerprint
        self.redis = RedisAccountState(link.client, None, link.prefix, fingerprint, link.lease_ms)
        self.redis_gate = RedisGate(link.client, None, link.prefix, fingerprint)
        self._agates: weakref.WeakKeyDictionary[Any, RedisGate] = weakref.WeakKeyDictionary()
        self._astates: weakref.WeakKeyDictionary[Any, RedisAccountState] = (
            weakref.WeakKeyDictionary()
        )

    def state(self, name: str, *args: Any) -> Call:
        """One call of the account state's scripts (:class:`RedisAccountState`)."""
        return self._call(self.redis, self._async_state, name, args)

    def gate(self, name: str, *args: Any) -> Call:
        """One call of the gate's and holds' scripts (:class:`RedisGate`)."""
        return self._call(self.redis_gate, self._async_gate, name, args)

    def _async_state(self, client: AsyncClient) -> RedisAccountState:
        """The account's scripts on an asyncio client (one per event loop)."""
        state = self._astates.get(client)
        if state is None:
            link = self.link
            state = RedisAccountState(None, client, link.prefix, self.fingerprint, link.lease_ms)
            self._astates[client] = state
        return state

    def _async_gate(self, client: AsyncClient) -> RedisGate:
        """The account's gate and holds scripts on an asyncio client (one per loop)."""
        gate = self._agates.get(client)
        if gate is None:
            gate = self._agates[client] = RedisGate(
                None, client, self.link.prefix, self.fingerprint
            )
        return gate

    def _call(
        self, target: object, async_target: Callable[[Any], object], name: str, args: Any
    ) -> Call:
        link = self.link

        def run() -> object:
            try:
                link.check_eviction()
                return getattr(target, name)(*args)
            except link.errors as exc:
                raise unavailable(exc) from exc

        async def once(op: str, op_args: tuple[Any, ...]) -> object:
            client = link.async_client()
            try:
                if client is None:  # trio, or no asyncio client: the sync one, in a thread
                    sync_op = getattr(target, op)

                    def in_thread() -> object:
                        link.check_eviction()
                        return sync_op(*op_args)

                    return await anyio.to_thread.run_sync(in_thread)
                await link.acheck_eviction(client)
                result: object = await getattr(async_target(client), "a" + op)(*op_args)
                return result
            except link.errors as exc:
                raise unavailable(exc) from exc

        def undo(result: object) -> Awaitable[object] | None:
            call = undo_of(name, args, result)
            return None if call is None else once(*call)

        async def arun() -> object:
            # Uncut: a call cut short by a cancellation (anyio's, trio's or asyncio's own)
            # would leave Redis changed with nobody knowing (a reservation, a turn, a read
            # lock): it finishes, and what it did is undone if its caller is gone. Each
            # call is bounded by the client's socket timeouts.
            return await uncut(lambda: once(name, args), undo)

        return Call(run, arun)
