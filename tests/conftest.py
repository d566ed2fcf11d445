from __future__ import annotations

from collections.abc import Iterator

import pytest

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor, serve


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def fake() -> FakeLensmor:
    return FakeLensmor()


@pytest.fixture
def guard(fake: FakeLensmor) -> Iterator[CreditGuard]:
    with CreditGuard(fake.api_key, transport=fake.transport, ttl=60) as g:
        yield g


@pytest.fixture
def served(fake: FakeLensmor) -> Iterator[str]:
    """The sandbox over real loopback HTTP (uvicorn); yields its base URL."""
    with serve(fake.app) as url:
        yield url
