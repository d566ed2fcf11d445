"""``Account``: the memory backend's state of one account (its layers put together), with
its holds, its gate, and what it holds now."""

from __future__ import annotations

from creditguard.backends.memory.reservations import AccountReservations
from creditguard.core.models import AccountSnapshot, CreditBalance, OpenHold
from creditguard.core.steps import Kept, Ops, Reservation, Step, Turn, done

__all__ = ["Account"]


class Account(AccountReservations):
    """The guard state of one account (base URL + API key), shared by every caller: an
    ``AccountState`` kept in this process."""

    __slots__ = ()

    # -- holds and the gate --------------------------------------------------------

    def enter(self, turn: Turn, limit: int, sync: bool, until: float) -> Ops[bool | Step]:
        """``turn`` has its turn at the gate (True), or the wait for it: until it is
        handed one, ``until``, or the next hold expiry (which may free one). Whether the
        account can pay is the flow's to check (``False``), with no I/O here."""
        if turn.check:
            return done(False)
        self._sweep()
        with self.lock:
            if self.gate.enter(turn, limit):
                return done(True)
            return done(Step(turn, False, min(until, self.holds.due)))

    def leave(self, turn: Turn) -> Ops[None]:
        """Give the turn back, or leave the queue (twice: nothing)."""
        with self.lock:
            callbacks = self.gate.leave(turn)
        for notify in callbacks:
            notify()
        return done(None)

    def keep(self, reservation: Reservation, expires_in: float, turn: Turn | None) -> Ops[Kept]:
        """Keep ``reservation`` open as a hold for ``expires_in`` seconds."""
        with self.lock:
            return done(self.holds.keep(reservation, expires_in, turn))

    def held(self, hold_id: str) -> Ops[Kept | None]:
        """The open hold ``hold_id`` (``None``: unknown, ended or expired)."""
        self._sweep()
        with self.lock:
            return done(self.holds.open.get(hold_id))

    def claim(self, hold_id: str) -> Ops[Kept | None]:
        """End the hold ``hold_id`` and give back its turn, if it has one; ``None`` when
        it is not open."""
        self._sweep()
        with self.lock:
            kept = self.holds.claim(hold_id)
            callbacks = [] if kept is None or kept.turn is None else self.gate.leave(kept.turn)
        for notify in callbacks:
            notify()
        return done(kept)

    def committed(self) -> Ops[int]:
        """The credits of the open holds."""
        self._sweep()
        return done(self.holds.credits)

    def flip(self, name: str, low: bool) -> Ops[bool | None]:
        """Record which side of the threshold ``name`` the balance is on; the side it was
        recorded on before (``None``: none)."""
        with self.lock:
            before = self.alerts.get(name)
            self.alerts[name] = low
            return done(before)

    # -- what the account holds ----------------------------------------------------

    def survey(self) -> Ops[AccountSnapshot]:
        """What the account holds now."""
        self._sweep()
        with self.lock:
            trusted = self.cached is not None and self.cached_seq >= self.floor
            holds = self.holds
            open_holds = tuple(
                OpenHold(k.hold_id, k.reservation.cost, k.expires_at) for k in holds.open.values()
            )
            return done(
                AccountSnapshot(
                    balance=self.cached if trusted else None,
                    reserved=self.reserved - holds.credits,
                    in_flight=self.inflight - len(open_holds),
                    held=holds.credits,
                    holds=len(open_holds),
                    settling=len(self.settling),
                    gate_waiting=len(self.gate.queue),
                    backend="memory",
                    open_holds=open_holds,
                )
            )

    def snapshot(self) -> tuple[CreditBalance | None, int, int]:
        """(cached balance, credits reserved, calls in flight), for tests and metrics."""
        self._sweep()
        with self.lock:
            return self.cached, self.reserved, self.inflight

    def busy(self) -> bool:
        """Whether a call is in flight, a hold open or a caller waiting on the account: its
        state must not be forgotten. Calls that returned and wait for a read do not count:
        an account made anew reads a balance that includes them."""
        self._sweep()
        with self.lock:
            return bool(
                self.inflight > len(self.settling)
                or self.waiters
                or self.gate.active
                or self.gate.queue
                or self.holds.open
            )
