"""Hypothesis: holds, spends, settles, releases and expiries interleaved never admit more
than the balance. Every charge the model makes is one the guard admitted, and the sandbox
refuses (raises) any charge the account cannot pay, so an overspend fails the run.

On the memory backend time is the test's (the backend's clock is replaced), so a hold
expires exactly when the machine says. On Redis, whose clock is the server's, the machine's
expiries are holds taken for 50 ms, then waited out; every other hold lives for minutes."""

from __future__ import annotations

import time
import uuid
from unittest import mock

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import creditguard.backends.memory.base as memory_base
import creditguard.backends.memory.commitments as memory_commitments
import creditguard.backends.memory.reads as memory_reads
import creditguard.backends.memory.reservations as memory_reservations
from creditguard import CreditGuard, Hold, InsufficientCredits
from creditguard.testing import FakeLensmor
from tests.helpers import reserved


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Open:
    def __init__(self, hold: Hold, due: float) -> None:
        self.hold = hold
        self.due = due
        self.charged = 0


class HoldsMachine(RuleBasedStateMachine):
    redis_url: str | None = None  # set: the Redis backend on that server

    def __init__(self) -> None:
        super().__init__()
        self.clock = _Clock()
        self.patches = []
        self.fake = FakeLensmor(subscription_balance=200, gift_balance=0)
        backend = None
        if self.redis_url is not None:
            from creditguard.redis import RedisBackend

            backend = self.backend = RedisBackend(
                self.redis_url, prefix=f"prop-{uuid.uuid4().hex[:10]}:"
            )
        else:
            self.patches = [
                mock.patch.object(module, "_monotonic", self.clock)
                for module in (memory_base, memory_reads, memory_reservations, memory_commitments)
            ]
        for patch in self.patches:
            patch.start()
        self.guard = CreditGuard(
            self.fake.api_key,
            transport=self.fake.transport,
            ttl=10_000,
            admission_timeout=0,
            backend=backend,
        )
        self.open: list[_Open] = []
        self.unread = 0  # credits of the blocks that returned since the last read
        self.spent = 0

    def teardown(self) -> None:
        for patch in self.patches:
            patch.stop()
        if self.redis_url is not None:
            self.guard.close()
            self.backend.close()

    def _charge(self, n: int) -> None:
        self.fake.charge(n)  # raises when the account cannot pay: an overspend
        self.spent += n

    @rule(cost=st.integers(0, 120), charge=st.integers(0, 120), look=st.booleans())
    def spend(self, cost: int, charge: int, look: bool) -> None:
        try:
            spend = self.guard.spend(cost)
            spend.__enter__()
        except InsufficientCredits:
            return
        try:
            self._charge(min(cost, charge))
        finally:
            spend.__exit__(None, None, None)
        # The block settles later: its credits stay reserved until a read includes it.
        self.unread += cost
        if look:  # its balance after: a read that includes it (and every block before)
            after = spend.balance_after
            assert after is not None
            assert after.total_balance == 200 - self.spent
            self.unread = 0

    @rule()
    def read(self) -> None:
        # It reads when blocks wait for a read (its balance then includes them all); the
        # cached balance may not include what open holds' work charged since.
        assert self.guard.balance().total_balance >= 200 - self.spent
        self.unread = 0  # every block that returned is settled: nothing left reserved

    @rule(cost=st.integers(0, 120), life=st.integers(1, 100))
    def hold(self, cost: int, life: int) -> None:
        if self.redis_url is not None:
            life = 600  # on Redis, expiries are the expire_now rule's
        try:
            hold = self.guard.hold(cost, expires_in=life)
        except InsufficientCredits:
            return
        self.open.append(_Open(hold, self.clock.now + life))

    @precondition(lambda self: self.redis_url is not None)
    @rule(cost=st.integers(0, 120), charge=st.integers(0, 120))
    def expire_now(self, cost: int, charge: int) -> None:
        """On Redis: a hold that expires (its work charged first, maybe), among the others."""
        try:
            hold = self.guard.hold(cost, expires_in=0.05)
        except InsufficientCredits:
            return
        self._charge(min(cost, charge))
        time.sleep(0.12)  # its life, waited out on the server's clock
        del hold

    @precondition(lambda self: self.open)
    @rule(data=st.data(), charge=st.integers(0, 120))
    def work(self, data: st.DataObject, charge: int) -> None:
        held = data.draw(st.sampled_from(self.open))
        n = min(held.hold.cost - held.charged, charge)
        self._charge(n)
        held.charged += n

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(self.open))
        self.open.remove(held)
        after = held.hold.settle()
        assert after is not None
        assert after.total_balance == 200 - self.spent
        if self.redis_url is None:  # a read after every block: it settled them
            self.unread = 0

    @precondition(lambda self: any(not h.charged for h in self.open))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from([h for h in self.open if not h.charged]))
        self.open.remove(held)
        held.hold.release()

    @precondition(lambda self: self.open and self.redis_url is None)
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(self.open))
        self.clock.now = max(self.clock.now, held.due)
        for other in list(self.open):
            if other.due <= self.clock.now:
                self.open.remove(other)

    @invariant()
    def holds_hold_what_they_say(self) -> None:
        held = sum(h.hold.cost for h in self.open)
        # Blocks that returned hold their credits until a read includes them (some
        # admission may have made one since).
        assert held <= reserved(self.guard) <= held + self.unread
        if not self.unread:
            assert reserved(self.guard) == held
        assert self.fake.balance.total_balance == 200 - self.spent >= 0


HoldsMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_holds_never_admit_more_than_the_balance = HoldsMachine.TestCase


class RedisHoldsMachine(HoldsMachine):
    pass


def test_holds_never_admit_more_than_the_balance_on_redis(redis_url: str) -> None:
    RedisHoldsMachine.redis_url = redis_url
    run_state_machine_as_test(
        RedisHoldsMachine,
        settings=settings(max_examples=12, stateful_step_count=20, deadline=None),
    )
