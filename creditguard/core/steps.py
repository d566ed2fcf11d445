"""What the account state and the guard's drivers say to each other: things to wait for
(``Flight``: a balance read; ``Waiter``: an admission waiting for spends in flight), the
reservation an admitted call holds, and the backend I/O a driver performs (``Call``).

Waiting works from threads and from tasks of any event loop (asyncio or trio), and every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from datetime import datetime
from typing import NamedTuple, TypeVar

import anyio
import anyio.lowlevel

from creditguard.core.errors import BalanceUnavailable
from creditguard.core.models import CreditBalance

__all__ = [
    "Admission",
    "Call",
    "Flight",
    "Kept",
    "Ops",
    "Reservation",
    "Step",
    "Steps",
    "Turn",
    "Waiter",
    "Window",
    "WindowBook",
    "done",
    "own_error",
    "pause",
]

_monotonic = time.monotonic
_get_ident = threading.get_ident


class _Waitable:
    """Something callers wait for, from threads and from tasks of any event loop.

    Waiters register under the account lock; :meth:`_finish` (under the lock) hands back
    the callbacks to run once the lock is released. Every wait is bounded by a deadline
    (``time.monotonic()`` seconds) or by the caller's cancellation, and a waiter that
    gives up leaves nothing registered.
    """

    __slots__ = ("_callbacks", "_event")

    def __init__(self) -> None:
        # Waiters register here; None once finished.
        self._callbacks: list[Callable[[], None]] | None = []
        # Made only when a thread waits (most waits have no sync waiter).
        self._event: threading.Event | None = None

    @property
    def done(self) -> bool:
        return self._callbacks is None

    def wait(self, lock: threading.Lock, until: float) -> None:
        """Block this thread until finished, or until the monotonic time ``until``."""
        with lock:
            if self._callbacks is None:
                return
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        timeout = until - _monotonic()
        if timeout > 0:
            event.wait(timeout)

    async def await_done(self, lock: threading.Lock, until: float | None = None) -> None:
        """Wait in the current task until finished (or until ``until``); whoever finishes
        it may be a thread or a task of another loop."""
        event = anyio.Event()
        me = _get_ident()
        native = anyio.lowlevel.current_token().native_token
        call_soon: Callable[[Callable[[], object]], object] = (
            native.call_soon_threadsafe
            if isinstance(native, asyncio.AbstractEventLoop)
            else native.run_sync_soon  # type: ignore[attr-defined]  # trio.lowlevel.TrioToken
        )

        def notify() -> None:
            if _get_ident() == me:
                event.set()
            else:
                # RuntimeError: that loop has closed, so nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    call_soon(event.set)

        with lock:
            callbacks = self._callbacks
            if callbacks is None:
                return
            callbacks.append(notify)
        try:
            if until is None:
                await event.wait()
            else:
                with anyio.move_on_after(until - _monotonic()):
                    await event.wait()
        finally:
            if not event.is_set():  # timed out or cancelled: leave no trace
                with lock:
                    callbacks = self._callbacks
                    if callbacks is not None and notify in callbacks:
                        callbacks.remove(notify)

    def _finish(self) -> list[Callable[[], None]]:
        """Under the account lock: mark finished and hand back the waiters to notify."""
        callbacks = self._callbacks or []
        self._callbacks = None
        event = self._event
        if event is not None:
            callbacks.append(event.set)
        return callbacks


class Flight(_Waitable):
    """One upstream balance read that any number of callers may wait on.

    ``sync`` says whether sync code leads it. A thread never waits for a read led by a
    task: that task's loop may be blocked by this very thread, or by a thread that waits
    for this one (see :meth:`Account._join_or_lead`).
    """

    __slots__ = ("abandoned", "error", "result", "start_seq", "started", "sync")

    def __init__(self, start_seq: int, sync: bool) -> None:
        super().__init__()
        self.start_seq = start_seq
        self.sync = sync
        self.started = _monotonic()
        self.result: CreditBalance | None = None
        self.error: BaseException | None = None
        self.abandoned = False


class Waiter(_Waitable):
    """A call waiting at admission for spends in flight to settle. The account finishes
    it when its decision may have changed: when ``cost`` now fits, or when the account
    can no longer pay it even if the calls in flight charge nothing."""

    __slots__ = ("cost", "keep", "own", "window")

    def __init__(self, cost: int, own: int, keep: int = 0, window: Window | None = None) -> None:
        super().__init__()
        self.cost = cost
        self.own = own  # credits its own enclosing spends hold (see own_credits)
        self.keep = keep  # the floor its guard never spends
        self.window = window  # the subject's allowance window, if one applies


class Turn(_Waitable):
    """A caller's place at the account's gate (``max_concurrent``): queued until it is
    ``granted``, then one of the guarded actions in flight until it is given back
    (``left``). ``token`` names it in a shared backend. The account finishes it when it is
    granted (a backend that polls finishes nothing: its waits end at their deadline).

    ``asking`` is the admission its caller asks for once the turn is granted. With
    ``check``, a caller new at the gate the account cannot pay is refused before it
    queues: a backend that can tell in the same step as its first look raises
    ``InsufficientCredits`` there; one that cannot answers ``False`` and the flow checks
    first. With ``admit``, a backend may also admit the call in the step that grants the
    turn (``admitted``)."""

    __slots__ = (
        "admit",
        "admitted",
        "asking",
        "check",
        "granted",
        "left",
        "limit",
        "looks",
        "owner",
        "remote",
        "token",
    )

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.granted = False
        self.left = False
        self.owner: tuple[int, int] = (0, 0)  # the thread and task that took it
        self.remote = False  # asked for in a shared backend (not this process's memory)
        self.looks = 0  # how many times it asked, in a backend that is polled
        self.limit = 0  # the gate's limit it asked under, in a shared backend
        self.asking: Admission | None = None
        self.check = False
        self.admit = False
        self.admitted: Reservation | None = None


def own_error(error: BaseException) -> BaseException:
    """A copy of a shared read's error for one caller, with the shared error as its cause.

    Every caller of a failed read raises an exception of its own: re-raising one object
    from many callers would grow its traceback with each of them and keep all their
    frames alive.
    """
    try:
        mine = copy.copy(error)
    except Exception:  # an exception type that cannot be copied: wrap it
        mine = BalanceUnavailable(f"the balance read failed: {error}")
    mine.__cause__ = error
    mine.__traceback__ = None
    return mine


class Reservation:
    """The credits one admitted call holds, from admission until it is settled.

    ``balance`` is what it was admitted on; ``gen`` the cached balance it was admitted
    on (-1: none, or a read's result that was not cached), so the account knows which
    reservations that balance certainly excludes. ``after`` is set when the action
    finished: the reservation waits for a read that started at or after it.
    """

    __slots__ = (
        "after",
        "balance",
        "budgets",
        "charge",
        "cost",
        "gen",
        "released",
        "warned",
        "window",
    )

    def __init__(self, cost: int, balance: CreditBalance | None, gen: int) -> None:
        self.cost = cost
        self.balance = balance
        self.gen = gen
        self.after = 0
        self.released = False
        # The subject's allowance window it counts in (``None``: no allowance), what its
        # call was charged (``None``: its cost; set when the call ends), and whether its
        # admission took the window past the allowance's ``warn_at``.
        self.window: Window | None = None
        self.charge: int | None = None
        self.warned = False
        # The ``budget()`` blocks it counts in (this process's; see core/spending.py).
        self.budgets: tuple[object, ...] = ()


class Window:
    """One subject's allowance window, as an admission asks for it: ``key`` names it
    (a hash of the subject and the window's start: never the subject's id), ``limit`` is
    the allowance, ``start``/``end`` the window (Unix seconds), ``warn`` the credits past
    which one ``allowance_warning`` is emitted (``None``: none), ``subject`` who asked
    (for the refusal only)."""

    __slots__ = ("end", "key", "limit", "resets_at", "start", "subject", "warn")

    def __init__(
        self,
        subject: str,
        key: str,
        limit: int,
        start: datetime,
        resets_at: datetime,
        warn: int | None,
    ) -> None:
        self.subject = subject
        self.key = key
        self.limit = limit
        self.start = start.timestamp()
        self.end = resets_at.timestamp()
        self.resets_at = resets_at
        self.warn = warn

    def __repr__(self) -> str:
        return f"<Window {self.key} limit={self.limit}>"


class WindowBook:
    """What a window holds: the credits its subject's calls were charged (``spent``), the
    credits of its calls in flight (``reserved``), and whether its warning was emitted."""

    __slots__ = ("end", "reserved", "spent", "warned")

    def __init__(self, end: float) -> None:
        self.end = end
        self.spent = 0
        self.reserved = 0
        self.warned = False


def own_credits(enclosing: tuple[Reservation, ...]) -> int:
    """The credits a caller's own enclosing spends still hold: they cannot settle while
    it waits, so its admission counts them as committed, like holds."""
    return sum(r.cost for r in enclosing if not r.released)


class Kept:
    """A hold: a reservation kept open past the call that took it, until it is settled or
    released (by any process sharing the backend), or until it expires. ``expires_at`` is
    the Unix time it expires at; ``turn`` the gate turn it still has, if any."""

    __slots__ = ("due", "expires_at", "hold_id", "reservation", "turn")

    def __init__(
        self,
        hold_id: str,
        reservation: Reservation,
        expires_at: float,
        turn: Turn | None,
        due: float = 0.0,
    ) -> None:
        self.hold_id = hold_id
        self.reservation = reservation
        self.expires_at = expires_at
        self.turn = turn
        self.due = due  # the monotonic time it expires at, where the backend keeps time


@dataclasses.dataclass(slots=True)
class Admission:
    """One call asking to be admitted, as a backend decides on it: its ``cost``, the
    ``ttl`` a cached balance is trusted for, whether the caller is a thread (``sync``),
    the reservations of its own enclosing calls (``enclosing``: they cannot settle while
    it waits), until when it may wait for calls in flight (``until``, monotonic seconds;
    ``None``: it may not), and whether a read may be led to settle the calls that
    returned (``settle``). The flow asks again with the same one, updated."""

    cost: int
    ttl: float
    sync: bool
    enclosing: tuple[Reservation, ...] = ()
    until: float | None = None
    settle: bool = True
    keep: int = 0
    """The credits the guard never spends (its floor)."""
    window: Window | None = None
    """The subject's allowance window, when one applies."""


class Step(NamedTuple):
    """What an operation needs next: a read to perform (``lead``) or to wait for, or a
    release (a ``Waiter``, or a turn at the gate) to wait for."""

    waitable: _Waitable
    lead: bool = False
    """The caller performs the read (``waitable`` is then a ``Flight``)."""
    until: float | None = None
    """Bounds a wait for a release (monotonic seconds); a read's waiters are bounded by
    the guard's read budget instead."""


T = TypeVar("T")


class Call:
    """One operation of a backend that does I/O (a Redis script call), for the guard's
    driver to perform at its edge: ``run()`` from sync code, ``await arun()`` from async
    code. The memory backend never needs one."""

    __slots__ = ("arun", "run")

    def __init__(self, run: Callable[[], object], arun: Callable[[], Awaitable[object]]) -> None:
        self.run = run
        self.arun = arun


def pause(seconds: float) -> Call:
    """A pause, as a ``Call`` the driver performs at its edge (a thread sleeps; a task
    sleeps in its loop)."""
    return Call(lambda: time.sleep(seconds), lambda: anyio.sleep(seconds))


# An operation on an account's state, as a generator: it yields the I/O it needs done
# (``Call``) and is sent each result; its return value is the operation's result.
Ops = Generator[Call, object, T]


def done(value: T) -> Ops[T]:
    """An operation that needs no I/O (its result is known): it returns ``value`` on
    its first step, yielding nothing."""
    if False:  # makes this a generator function; compiled away, so it costs nothing
        yield
    return value


# An operation of the guard's logic: yields what it needs performed or waited for (a
# ``Step``) or the backend I/O it needs (a ``Call``), and is sent back what was waited for
# or the call's result (or has the read's or call's exception thrown in).
Steps = Generator["Step | Call", object, T]
