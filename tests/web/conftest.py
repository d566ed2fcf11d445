"""Fixtures for the framework adapter tests: a sandbox, a guard that records its events,
and Django configured once for the whole process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from creditguard import CreditGuard, GuardEvent, RetryPolicy
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
