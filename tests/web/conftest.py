"""Fixtures for the framework adapter tests: a sandbox, a guard that records its events,
and Django configured once for the whole process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest

from creditguard import CreditGuard, GuardEvent, RetryPolicy
from creditguard.backends.memory import base as memory_base
from creditguard.backends.memory import commitments as memory_commitments
from creditguard.backends.memory import reads as memory_reads
from creditguard.backends.memory import reservations as memory_reservations
from creditguard.testing import FakeLensmor


def _configure_django() -> None:
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="creditguard-tests",
        ALLOWED_HOSTS=["testserver", "127.0.0.1", "localhost"],
        ROOT_URLCONF="tests.web.django_urls",
        MIDDLEWARE=["creditguard.django.CreditGuardMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    import django

    django.setup()


_configure_django()


class Recorder:
    """The guard's events, in order; ``kinds`` is their kinds."""

    def __init__(self) -> None:
        self.events: list[GuardEvent] = []

    def __call__(self, event: GuardEvent) -> None:
        self.events.append(event)

    @property
    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]


@pytest.fixture
def fake() -> FakeLensmor:
    """30 credits: three calls of 10."""
    return FakeLensmor(subscription_balance=30, gift_balance=0)


@pytest.fixture
def events() -> Recorder:
    return Recorder()


@pytest.fixture
def guard(fake: FakeLensmor, events: Recorder) -> Iterator[CreditGuard]:
    with CreditGuard(
        fake.api_key,
        transport=fake.transport,
        ttl=60,
        on_event=events,
        retry=RetryPolicy(attempts=1),
    ) as g:
        yield g


def calls(guard: CreditGuard) -> tuple[int, int, int]:
    """``(reserved, in_flight, settling)`` of the guard's account now (no request).

    A request's spend runs as ``(cost, 1, 0)``; once its response is sent it has exited
    and waits for a read as ``(cost, 1, 1)`` (a spend waiting for a read still counts in
    flight); a read that includes it settles it: ``(0, 0, 0)``.
    """
    snap = guard.snapshot()
    return snap.reserved, snap.in_flight, snap.settling


class Clock:
    """The memory backend's monotonic clock, moved by the test (``advance``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Iterator[Clock]:
    """A clock the memory backend reads instead of ``time.monotonic`` (cache ages, hold
    deadlines): a test says when the cached balance's TTL has passed."""
    moved = Clock()
    with contextlib.ExitStack() as stack:
        for module in (memory_base, memory_reads, memory_reservations, memory_commitments):
            stack.enter_context(mock.patch.object(module, "_monotonic", moved))
        yield moved
