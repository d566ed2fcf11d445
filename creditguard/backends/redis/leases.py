"""What keeps the Redis backend's books whole whatever happens to the process or to Redis:
the lease renewer (``LeaseKeeper``, a base class of ``RedisBackend``), the script calls
that no cancellation can cut in two (:func:`uncut`), and the start-up check of Redis's
eviction policy (:func:`check_eviction`).

Leases. A background thread renews, every third of a lease (and at least every
``CHECK_EVERY`` seconds), the leases of the reservations this process has in flight and of
the gate turns it has. A renewal never
shortens a lease (a hold's, set by the hold, may be longer). When Redis no longer has a
reservation this process still has in flight (Redis restarted without persistence, was
flushed, or evicted the account's keys), the renewal records it again and distrusts the
cached balance: books that lost what is in flight never admit for long. The thread
never dies of an exception: it logs it and goes on.

Cancellation. A script call may reach Redis whatever cancels its caller. anyio's shield
holds anyio's cancellations (``move_on_after``, a cancelled task group, and all of trio's),
but not asyncio's own (``asyncio.wait_for``, ``Task.cancel``). So under asyncio the call
runs in a task of its own that the caller's cancellation does not reach: when the caller
is cancelled, it waits for that task to finish and undoes what the script did (a
reservation taken, a turn at the gate, a read lock) before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

if TYPE_CHECKING:
    from creditguard.backends.redis.clients import AsyncClient, SyncClient
    from creditguard.backends.redis.gate import RedisGate
    from creditguard.backends.redis.scripts import RedisAccountState

__all__ = ["LeaseKeeper", "acheck_eviction", "check_eviction", "on_asyncio", "uncut"]

logger = logging.getLogger("creditguard")
T = TypeVar("T")

# The longest the renewer goes without looking at Redis while this process has calls in
# flight: Redis may have lost them (a restart, a flush), and until they are recorded again
# other processes admit on books without them.
CHECK_EVERY = 1.0
# The longest a spend that finished here waits to be told to Redis by this process's next
# admission on its account (which carries it, with no round trip of its own): past it,
# the renewer tells Redis itself. Until Redis knows, the spend counts as in flight.
FLUSH_AFTER = 0.005
_monotonic = time.monotonic


def on_asyncio() -> bool:
    """Whether the running task is asyncio's (not trio's, nor a thread without a loop).
    Trio is looked for first (a trio run may be hosted by an asyncio loop)."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_FAILED: Any = object()


async def _outlast(task: asyncio.Future[T]) -> T:
    """Wait for ``task`` to finish, whatever cancels the waiter meanwhile; its result,
    or ``_FAILED`` when it raised."""
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task})
    if task.cancelled() or task.exception() is not None:
        return _FAILED  # type: ignore[no-any-return]
    return task.result()


async def uncut(
    run: Callable[[], Awaitable[T]], undo: Callable[[T], Awaitable[object] | None] | None
) -> T:
    """``await run()`` so that no cancellation of the caller cuts it in two: under trio
    (and for anyio's cancellations) in a shielded scope; under asyncio in a task of its
    own. Cancelled by asyncio, the caller waits for that task, then for ``undo(result)``
    (an awaitable, or ``None``: nothing to undo), and is cancelled then."""
    if not on_asyncio():
        with anyio.CancelScope(shield=True):
            return await run()
    task = asyncio.ensure_future(run())
    try:
        with anyio.CancelScope(shield=True):
            return await asyncio.shield(task)
    except asyncio.CancelledError:
        result = await _outlast(task)
        if undo is not None and result is not _FAILED:
            undone = undo(result)
            if undone is not None:
                await _outlast(asyncio.ensure_future(undone))
        raise
    raise AssertionError("unreachable")  # pragma: no cover - for type checkers


def check_eviction(client: SyncClient) -> str | None:
    """Warn when Redis may evict the guard's keys: a ``maxmemory-policy`` other than
    ``noeviction`` (the guard's keys carry expiries, so ``volatile-*`` policies may evict
    them too). Returns the policy, or ``None`` when it cannot be asked (``CONFIG`` is
    often not permitted on managed Redis: logged at debug level)."""
    try:
        answer = client.config_get("maxmemory-policy")
    except Exception as exc:
        return _policy(None, exc)
    return _policy(answer, None)


async def acheck_eviction(client: AsyncClient) -> str | None:
    """Async :func:`check_eviction`."""
    try:
        answer = await client.config_get("maxmemory-policy")
    except Exception as exc:
        return _policy(None, exc)
    return _policy(answer, None)


