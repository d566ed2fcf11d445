"""The memory backend's gate and holds: ``LocalGate`` (at most N guarded actions of one
account in flight in this process, the others queued in order) and ``LocalHolds`` (the
reservations kept open past their call, until settled, released or expired). Both are
driven by ``Account`` under its lock and hand back the callbacks to run once it is
released."""

from __future__ import annotations

import collections
import math
import os
import time
from collections.abc import Callable

from creditguard.core.steps import Kept, Reservation, Turn

__all__ = ["LocalGate", "LocalHolds"]

_monotonic = time.monotonic


class LocalGate:
    """Turns at one account's gate. A turn given back is handed to the first caller
    queued (so callers get theirs in the order they came), and a caller that gives up
    waiting leaves the queue."""

    __slots__ = ("active", "limit", "queue")

    def __init__(self) -> None:
        self.active = 0
        self.limit = 1
        self.queue: collections.deque[Turn] = collections.deque()

    def enter(self, turn: Turn, limit: int) -> bool:
        """Under the lock: grant ``turn`` if a turn is free and nobody is ahead of it,
        else queue it (once). True when it has its turn."""
        if turn.granted:
            return True
        if turn.left:
            raise RuntimeError("this turn was given back already")
        self.limit = limit
        queue = self.queue
        if self.active < limit and (not queue or queue[0] is turn):
            if queue:
                queue.popleft()
            self.active += 1
            turn.granted = True
            return True
        if turn not in queue:
            queue.append(turn)
        return False

    def leave(self, turn: Turn) -> list[Callable[[], None]]:
        """Under the lock: give ``turn`` back (or leave the queue); hand the freed turns
        to the callers queued first. Giving a turn back twice does nothing."""
        if turn.left:
            return []
        turn.left = True
        queue = self.queue
        if turn.granted:
            self.active -= 1
        elif turn in queue:
            queue.remove(turn)
        callbacks: list[Callable[[], None]] = []
        while queue and self.active < self.limit:
            waiting = queue.popleft()
            waiting.granted = True
            self.active += 1
            callbacks += waiting._finish()
        return callbacks


class LocalHolds:
    """The holds open on one account, by id, their credits, and when the next one
    expires."""

    __slots__ = ("credits", "due", "open")

    def __init__(self) -> None:
        self.open: dict[str, Kept] = {}
        self.credits = 0  # the costs of the open holds, added up
        self.due = math.inf  # the monotonic time the next hold expires at

    def keep(self, reservation: Reservation, expires_in: float, turn: Turn | None) -> Kept:
        """Under the lock: open a hold on ``reservation`` for ``expires_in`` seconds."""
        hold_id = os.urandom(12).hex()
        due = _monotonic() + expires_in
        kept = Kept(hold_id, reservation, time.time() + expires_in, turn, due)
        self.open[hold_id] = kept
        self.credits += reservation.cost
        if due < self.due:
            self.due = due
        return kept

    def claim(self, hold_id: str) -> Kept | None:
        """Under the lock: end the hold (it is being settled or released), or ``None``
        when it is not open."""
        kept = self.open.pop(hold_id, None)
        if kept is not None:
            self.credits -= kept.reservation.cost
            if kept.due <= self.due:
                self.due = min((k.due for k in self.open.values()), default=math.inf)
        return kept

    def expired(self, now: float) -> list[Kept]:
        """Under the lock: remove and return the holds whose time is up."""
        gone = [k for k in self.open.values() if k.due <= now]
        for kept in gone:
            del self.open[kept.hold_id]
            self.credits -= kept.reservation.cost
        self.due = min((k.due for k in self.open.values()), default=math.inf)
        return gone
