from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor, serve

if TYPE_CHECKING:
    import redis


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


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server of this test session (a real one, started on a free loopback port;
    the tests fail when it cannot be started); yields its URL."""
    from tests.redis_server import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A sync client of the session's redis-server, its database flushed."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()