def _policy(answer: object, error: Exception | None) -> str | None:
    if error is not None:
        logger.debug("could not ask Redis for its maxmemory-policy: %s", error)
        return None
    policy = answer.get("maxmemory-policy") if isinstance(answer, dict) else None
    if isinstance(policy, bytes):
        policy = policy.decode()
    if not isinstance(policy, str):
        return None
    if policy != "noeviction":
        logger.warning(
            "Redis has maxmemory-policy %r: when it is full it may evict the guard's keys"
            " (reservations in flight, holds, the cached balance), and then admit on books"
            " that lost them until they are restored; use 'noeviction' (see the docs:"
            " 'Running many workers')",
            policy,
        )
    return policy


# The lease keepers of this process, told when it forks (see :func:`_after_fork`).
_keepers: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: each lease keeper starts empty. The reservations, gate turns
    and finished spends it held are the parent's, which goes on renewing and telling
    them; a child that took them for its own would renew them after the parent ended
    them, and record again in Redis a finished spend it found missing (credits reserved
    for as long as the child lives)."""
    for keeper in list(_keepers):
        LeaseKeeper.__init__(keeper)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class LeaseKeeper:
    """The lease renewer of a ``RedisBackend`` (a base class of it)."""

    lease: float
    _lease_ms: int
    _errors: tuple[type[Exception], ...]

    def __init__(self) -> None:
        _keepers.add(self)
        self._lock = threading.Lock()
        # Reservations in flight in this process (id -> its account's scripts and its
        # cost), whose leases the renewer keeps alive, and the gate turns taken here.
        self._held: dict[str, tuple[RedisAccountState, int]] = {}
        self._turns: dict[str, RedisGate] = {}
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        # Spends that finished here and that Redis does not know of yet, by account (see
        # :meth:`_finished_later`), with when each account's list was started.
        self._finished: dict[RedisAccountState, list[str]] = {}
        self._finished_since: dict[RedisAccountState, float] = {}
        self._deferrals = 0  # how many spends were deferred, ever (the renewer's cue)
        # How many lists of them callers took and are telling Redis of, by account: a
        # caller that must see them all in Redis waits for those (:meth:`_being_told`).
        self._telling: dict[RedisAccountState, int] = {}
        self._wake = threading.Condition(self._lock)
        self._armed = False  # the renewer looks every FLUSH_AFTER (finished spends wait)

    def _keep_turn(self, gate: RedisGate, token: str) -> None:
        with self._lock:
            self._turns[token] = gate
            self._start_renewer()

    def _drop_turn(self, token: str) -> None:
        with self._lock:
            self._turns.pop(token, None)

    def _hold(self, state: RedisAccountState, rid: str, cost: int) -> None:
        with self._lock:
            self._held[rid] = (state, cost)
            self._start_renewer()

    def _release(self, rid: str) -> None:
        with self._lock:
            self._held.pop(rid, None)

    def _finished_later(self, state: RedisAccountState, rid: str, item: str | None = None) -> None:
        """The spend ``rid`` finished: its lease is no longer renewed (as once Redis knows
        it finished), and Redis learns it finished with this process's next admission
        on the account, or from the renewer within ``FLUSH_AFTER`` seconds, or when the
        backend closes. Until then Redis counts it as in flight, lease and all: a process
        that dies meanwhile strands nothing past the lease. ``item`` is how it is told
        (``id=charged``: see ``state.lua``); its id by default."""
        told = rid if item is None else item
        with self._lock:
            self._held.pop(rid, None)
            waiting = self._finished.get(state)
            if waiting is None:
                self._finished[state] = [told]
                self._finished_since[state] = _monotonic()
            else:
                waiting.append(told)
            self._deferrals += 1
            if not self._armed:
                self._armed = True
                self._start_renewer()
                self._wake.notify()

    def _take_finished(self, state: RedisAccountState) -> list[str]:
        """The finished spends of ``state``'s account Redis does not know of yet, taken
        by a caller that tells Redis (it gives them back with :meth:`_put_back` if it
        could not, and calls :meth:`_told` once its call is over, whatever its end)."""
        if not self._finished:
            return []
        with self._lock:
            self._finished_since.pop(state, None)
            rids = self._finished.pop(state, [])
            if rids:
                self._telling[state] = self._telling.get(state, 0) + 1
            return rids

    def _told(self, state: RedisAccountState, rids: list[str]) -> None:
        """The caller that took ``rids`` (:meth:`_take_finished`) is done telling Redis
        of them (told, or given back)."""
        if not rids:
            return
        with self._lock:
            left = self._telling.get(state, 0) - 1
            if left > 0:
                self._telling[state] = left
            else:
                self._telling.pop(state, None)

    def _being_told(self, state: RedisAccountState) -> bool:
        """Whether a caller (an admission, the renewer) is telling Redis right now of
        spends of ``state``'s account that finished here."""
        return state in self._telling

    def _put_back(self, state: RedisAccountState, rids: list[str], later: float = 0.0) -> None:
        """Redis may not have learnt that ``rids`` finished: tell it again (the renewer
        does, ``later`` seconds after it would have; telling it twice only makes their
        settling wait for a later read)."""
        if not rids:
            return
        with self._lock:
            waiting = self._finished.setdefault(state, [])
            waiting[:0] = rids
            self._finished_since.setdefault(state, _monotonic() + later)
            self._armed = True
            self._start_renewer()
            self._wake.notify()

    def flush_finished(self, due_only: bool = False) -> None:
        """Tell Redis of the spends that finished here (``due_only``: those that have
        waited ``FLUSH_AFTER`` for an admission to carry them): one script call per
        account. What it cannot tell stays to be told."""
        due = _monotonic() - FLUSH_AFTER
        with self._lock:
            states = [
                state
                for state, since in self._finished_since.items()
                if not due_only or since <= due
            ]
        for state in states:
            rids = self._take_finished(state)
            if not rids:
                continue
            try:
                state.finish(*rids)
            except self._errors as exc:
                logger.warning("could not tell Redis that spends finished: %s", exc)
                self._put_back(state, rids, CHECK_EVERY)
                return
            finally:
                self._told(state, rids)

    def _start_renewer(self) -> None:
        """Under the lock: make sure the renewer runs."""
        if self._renewer is None or not self._renewer.is_alive():
            self._stop.clear()
            self._renewer = threading.Thread(
                target=self._renew, name="creditguard-redis-leases", daemon=True
            )
            self._renewer.start()

    def _renew(self) -> None:
        """Every third of a lease (at least every ``CHECK_EVERY`` seconds),
        :meth:`renew_once`, until nothing is held here; meanwhile, every ``FLUSH_AFTER``
        while spends finish here, tell Redis of those no admission carried. Stopped, it
        tells Redis of them all."""
        period = min(self.lease / 3, CHECK_EVERY)
        renew_at = _monotonic() + period
        seen = -1
        try:
            while not self._stop.is_set():
                with self._lock:
                    if self._armed and seen == self._deferrals and not self._finished:
                        self._armed = False  # nothing deferred since the last look
                    seen = self._deferrals
                    wait = renew_at - _monotonic()
                    if self._armed:
                        wait = min(wait, FLUSH_AFTER)
                    if wait > 0 and not self._stop.is_set():
                        self._wake.wait(wait)
                if self._stop.is_set():
                    return
                try:
                    self.flush_finished(due_only=True)
                    if _monotonic() >= renew_at:
                        renew_at = _monotonic() + period
                        if not self.renew_once():
                            return
                except Exception:  # never dies: the next round may succeed
                    logger.exception("the Redis lease renewer failed; it goes on")
        finally:
            try:
                self.flush_finished()
            except Exception:
                logger.exception("the Redis lease renewer failed to flush finished spends")

    def stop_renewing(self, timeout: float = 5) -> None:
        """Stop the renewer (waiting at most ``timeout`` seconds for it) and tell Redis of
        every spend that finished here (what a closing backend does)."""
        with self._lock:
            self._stop.set()
            self._wake.notify_all()
            renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout)
        self.flush_finished()

    def renew_once(self) -> bool:
        """Renew the leases of the reservations in flight here (recording again those
        Redis lost) and of the gate turns taken here. ``False``: nothing is held here
        (the renewer then stops)."""
        with self._lock:
            held: dict[RedisAccountState, list[tuple[str, int]]] = {}
            for rid, (state, cost) in self._held.items():
                held.setdefault(state, []).append((rid, cost))
            turns: dict[RedisGate, list[str]] = {}
            for token, gate in self._turns.items():
                turns.setdefault(gate, []).append(token)
            if not held and not turns and not self._finished and not self._armed:
                if self._renewer is threading.current_thread():
                    self._renewer = None
                return False
        for state, pairs in held.items():
            try:
                restored = state.restore(pairs)
            except self._errors as exc:
                logger.warning("could not renew leases in Redis: %s", exc)
                continue
            if restored:
                self._restored(state, restored)
        for gate, tokens in turns.items():
            try:
                again = gate.renew_turns(tokens, self._lease_ms)
                # One given back while it was being taken again: give it back (again).
                with self._lock:
                    gone = [token for token in again if token not in self._turns]
                for token in gone:
                    gate.leave(token)
            except self._errors as exc:
                logger.warning("could not renew gate turns in Redis: %s", exc)
        return True

    def _restored(self, state: RedisAccountState, restored: list[str]) -> None:
        logger.warning(
            "Redis had lost %d reservation(s) in flight of account %s (a restart, a flush"
            " or an eviction): recorded again, and its cached balance distrusted",
            len(restored),
            state.fingerprint,
        )
        # One settled while it was being recorded again: give it back (again).
        with self._lock:
            settled = [rid for rid in restored if rid not in self._held]
        for rid in settled:
            try:
                state.release(rid)
            except self._errors as exc:  # its lease expires
                logger.warning("could not give back a reservation in Redis: %s", exc)
