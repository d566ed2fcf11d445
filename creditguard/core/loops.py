"""One resource per event loop, closed in that loop when the loop ends.

A resource bound to the event loop it was made in (an async HTTP transport, an asyncio
Redis client: their connections belong to that loop) is made on first use in each loop and
closed *in its own loop* when that loop shuts down, so a finished loop leaves no socket
open and is not kept alive. :class:`LoopKeeper` does this for any resource given an async
close callable; it knows nothing of what the resource is.

The retirement rules:

* A loop that shuts down finalizing its async generators (``asyncio.run``,
  ``asyncio.Runner``, ``anyio.run`` on asyncio or trio, ``trio.run``) closes its resource
  then, in that loop, and the keeper forgets it (see :func:`_keeper`).
* A loop closed without finalizing them (``loop.close()`` without
  ``shutdown_asyncgens()``) is let go, with its resource dropped unclosed (its sockets
  close when it is collected), the next time the keeper meets a new loop, or on
  :meth:`LoopKeeper.drop` or ``aclose(everywhere=True)``: at most the newest such loop is
  held.
* :meth:`LoopKeeper.drop` (from any thread, without awaiting) has each loop close its own
  resource: a live asyncio loop in a task scheduled thread-safely, a running trio run in a
  system task of that run; a loop that is closed, or a trio run that is over or shutting
  down, gets its resource dropped at once.

A loop is named by asyncio's running loop, or under trio by the run's ``TrioToken``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Generic, TypeVar

import anyio.lowlevel

__all__ = ["LoopKeeper", "current_loop"]

T = TypeVar("T")


def current_loop() -> object:
    """The running event loop: asyncio's loop, or the trio run's token."""
    # asyncio's running loop is a cheap C call; anything else asks anyio.
    return asyncio._get_running_loop() or anyio.lowlevel.current_token().native_token


class _Held(Generic[T]):
    """The resource kept for one event loop, until that loop ends."""

    __slots__ = ("resource",)

    def __init__(self, resource: T) -> None:
        self.resource: T | None = resource


async def _keeper(
    held: _Held[T],
    close: Callable[[T], Awaitable[None]],
    owner: weakref.ref[LoopKeeper[T]],
    loop: object,
) -> AsyncGenerator[None, None]:
    """Closes ``held``'s resource when its loop ends.

    Advanced once inside the loop, this async generator is registered by the loop's
    async-generator hooks, and the loop closes it when it shuts down (``asyncio.run``,
    ``asyncio.Runner``, ``anyio.run`` and ``trio.run`` all finalize the async generators
    still alive): the ``finally`` then runs in that loop, where the resource's
    connections can still be closed.
    """
    try:
        yield
    finally:
        keeper = owner()
        if keeper is not None:
            keeper._forget(loop, held)
        resource, held.resource = held.resource, None
        if resource is not None:
            with contextlib.suppress(Exception):  # a connection already broken
                await close(resource)


async def _finish(keeper: AsyncGenerator[None, None]) -> None:
    await keeper.aclose()


def _finish_now(keeper: AsyncGenerator[None, None], held: _Held[T]) -> None:
    """Finish ``keeper`` without its loop (the loop is closed, or its run is over): its
    resource is dropped without awaiting, and its sockets close with it."""
    held.resource = None
    closing = keeper.aclose()
    try:
        closing.send(None)
    except (StopIteration, RuntimeError):
        pass
    else:  # pragma: no cover - the finally awaits nothing once the resource is gone
        closing.close()


def _spawn_trio(keeper: AsyncGenerator[None, None], held: _Held[T]) -> None:
    """In a trio run's thread: finish ``keeper`` in a system task of that run."""
    trio = sys.modules["trio"]
    try:
        trio.lowlevel.spawn_system_task(_finish, keeper)
    except RuntimeError:  # the run is shutting down: too late to await in it
        _finish_now(keeper, held)


