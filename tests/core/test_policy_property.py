"""Hypothesis: spends, holds, failures, reports (charged less than declared) and window
ends interleaved never admit more than ``balance - keep``, nor more than any subject's
allowance in any window. The sandbox refuses (raises) a charge the account cannot pay,
and the model checks every subject's window and the floor after each step.

Windows are an hour long and the clock they are worked out on is the test's
(``creditguard.core.spending._now``), far ahead of the real one, so that Redis, which
expires a window's books by its own clock a day after the window's end, keeps them."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta
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

import creditguard.core.spending as spending
from creditguard import (
    AdmissionTimeout,
    Allowance,
    AllowanceExceeded,
    CreditGuard,
    Hold,
    InsufficientCredits,
)
from creditguard.testing import FakeLensmor

BALANCE, KEEP, LIMIT = 400, 60, 150
HOUR = 3600.0
SUBJECTS = ["a", "b", None]


class Boom(Exception):
    pass


class _Open:
    def __init__(self, hold: Hold, subject: str | None, window: int) -> None:
        self.hold = hold
        self.subject = subject
        self.window = window
        self.charged = 0


class PolicyMachine(RuleBasedStateMachine):
    redis_url: str | None = None  # set: the Redis backend on that server

    def __init__(self) -> None:
        super().__init__()
        self.now = 4_102_444_800.0  # 2100-01-01, whole hours from the epoch
        self.patch = mock.patch.object(spending, "_now", self.clock)
        self.patch.start()
        self.fake = FakeLensmor(subscription_balance=BALANCE, gift_balance=0)
        self.backend = None
        if self.redis_url is not None:
            from creditguard.redis import RedisBackend

            self.backend = RedisBackend(self.redis_url, prefix=f"pol-{uuid.uuid4().hex[:10]}:")
        self.guard = CreditGuard(
            self.fake.api_key,
            transport=self.fake.transport,
            ttl=10_000,
            admission_timeout=0,
            backend=self.backend,
            keep=KEEP,
            allowance=Allowance(LIMIT, per=timedelta(hours=1)),
        )
        self.open: list[_Open] = []
        self.spent = 0
        # what each subject's calls were charged, by window (the model)
        self.charged: dict[tuple[str, int], int] = defaultdict(int)

    def clock(self) -> float:
        return self.now

    def teardown(self) -> None:
        self.patch.stop()
        self.guard.close()
        if self.backend is not None:
            self.backend.close()

    @property
    def window(self) -> int:
        return int(self.now // HOUR)

    def _charge(self, n: int, subject: str | None, window: int) -> None:
        self.fake.charge(n)  # raises when the account cannot pay: an overspend
        self.spent += n
        if subject is not None:
            self.charged[subject, window] += n

    @rule(
        subject=st.sampled_from(SUBJECTS),
        cost=st.integers(0, 90),
        charge=st.integers(0, 90),
        outcome=st.sampled_from(["charged", "reported", "failed"]),
    )
    def spend(self, subject: str | None, cost: int, charge: int, outcome: str) -> None:
        window = self.window
        try:
            block = self.guard.spend(cost, subject=subject)
            block.__enter__()
        except (InsufficientCredits, AdmissionTimeout):
            return
        if outcome == "failed":
            block.__exit__(Boom, Boom(), None)
            return
        n = min(cost, charge)
        try:
            self._charge(n, subject, window)
            if outcome == "reported":
                block.report({"creditsUsed": n})
        finally:
            block.__exit__(None, None, None)
        if outcome != "reported" and subject is not None:
            # no report: the subject is charged its declared cost
            self.charged[subject, window] += cost - n

    @rule(subject=st.sampled_from(SUBJECTS), cost=st.integers(0, 90))
    def hold(self, subject: str | None, cost: int) -> None:
        try:
            hold = self.guard.hold(cost, subject=subject, expires_in=600)
        except (InsufficientCredits, AdmissionTimeout):
            return
        self.open.append(_Open(hold, subject, self.window))

    @precondition(lambda self: self.open)
    @rule(data=st.data(), charge=st.integers(0, 90))
    def settle(self, data: st.DataObject, charge: int) -> None:
        held = data.draw(st.sampled_from(self.open))
        self.open.remove(held)
        n = min(held.hold.cost, charge)
        self._charge(n, held.subject, held.window)
        held.hold.settle({"creditsUsed": n})

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(self.open))
        self.open.remove(held)
        held.hold.release()

    @rule(hours=st.integers(1, 2))
    def window_ends(self, hours: int) -> None:
        self.now += hours * HOUR

    @invariant()
    def never_past_the_floor_nor_an_allowance(self) -> None:
        assert self.fake.balance.total_balance == BALANCE - self.spent >= KEEP
        for (subject, window), charged in self.charged.items():
            assert charged <= LIMIT, (subject, window)
        for subject in ("a", "b"):
            usage = self.guard.usage(subject)
            assert usage.spent == self.charged.get((subject, self.window), 0)
            assert usage.reserved == sum(
                h.hold.cost for h in self.open if h.subject == subject and h.window == self.window
            )
            try:
                with self.guard.spend(usage.remaining + 1, subject=subject):
                    pass  # pragma: no cover - the window is full
                raise AssertionError("admitted past the allowance")
            except (AllowanceExceeded, AdmissionTimeout):
                pass
            except InsufficientCredits:
                pass  # the account is short first


PolicyMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
test_no_interleaving_passes_the_floor_or_an_allowance = PolicyMachine.TestCase


class RedisPolicyMachine(PolicyMachine):
    pass


def test_no_interleaving_passes_the_floor_or_an_allowance_on_redis(redis_url: str) -> None:
    RedisPolicyMachine.redis_url = redis_url
    run_state_machine_as_test(
        RedisPolicyMachine,
        settings=settings(max_examples=15, stateful_step_count=20, deadline=None),
    )
