from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor, serve

if TYPE_CHECKING:
    import redis

    from creditguard.testing._postgres_server import PostgresServer
    from creditguard.testing._redis_topologies import ClusterNodes
    from tests.helpers import NewBackend


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
    from creditguard.testing._redis_server import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test session (``initdb`` into a temporary directory,
    ``postgres`` on a free loopback port; the tests fail, never skip, when it cannot be
    started). ``postgres.dsn`` connects to it; ``postgres.stop()`` and ``postgres.start()``
    make an outage and a recovery (its data kept)."""
    from creditguard.testing._postgres_server import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterNodes]:
    """A Redis Cluster of this test session: three ``redis-server --cluster-enabled yes``
    masters on free loopback ports, joined by ``redis-cli --cluster create`` (the tests
    fail when they cannot be started). Tests may restart a node or move a slot: the
    cluster serves every slot afterwards."""
    from creditguard.testing._redis_topologies import redis_cluster

    with redis_cluster() as nodes:
        yield nodes


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


@pytest.fixture(params=["memory", "redis"])
def new_backend(request: pytest.FixtureRequest) -> Iterator[NewBackend]:
    """Run the test once per state backend. The test receives a factory of backends of the
    kind under test and passes one to each guard it builds,
    ``CreditGuard(..., backend=new_backend())``: each call makes a new backend, in memory
    or in the session's real redis-server (a fresh key prefix each, so tests do not share
    state). Mark tests that look inside the memory backend ``@pytest.mark.memory_only``."""
    if request.param == "memory":
        from creditguard import MemoryBackend

        yield MemoryBackend
        return
    import uuid

    from creditguard.redis import RedisBackend

    url = request.getfixturevalue("redis_url")
    backends: list[RedisBackend] = []

    def make() -> RedisBackend:
        backend = RedisBackend(url, prefix=f"test-{uuid.uuid4().hex[:12]}:")
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``memory_only`` looks inside the memory backend: it is collected for
    that backend only. Its Redis combination is deselected (pytest's summary counts it
    among the deselected), not skipped.

    The order is for pytest-xdist's two workers (``--maxschedchunk 1``: each is handed its
    next test when it finishes one, so the order is the order they start in). The slow tests
    (marked ``slow``) go first, so that the short tests fill in around them; then the first
    test that reads the benchmark smoke run (``smoke``, made once per session under a lock),
    so that one worker makes it early while the other goes on; the other tests that read it
    go last, when it is there to read. The order within each of these is kept."""

    def redis_only_inside(item: pytest.Item) -> bool:
        callspec = getattr(item, "callspec", None)
        return (
            callspec is not None
            and callspec.params.get("new_backend") == "redis"
            and item.get_closest_marker("memory_only") is not None
        )

    deselected = [item for item in items if redis_only_inside(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: tell the controller (below)
        workeroutput["creditguard_deselected"] = [item.nodeid for item in deselected]
    kept = [item for item in items if not redis_only_inside(item)]

    first_smoke = next((item for item in kept if "smoke" in _fixtures(item)), None)

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is not None:
            return 0
        if item is first_smoke:
            return 1
        return 3 if "smoke" in _fixtures(item) else 2

    items[:] = sorted(kept, key=rank)  # stable: the order within a rank is kept


def _fixtures(item: pytest.Item) -> list[str]:
    names: list[str] = getattr(item, "fixturenames", [])
    return names


_deselected_reported = False


class _Deselected:
    """A test a worker deselected, as the controller knows it (by its node id)."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """Under pytest-xdist the workers collect and deselect; the controller's summary
    counts what they deselected (once: every worker collects the same tests)."""
    global _deselected_reported
    nodeids = getattr(node, "workeroutput", {}).get("creditguard_deselected")
    if _deselected_reported or nodeids is None:
        return
    _deselected_reported = True
    if nodeids:
        node.config.hook.pytest_deselected(items=[_Deselected(n) for n in nodeids])


@pytest.fixture(autouse=True)
def _no_spend_left_current() -> Iterator[None]:
    """A test that leaves a guarded block entered in this thread's context (never exited)
    would make it the ``current_spend()`` of every later test run by this process: such a
    test errors here, and the block is dropped from the context."""
    from creditguard.core.calls import current as _current

    assert _current.get() is None or not _current.get()._active  # type: ignore[union-attr]
    yield
    left = _current.get()
    while left is not None and not left._active:
        left = left._outer
    _current.set(None)
    assert left is None, f"the test left a guarded block entered: {left!r}"