def _retire(loop: object, keeper: AsyncGenerator[None, None], held: _Held[T]) -> None:
    """Have ``keeper`` finish (and close its resource) in its own loop, from any thread;
    at once, without awaiting, when that loop is gone."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.create_task, _finish(keeper))
                return
            except RuntimeError:  # closed meanwhile
                pass
    else:  # a trio run, named by its token
        trio = sys.modules.get("trio")
        if trio is not None and isinstance(loop, trio.lowlevel.TrioToken):
            try:
                loop.run_sync_soon(_spawn_trio, keeper, held)
                return
            except trio.RunFinishedError:
                pass
    _finish_now(keeper, held)


def _is_closed(loop: object) -> bool:
    return isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed()


_Entry = tuple[AsyncGenerator[None, None], _Held[T]]


class LoopKeeper(Generic[T]):
    """A resource per event loop (asyncio or trio, in any thread), each closed with
    ``close`` in its own loop when that loop ends (see the module for the rules).

    Thread-safe. :meth:`get` costs one dict lookup once the running loop has its resource.
    """

    __slots__ = ("__weakref__", "_close", "_entries", "_lock", "_resources")

    def __init__(self, close: Callable[[T], Awaitable[None]]) -> None:
        # ``close`` is kept by each loop's keeper, which may outlive this object: it should
        # not hold on to the resource's owner.
        self._close = close
        # loop -> its resource: one dict lookup per get. The keepers are apart, used only
        # when a loop comes or goes.
        self._resources: dict[object, T] = {}
        self._entries: dict[object, _Entry[T]] = {}
        self._lock = threading.Lock()

    @property
    def held(self) -> Mapping[object, T]:
        """The resources kept now, by loop (a live view)."""
        return self._resources

    def get(self, factory: Callable[[], T]) -> T:
        """The running loop's resource, made with ``factory`` on the loop's first use."""
        loop = current_loop()
        resource = self._resources.get(loop)
        if resource is None:
            resource = self._open(loop, factory())
        return resource

    def _open(self, loop: object, resource: T) -> T:
        """Keep ``resource`` for ``loop`` (the running one), with its keeper; let go of
        the loops closed meanwhile."""
        held = _Held(resource)
        keeper = _keeper(held, self._close, weakref.ref(self), loop)
        # First step, in the loop's thread: the loop's async-generator hooks register it.
        with contextlib.suppress(StopIteration):
            keeper.asend(None).send(None)
        with self._lock:
            stale = self._take(_is_closed)
            self._resources[loop] = resource
            self._entries[loop] = (keeper, held)
        for other, (old_keeper, old_held) in stale:
            _retire(other, old_keeper, old_held)
        return resource

    def _take(self, which: Callable[[object], bool]) -> list[tuple[object, _Entry[T]]]:
        """Remove the entries of the loops ``which`` selects (under the lock)."""
        taken = [(loop, entry) for loop, entry in self._entries.items() if which(loop)]
        for loop, _ in taken:
            del self._entries[loop]
            self._resources.pop(loop, None)
        return taken

    def _forget(self, loop: object, held: _Held[T]) -> None:
        """Called by a keeper as it finishes: drop its loop's entry, if still its own."""
        with self._lock:
            entry = self._entries.get(loop)
            if entry is not None and entry[1] is held:
                del self._entries[loop]
                self._resources.pop(loop, None)

    def drop(self) -> None:
        """Let go of every loop's resource, from any thread and without awaiting: each is
        closed in its own loop, at once (unclosed) for a loop that is gone. A later
        :meth:`get` makes a new one."""
        with self._lock:
            taken = self._take(lambda _: True)
        for loop, (keeper, held) in taken:
            _retire(loop, keeper, held)

    async def aclose(self, *, everywhere: bool = False) -> bool:
        """Close the running loop's resource here, awaiting its ``close``; with
        ``everywhere``, also have every other loop close its own (as :meth:`drop`).
        Whether the running loop had one."""
        loop = current_loop()
        with self._lock:
            taken = self._take(lambda other: everywhere or other is loop)
        mine = None
        for other, (keeper, held) in taken:
            if other is loop:
                mine = keeper
            else:
                _retire(other, keeper, held)
        if mine is None:
            return False
        await _finish(mine)
        return True
