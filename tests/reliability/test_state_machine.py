"""Property-based test of the account state machine, driven through the public guard.

A Hypothesis ``RuleBasedStateMachine`` runs one account through random interleavings of
guarded spends (sync ones in the test's thread, async ones as tasks of an event loop in a
blocking portal, asyncio or trio), actions that fail, are interrupted or cancelled (inside
the block, during the admission read, during the read of a block's balance after),
charges by someone else, invalidations, TTL expiry (a patched clock) and upstream faults.

Blocks settle lazily: a block that returns keeps its reservation until a read that
started after its action finished comes back, whoever makes it: reading its
``balance_after`` right away, later, or never (an admission, ``balance()``, another block's
read). The model keeps each such block (its reservation, and the service's balance right
after its charge) until a read releases it.

Each rule leaves every call either parked inside its guarded block or finished, so the
interleavings are deterministic. After every step:

* the guard never admits what the account cannot pay when it is the only spender: every
  paid call it admitted is accepted by the service, and the calls parked in their blocks
  can all still be paid;
* the sum of the costs admitted and in flight never exceeds the last balance read at the
  current generation (and that balance, while fresh, is the service's);
* the guard's reservations are exactly the costs in flight plus those of the blocks that
  returned and wait for a read, zero when nothing is; a released block's charge is in the
  cached balance (no reservation is released on a read that does not include it);
* a completed spend's ``balance_after`` (read right away) is the service's balance, and
  the next ``balance()`` trusts that read; read later, it includes the block's charge;
* ``balance()`` settles every block that returned;
* no balance the service never had is cached.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import anyio
import anyio.from_thread
import anyio.lowlevel
import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import creditguard.backends.memory.base as memory_base
import creditguard.backends.memory.reads as memory_reads
import creditguard.backends.memory.reservations as memory_reservations
from creditguard import (
    AdmissionTimeout,
    BalanceUnavailable,
    CreditBalance,
    CreditGuard,
    InsufficientCredits,
    RetryPolicy,
    Spend,
)
from creditguard.core.calls import enclosing
from creditguard.core.steps import own_credits
from creditguard.testing import FakeLensmor

from .support import reads_in_flight

# The memory account's layers that read the clock (each through its module's _monotonic).
ACCOUNT_CLOCKS = (memory_base, memory_reads, memory_reservations)

TTL = 30.0
MAX_OPEN = 6
WAIT = 5.0  # seconds; only reached if the guard hangs
FAULT_KINDS: list[tuple[int | str, dict[str, str]]] = [
    (500, {}),
    (503, {}),
    (429, {"Retry-After": "0"}),
    (429, {"Retry-After": "3600"}),
    ("drop", {}),
    ("stall", {}),
    ("truncated", {}),
    ("not-json", {}),
    ("wrong-types", {}),
]


class ActionFailed(Exception):
    """The guarded action raised."""


class PaidCallRefused(Exception):
    """The service refused the paid call: the account could not pay for it."""


class Interrupted(BaseException):
    """A BaseException inside a sync block (as KeyboardInterrupt would be)."""


class AdmissionCancelled(Exception):
    """Stands for the cancellation of an async caller before it was admitted."""


class Clock:
    """Replaces the state machine's monotonic clock, so the TTL expires on command."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Gate(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Forwards to the sandbox. While held, async requests wait *before* reaching it (so a
    cancelled one never does), or with ``stale=True`` get the service's answer at once but
    are held before it is delivered (so it is stale by then); ``arrivals`` counts the
    requests that were held."""

    def __init__(self, inner: FakeLensmor) -> None:
        self.inner = inner.transport
        self.held: anyio.Event | None = None
        self.stale = False
        self.arrivals = 0
        self._cond = threading.Condition()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        held = self.held
        if held is None:
            return await self.inner.handle_async_request(request)
        error: httpx.HTTPError | None = None
        if self.stale:
            try:
                answer = await self.inner.handle_async_request(request)
                body = await answer.aread()
            except httpx.HTTPError as exc:  # a scripted fault: delivered late as well
                error = exc
        with self._cond:
            self.arrivals += 1
            self._cond.notify_all()
        await held.wait()
        if error is not None:
            raise error
        if self.stale:
            return httpx.Response(answer.status_code, headers=answer.headers, content=body)
        return await self.inner.handle_async_request(request)

    def hold(self, stale: bool = False) -> None:  # in the event loop
        self.held = anyio.Event()
        self.stale = stale
        self.arrivals = 0

    def release(self) -> None:  # in the event loop
        held, self.held = self.held, None
        if held is not None:
            held.set()

    def wait_arrivals(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.arrivals >= n, WAIT), self.arrivals


Action = Callable[[], Awaitable[None]]
LOOKS = ["no", "no", "property", "async"]  # how a returned block's balance after is read


@dataclass
class Settling:
    """A block that returned: its reservation is held until a read includes its charge."""

    spend: Spend
    reservation: Any  # creditguard.core.steps.Reservation (``released`` once settled)
    total_after: int  # the service's total balance right after its charge
    mode: str


@dataclass
class Open:
    """A guarded call parked inside its block."""

    cost: int
    spend: Spend
    mode: str  # "sync" or "async"
    box: dict[str, Any] = field(default_factory=dict)  # async: send stream, scope
    done: concurrent.futures.Future[str] | None = None


async def _actor(
    guard: CreditGuard, cost: int, admitted: concurrent.futures.Future[Spend], box: dict[str, Any]
) -> str:
    """An async guarded call: admitted, then parked until the test sends its action."""
    send, receive = anyio.create_memory_object_stream[Action](1)
    box["send"] = send
    try:
        with anyio.CancelScope() as scope:
            box["scope"] = scope
            try:
                async with guard.spend(cost) as spend:
                    admitted.set_result(spend)
                    action = await receive.receive()
                    await action()
            except BaseException as exc:
                if not admitted.done():
                    admitted.set_exception(
                        exc if isinstance(exc, Exception) else AdmissionCancelled()
                    )
                raise
        return "cancelled" if scope.cancelled_caught else "done"
    finally:
        send.close()
        receive.close()


async def _let_others_run() -> None:
    for _ in range(3):
        await anyio.lowlevel.checkpoint()


class GuardMachine(RuleBasedStateMachine):
    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self._clocks = [mock.patch.object(m, "_monotonic", self.clock) for m in ACCOUNT_CLOCKS]
        for clock in self._clocks:
            clock.start()
        self.fake = FakeLensmor(subscription_balance=100, gift_balance=20, api_key="sk-machine")
        self.gate = Gate(self.fake)
        self.guard = CreditGuard(
            self.fake.api_key,
            transport=self.gate,
            ttl=TTL,
            # Calls parked in their blocks settle only when a later rule ends them: a
            # call cannot wait for them here, so admission decides at once.
            admission_timeout=0,
            timeout=WAIT,
            retry=RetryPolicy(attempts=2, deadline=WAIT, backoff=0, backoff_max=0),
        )
        self.account = self.guard._account
        self._portal_cm = anyio.from_thread.start_blocking_portal(self.backend)
        self.portal = self._portal_cm.__enter__()
        self.opens: dict[int, Open] = {}
        self.settling: list[Settling] = []  # blocks that returned, in the order they did
        self.next_id = 0
        self.tainted = False  # someone else charged and the guard may not know yet
        self.overspends = 0
        self.history: set[CreditBalance] = {self.fake.balance}
        self.stats: dict[str, int] = {}

    # -- the model ---------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def paid_call(self, cost: int) -> None:
        """The action's paid call: the service charges, or refuses when it cannot."""
        try:
            self.fake.charge(cost)
        except InsufficientCredits:
            if not self.tainted:
                self.overspends += 1
            raise PaidCallRefused from None
        self.history.add(self.fake.balance)

    def untaint_if_idle(self) -> None:
        """With nothing in flight, a balance the guard reads from now on includes every
        outside charge, so it is again the only spender as far as it can know."""
        if not self.opens:
            self.tainted = False

    def pending_faults(self) -> bool:
        return self.fake.pending_faults > 0

    def in_block(self) -> int:
        return sum(o.cost for o in self.opens.values())

    def waiting(self) -> list[Settling]:
        """The blocks that returned and that no read has settled yet."""
        return [s for s in self.settling if not s.reservation.released]

    def unsettled(self) -> int:
        return sum(s.reservation.cost for s in self.waiting())

    def check_before(self, balance: CreditBalance) -> None:
        """``balance``, read before now, when nobody else charged: the service's, but
        for the charges of blocks that returned and wait for a read (it may predate them)."""
        if not self.waiting():
            assert balance == self.fake.balance
        else:
            total = self.fake.balance.total_balance
            assert total <= balance.total_balance <= total + self.unsettled()

    def current_generation(self) -> tuple[CreditBalance | None, bool]:
        """The cached balance if it was read at the current generation, and its freshness."""
        account = self.account
        with account.lock:
            if account.cached is None or account.cached_seq < account.floor:
                return None, False
            return account.cached, self.clock() - account.cached_at < TTL

    def admitted(self, cost: int, mode: str, spend: Spend) -> None:
        assert spend.balance_before is not None
        assert spend.balance_before in self.history
        if not self.tainted:
            # Admitted on the true balance (or on the cached one, which may not include
            # the blocks that returned and wait for a read: their credits are reserved),
            # and payable beside exactly what is in flight.
            self.check_before(spend.balance_before)
            assert cost <= self.fake.balance.total_balance - self.in_block()
        self.opens[self.next_id] = Open(cost, spend, mode)
        self.next_id += 1

    def own(self) -> int:
        """The credits of the caller's own enclosing blocks: sync blocks entered in this
        thread and left open enclose the next one, and the portal's tasks start in a copy
        of this thread's context, so they enclose those too."""
        return own_credits(
            tuple(o._reservation for o in enclosing(self.guard._engine) if o._reservation)
        )

    def refused(self, cost: int, exc: BaseException, faults_before: bool, own: int) -> None:
        if isinstance(exc, InsufficientCredits):
            self.note("denied")
            assert exc.required == cost > exc.available >= 0
            if not self.tainted:
                # A true refusal: the account cannot pay even if every call in flight but
                # the caller's own enclosing ones charges nothing (decided on the service's
                # balance, or on a cached one that is higher).
                assert exc.balance is not None
                self.check_before(exc.balance)
                assert exc.available == max(0, exc.balance.total_balance - own)
                assert cost > self.fake.balance.total_balance - own
        elif isinstance(exc, AdmissionTimeout):
            self.note("busy")
            assert exc.required == cost
            assert exc.reserved > 0  # only calls in flight stood in the way
        elif isinstance(exc, BalanceUnavailable):
            self.note("unavailable")
            assert faults_before, f"unavailable without a fault: {exc!r}"
        else:
            raise exc

    def finished(self, spend: Spend, ok: bool, mode: str, look: str) -> None:
        """A block returned (``ok``) or raised; ``look``: how its balance after is read
        right away ("no": not now)."""
        if not ok:
            reads = self.fake.balance_requests
            assert spend.balance_after is None  # known: no read
            assert self.fake.balance_requests == reads
            self.untaint_if_idle()
            return
        # It exited with no read: its reservation waits for one.
        reservation = spend._due
        assert reservation is not None
        assert not reservation.released
        entry = Settling(spend, reservation, self.fake.balance.total_balance, mode)
        self.settling.append(entry)
        if look == "no":
            # No read: the cached balance stays what it was (it may miss outside charges).
            self.note("settles later")
        elif self.look(entry, look, at_once=True):
            self.untaint_if_idle()  # that read is the service's balance now

    def look(self, entry: Settling, via: str, at_once: bool) -> bool:
        """Read ``entry``'s balance after (``at_once``: right after the block returned);
        whether it was read."""
        faults, reads = self.pending_faults(), self.fake.balance_requests
        released = entry.reservation.released  # maybe by another read, since
        if via == "property":
            after = entry.spend.balance_after
        else:
            after = self.portal.call(entry.spend.abalance_after)
        if after is None:  # the read failed: logged, and the block stays reserved
            self.note("refresh failed")
            assert faults, "the read after a block failed without a fault"
            assert entry.reservation.released == released  # it released nothing
            return False
        self.note("spent" if at_once else "looked later")
        assert after in self.history
        # A read that started after the block's action finished: it includes its charge.
        assert self.fake.balance.total_balance <= after.total_balance <= entry.total_after
        # It settled the block, and every block that returned before it.
        for earlier in self.settling[: self.settling.index(entry) + 1]:
            assert earlier.reservation.released
        if at_once:
            # Nothing happened since the block returned: that read is the service's now.
            assert after == self.fake.balance
            assert self.fake.balance_requests > reads
            reads = self.fake.balance_requests
            assert self.guard.balance() == self.fake.balance
            assert self.fake.balance_requests == reads  # balance() trusted that read
        return True

    # -- rules: guarded calls ----------------------------------------------------------

    @precondition(lambda self: len(self.opens) < MAX_OPEN)
    @rule(cost=st.integers(0, 40))
    def begin_sync(self, cost: int) -> None:
        faults = self.pending_faults()
        spend = self.guard.spend(cost)
        own = self.own()
        try:
            spend.__enter__()
        except Exception as exc:
            self.refused(cost, exc, faults, own)
        else:
            self.admitted(cost, "sync", spend)

    @precondition(lambda self: len(self.opens) < MAX_OPEN)
    @rule(
        cost=st.integers(0, 40),
        variant=st.sampled_from(["plain", "plain", "plain", "cancelled leader", "with waiter"]),
        leader_cost=st.integers(0, 40),
    )
    def begin_async(self, cost: int, variant: str, leader_cost: int) -> None:
        if variant == "plain":
            self._begin_async(cost)
        else:
            self._cancel_leader(leader_cost, cost if variant == "with waiter" else None)

    def _begin_async(self, cost: int) -> None:
        faults, own = self.pending_faults(), self.own()
        admitted: concurrent.futures.Future[Spend] = concurrent.futures.Future()
        box: dict[str, Any] = {}
        done = self.portal.start_task_soon(_actor, self.guard, cost, admitted, box)
        try:
            spend = admitted.result(WAIT)
        except Exception as exc:
            done.exception(WAIT)
            self.refused(cost, exc, faults, own)
        else:
            self.admitted(cost, "async", spend)
            self.opens[self.next_id - 1].box = box
            self.opens[self.next_id - 1].done = done

    def _pick(self, index: int) -> tuple[int, Open]:
        key = sorted(self.opens)[index % len(self.opens)]
        return key, self.opens.pop(key)

    @precondition(lambda self: any(o.mode == "sync" for o in self.opens.values()))
    @rule(
        index=st.integers(0, MAX_OPEN),
        outcome=st.sampled_from(
            ["ok", "ok", "raise-after-charge", "raise-before-charge", "interrupt-after-charge"]
        ),
        look=st.sampled_from(LOOKS),
    )
    def finish_sync(self, index: int, outcome: str, look: str) -> None:
        sync = sorted(k for k, o in self.opens.items() if o.mode == "sync")
        key = sync[index % len(sync)]
        call = self.opens.pop(key)
        ok = False
        try:
            if outcome != "raise-before-charge":
                self.paid_call(call.cost)
            if outcome == "raise-after-charge" or outcome == "raise-before-charge":
                raise ActionFailed(outcome)
            if outcome == "interrupt-after-charge":
                raise Interrupted
        except BaseException as exc:
            self.note(outcome if not isinstance(exc, PaidCallRefused) else "paid call refused")
            call.spend.__exit__(type(exc), exc, exc.__traceback__)
        else:
            call.spend.__exit__(None, None, None)
            ok = True
        self.finished(call.spend, ok, "sync", look)

    @precondition(lambda self: any(o.mode == "async" for o in self.opens.values()))
    @rule(
        index=st.integers(0, MAX_OPEN),
        outcome=st.sampled_from(
            [
                "ok",
                "ok",
                "raise-after-charge",
                "raise-before-charge",
                "cancel-after-charge",
                "cancel-before-charge",
            ]
        ),
        look=st.sampled_from(LOOKS),
    )
    def finish_async(self, index: int, outcome: str, look: str) -> None:
        _, call = self._pick_async(index)
        refused: list[bool] = []

        async def action() -> None:
            try:
                if outcome not in ("raise-before-charge", "cancel-before-charge"):
                    self.paid_call(call.cost)
            except PaidCallRefused:
                refused.append(True)
                raise
            if outcome.startswith("raise"):
                raise ActionFailed(outcome)
            if outcome.startswith("cancel"):
                call.box["scope"].cancel()
                await anyio.lowlevel.checkpoint()

        self.portal.call(call.box["send"].send, action)
        assert call.done is not None
        error = call.done.exception(WAIT)
        ok = error is None and call.done.result() == "done"
        if not ok:
            self.note("paid call refused" if refused else outcome)
            assert error is None or isinstance(error, (ActionFailed, PaidCallRefused))
        self.finished(call.spend, ok, "async", look)

    def _pick_async(self, index: int) -> tuple[int, Open]:
        keys = sorted(k for k, o in self.opens.items() if o.mode == "async")
        key = keys[index % len(keys)]
        return key, self.opens.pop(key)

    # -- rules: cancellation while a read is in flight ------------------------------------

    def _cancel_leader(self, leader_cost: int, waiter_cost: int | None) -> None:
        """A caller leads the admission read and is cancelled mid-read; a caller that
        waited on that read must neither hang nor be cancelled: it reads again."""
        self.guard.invalidate()  # so that admission has to read
        self.untaint_if_idle()
        self.note("cancelled leader" + (" with waiter" if waiter_cost is not None else ""))
        self.portal.call(self.gate.hold)
        leader_admitted: concurrent.futures.Future[Spend] = concurrent.futures.Future()
        leader_box: dict[str, Any] = {}
        leader = self.portal.start_task_soon(
            _actor, self.guard, leader_cost, leader_admitted, leader_box
        )
        self.gate.wait_arrivals(1)  # the leader's read is in flight (and held)
        waiter_admitted: concurrent.futures.Future[Spend] = concurrent.futures.Future()
        waiter_box: dict[str, Any] = {}
        waiter = None
        faults, own = self.pending_faults(), self.own()
        if waiter_cost is not None:
            waiter = self.portal.start_task_soon(
                _actor, self.guard, waiter_cost, waiter_admitted, waiter_box
            )
            self.portal.call(_let_others_run)  # the waiter joins the leader's read
        self.portal.call(leader_box["scope"].cancel)
        assert leader.result(WAIT) == "cancelled"
        with pytest.raises(AdmissionCancelled):
            leader_admitted.result(0)
        if waiter is not None:
            self.gate.wait_arrivals(2)  # the waiter leads a new read
        self.portal.call(self.gate.release)
        if waiter is not None:
            assert waiter_cost is not None
            try:
                spend = waiter_admitted.result(WAIT)
            except Exception as exc:
                waiter.exception(WAIT)
                self.refused(waiter_cost, exc, faults, own)
            else:
                self.admitted(waiter_cost, "async", spend)
                self.opens[self.next_id - 1].box = waiter_box
                self.opens[self.next_id - 1].done = waiter

    @precondition(lambda self: any(o.mode == "async" for o in self.opens.values()))
    @rule(index=st.integers(0, MAX_OPEN))
    def cancel_during_refresh(self, index: int) -> None:
        """The action was paid and the block returned; the caller asks for its balance
        after and is cancelled while that read is in flight: the block stays reserved
        (a later ask reads again)."""
        key, call = self._pick_async(index)
        if call.cost > self.fake.balance.total_balance:  # its paid call would be refused
            self.opens[key] = call
            return

        async def action() -> None:
            self.paid_call(call.cost)

        self.portal.call(call.box["send"].send, action)
        assert call.done is not None
        assert call.done.result(WAIT) == "done"
        self.finished(call.spend, True, "async", "no")
        entry = self.settling[-1]
        self.note("cancelled during refresh")
        self.portal.call(self.gate.hold)
        box: dict[str, Any] = {}

        async def ask() -> bool:
            with anyio.CancelScope() as scope:
                box["scope"] = scope
                await call.spend.abalance_after()
            return scope.cancelled_caught

        asking = self.portal.start_task_soon(ask)
        self.gate.wait_arrivals(1)  # the read after the block is in flight (and held)
        self.portal.call(box["scope"].cancel)
        assert asking.result(WAIT) is True
        self.portal.call(self.gate.release)
        assert call.spend._due is entry.reservation  # not read: the next ask reads
        assert not entry.reservation.released

    @precondition(lambda self: any(s.spend._due is not None for s in self.settling))
    @rule(index=st.integers(0, 100), via=st.sampled_from(["property", "async"]))
    def look_later(self, index: int, via: str) -> None:
        """The balance after a block that returned a while ago (maybe settled since by
        another read) is asked for."""
        unread = [s for s in self.settling if s.spend._due is not None]
        self.look(unread[index % len(unread)], via, at_once=False)

    # -- rules: the world ---------------------------------------------------------------

    @rule(
        event=st.sampled_from(
            [
                "outside charge",
                "invalidate",
                "outside charge and invalidate",
                "ttl expires",
                "sync call fails after paying",
                "async call fails after paying",
                "async call spends",
                "async admission waits, outside charge and invalidate",
            ]
        ),
        index=st.integers(0, MAX_OPEN),
        credits=st.integers(1, 60),
        cost=st.integers(0, 40),
        look=st.sampled_from(LOOKS),
    )
    def straddling_read(self, event: str, index: int, credits: int, cost: int, look: str) -> None:
        """A balance read is answered, then delayed; meanwhile the balance changes (or the
        guard is told it may have). When the stale answer arrives it must not be trusted
        beyond what the guard still reserves."""
        faults, own = self.pending_faults(), self.own()
        if event.startswith("async admission"):
            # No usable cache: the caller's admission must wait on the read in flight.
            self.guard.invalidate()
            self.untaint_if_idle()
        self.portal.call(lambda: self.gate.hold(stale=True))
        reader = self.portal.start_task_soon(lambda: self.guard.abalance(refresh=True))
        self.gate.wait_arrivals(1)
        waiting: Open | None = None
        joining: tuple[concurrent.futures.Future[Spend], concurrent.futures.Future[str]] | None
        joining = None
        box: dict[str, Any] = {}
        sync_calls = [k for k, o in self.opens.items() if o.mode == "sync"]
        async_calls = [k for k, o in self.opens.items() if o.mode == "async"]
        if event.startswith("sync call") and sync_calls:
            call = self.opens.pop(sync_calls[index % len(sync_calls)])
            self.note(f"straddled: {event}")
            with contextlib.suppress(PaidCallRefused):
                self.paid_call(call.cost)
            call.spend.__exit__(ActionFailed, ActionFailed(event), None)  # reads nothing
            self.untaint_if_idle()
        elif event.startswith("async call") and async_calls:
            waiting = self.opens.pop(async_calls[index % len(async_calls)])
            self.note(f"straddled: {event}")
            fails = "fails" in event

            async def action() -> None:
                self.paid_call(waiting.cost)
                if fails:
                    raise ActionFailed(event)

            self.portal.call(waiting.box["send"].send, action)
            self.portal.call(_let_others_run)  # it returns while the stale read is held
        else:
            self.note(f"straddled: {event}")
            if event.startswith("async admission") and len(self.opens) < MAX_OPEN:
                admitted: concurrent.futures.Future[Spend] = concurrent.futures.Future()
                done = self.portal.start_task_soon(_actor, self.guard, cost, admitted, box)
                joining = admitted, done
                self.portal.call(_let_others_run)  # it waits on the stale read
            if "outside charge" in event:
                credits = min(credits, self.fake.balance.total_balance)
                if credits:
                    self.fake.charge(credits)
                    self.history.add(self.fake.balance)
                    self.tainted = True
            if "invalidate" in event:
                self.guard.invalidate()
                self.untaint_if_idle()
            if event == "ttl expires":
                self.clock.now += TTL + 1
                self.untaint_if_idle()
        self.portal.call(self.gate.release)
        error = reader.exception(WAIT)
        if error is not None:
            assert isinstance(error, BalanceUnavailable), repr(error)
            assert faults
        else:
            assert reader.result() in self.history
        if waiting is not None:
            assert waiting.done is not None
            failed = waiting.done.exception(WAIT)
            self.finished(waiting.spend, failed is None, "async", look)
        if joining is not None:
            admitted, done = joining
            try:
                spend = admitted.result(WAIT)
            except Exception as exc:
                done.exception(WAIT)
                self.refused(cost, exc, faults, own)
            else:
                self.admitted(cost, "async", spend)
                self.opens[self.next_id - 1].box = box
                self.opens[self.next_id - 1].done = done

    @rule(
        event=st.sampled_from(
            ["outside charge", "invalidate", "ttl expires", "fault", "fault", "recovers"]
        ),
        credits=st.integers(1, 60),
        fault=st.sampled_from(FAULT_KINDS),
        times=st.integers(1, 3),
    )
    def world(
        self, event: str, credits: int, fault: tuple[int | str, dict[str, str]], times: int
    ) -> None:
        """Someone else charges, the guard is invalidated, the TTL runs out, the service
        starts failing (``times`` requests in a row) or recovers."""
        if event == "outside charge":
            credits = min(credits, self.fake.balance.total_balance)
            if credits:
                self.fake.charge(credits)
                self.history.add(self.fake.balance)
                self.tainted = True
                self.note(event)
        elif event == "invalidate":
            self.guard.invalidate()
            self.untaint_if_idle()
        elif event == "ttl expires":
            self.clock.now += TTL + 1
            self.untaint_if_idle()
        elif event == "fault":
            kind, headers = fault
            self.fake.fail_next(kind, times=times, headers=headers)  # type: ignore[arg-type]
        else:
            self.fake.clear_faults()

    @rule(mode=st.sampled_from(["sync", "async", "sync-refresh", "async-refresh"]))
    def read_balance(self, mode: str) -> None:
        faults = self.pending_faults()
        refresh = mode.endswith("refresh")
        try:
            if mode.startswith("sync"):
                balance = self.guard.balance(refresh=refresh)
            else:
                balance = self.portal.call(lambda: self.guard.abalance(refresh=refresh))
        except BalanceUnavailable:
            assert faults
            return
        assert balance in self.history
        if refresh or not self.tainted:
            assert balance == self.fake.balance
        assert not self.waiting()  # it settled every block that returned
        if refresh:
            self.untaint_if_idle()

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def never_overspends(self) -> None:
        assert self.overspends == 0
        if not self.tainted:
            # Every call parked in its block can still be paid.
            assert self.in_block() <= self.fake.balance.total_balance

    @invariant()
    def in_flight_within_the_current_balance(self) -> None:
        balance, fresh = self.current_generation()
        if balance is not None and not self.tainted:
            assert self.in_block() <= balance.total_balance
            if fresh:
                self.check_before(balance)

    @invariant()
    def reservations_match_calls_in_flight(self) -> None:
        cached, reserved, inflight = self.account.snapshot()
        waiting = self.waiting()
        assert reserved == self.in_block() + self.unsettled()
        assert inflight == len(self.opens) + len(waiting)
        if not self.opens and not waiting:
            assert (reserved, inflight) == (0, 0)
        assert reads_in_flight(self.guard) == 0  # no read left behind
        assert cached is None or cached in self.history

    @invariant()
    def a_settled_block_is_in_the_cached_balance(self) -> None:
        """A block's reservation is released only by a read that includes its charge: a
        balance cached at the current generation includes every released block's."""
        balance, _ = self.current_generation()
        for entry in self.settling:
            if entry.reservation.released and balance is not None:
                assert balance.total_balance <= entry.total_after
        # Blocks settled and read are done with.
        self.settling = [
            e for e in self.settling if not e.reservation.released or e.spend._due is not None
        ]

    # -- teardown ------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            for call in list(self.opens.values()):
                if call.mode == "sync":
                    call.spend.__exit__(Interrupted, Interrupted(), None)
                else:
                    self.portal.call(call.box["scope"].cancel)
                    assert call.done is not None
                    call.done.result(WAIT)
            self.opens.clear()
            self.fake.clear_faults()
            self.guard.balance()  # settles every block that returned
            assert not self.waiting()
            _, reserved, inflight = self.account.snapshot()
            assert (reserved, inflight) == (0, 0)
        finally:
            # Whatever a failed step left behind: free the held reads, cancel the tasks.
            self.portal.call(self.gate.release)
            self.portal.call(self.guard.aclose)
            self.portal.call(self.portal.stop, True)
            self._portal_cm.__exit__(None, None, None)
            self.guard.close()
            for clock in self._clocks:
                clock.stop()
            STATS.update({k: STATS.get(k, 0) + v for k, v in self.stats.items()})


STATS: dict[str, int] = {}

MACHINE_SETTINGS = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_guard_state_machine(anyio_backend: str) -> None:
    machine = type(f"GuardMachine_{anyio_backend}", (GuardMachine,), {"backend": anyio_backend})
    STATS.clear()
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
    # The interesting paths were all taken (the examples are derandomized: stable).
    for path in (
        "spent",
        "settles later",
        "looked later",
        "denied",
        "unavailable",
        "refresh failed",
        "outside charge",
        "cancelled leader with waiter",
        "cancelled during refresh",
        "cancel-after-charge",
        "interrupt-after-charge",
        "raise-after-charge",
        "straddled: outside charge and invalidate",
        "straddled: async call spends",
        "straddled: sync call fails after paying",
        "straddled: async admission waits, outside charge and invalidate",
    ):
        assert STATS.get(path, 0) > 0, (path, sorted(STATS.items()))
    print(anyio_backend, STATS)
