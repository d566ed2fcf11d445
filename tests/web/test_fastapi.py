"""creditguard.fastapi: the RequireCredits dependency, on asyncio and trio."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# refer to local guards.

import inspect
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from creditguard import CreditGuard, CreditGuardError, Spend, current_spend
from creditguard.fastapi import ActionFailed, RequireCredits
from creditguard.testing import FakeLensmor

from .conftest import Clock, Recorder, calls

pytestmark = pytest.mark.anyio


def make_app(fake: FakeLensmor, guard: CreditGuard, seen: list[Any]) -> FastAPI:
    app = FastAPI()

    @app.post("/events/{event_id}/unlock", dependencies=[Depends(RequireCredits(10, guard=guard))])
    async def unlock(event_id: str) -> dict[str, str]:
        seen.append(current_spend())
        seen.append(calls(guard))  # the account as the endpoint runs
        fake.charge(10)
        return {"event": event_id}

    @app.post("/search")
    def search(spend: Annotated[Spend, Depends(RequireCredits(10, guard=guard))]) -> dict[str, Any]:
        seen.append(spend)
        seen.append(current_spend())  # a sync endpoint, in the threadpool
        fake.charge(10)
        return {"before": spend.balance_before.total_balance if spend.balance_before else None}

    async def per_item(request: Request) -> int:
        return 5 * int(request.query_params["n"])

    @app.post("/bulk")
    async def bulk(spend: Annotated[Spend, Depends(RequireCredits(per_item, guard=guard))]) -> int:
        fake.charge(spend.cost)
        return spend.cost

    @app.post("/missing", dependencies=[Depends(RequireCredits(10, guard=guard))])
    async def missing() -> None:
        raise HTTPException(404, "no such event")

    @app.post("/moved", dependencies=[Depends(RequireCredits(10, guard=guard))])
    async def moved() -> None:
        fake.charge(10)
        raise HTTPException(303, headers={"location": "/elsewhere"})

    @app.post("/boom", dependencies=[Depends(RequireCredits(10, guard=guard))])
    async def boom() -> None:
        raise RuntimeError("the paid call failed")

    @app.get("/stream", dependencies=[Depends(RequireCredits(10, guard=guard))])
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                seen.append(f"chunk {i}")
                yield b"x"
            fake.charge(10)

        return StreamingResponse(chunks())

    @app.get("/free")
    async def free(spend: Annotated[Spend, Depends(RequireCredits(0, guard=guard))]) -> int:
        seen.append(spend)
        return spend.cost

    return app


@pytest.fixture
def seen() -> list[Any]:
    return []


@pytest.fixture
def app(fake: FakeLensmor, guard: CreditGuard, seen: list[Any]) -> FastAPI:
    return make_app(fake, guard, seen)


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_dependencies_list_guards_and_current_spend_sees_it(
    app: FastAPI, fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    async with client(app) as http:
        response = await http.post("/events/ev-1/unlock")
    assert response.status_code == 200
    assert response.json() == {"event": "ev-1"}
    assert events.kinds == ["admitted", "spent"]
    spend, during = seen
    assert isinstance(spend, Spend)
    assert spend.cost == 10
    assert spend.balance_before is not None
    assert spend.balance_before.total_balance == 30
    assert during == (10, 1, 0)  # admitted before the endpoint: its cost reserved
    # Settled as a decorated call is: no read of its own (the one read is the admission's,
    # on a cold cache); the spend has exited and its reservation waits for the next read.
    assert fake.balance_requests == 1
    assert spend.balance_after is None
    assert calls(guard) == (10, 1, 1)
    assert (await guard.abalance()).total_balance == 20  # that read includes the charge
    assert fake.balance_requests == 2
    assert calls(guard) == (0, 0, 0)


async def test_sequential_requests_read_the_balance_once_per_ttl(clock: Clock) -> None:
    """Requests one after another make one upstream balance read per TTL, not one per
    request; the read after them includes every charge."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    seen: list[Any] = []
    async with CreditGuard(fake.api_key, transport=fake.transport, ttl=60) as guard:
        async with client(make_app(fake, guard, seen)) as http:
            for i in range(4):
                assert (await http.post(f"/events/a{i}/unlock")).status_code == 200
            assert fake.balance_requests == 1  # the first admission's (a cold cache)
            assert calls(guard) == (40, 4, 4)
            clock.advance(61)  # the cached balance has outlived its TTL
            for i in range(4):
                assert (await http.post(f"/events/b{i}/unlock")).status_code == 200
            assert fake.balance_requests == 2  # one more admission read settled a0..a3
            assert calls(guard) == (40, 4, 4)
        assert (await guard.abalance()).total_balance == 20 == fake.balance.total_balance
        assert fake.balance_requests == 3
        assert calls(guard) == (0, 0, 0)
    befores = [spend.balance_before.total_balance for spend in seen[::2]]
    assert befores == [100] * 4 + [60] * 4  # reservations, not the balance, carried the rest


async def test_annotated_dependency_value_is_the_spend(
    app: FastAPI, events: Recorder, seen: list[Any]
) -> None:
    async with client(app) as http:
        response = await http.post("/search")
    assert response.json() == {"before": 30}
    spend, current = seen
    assert current is spend
    assert events.kinds == ["admitted", "spent"]


async def test_callable_cost_receives_the_request(app: FastAPI, fake: FakeLensmor) -> None:
    async with client(app) as http:
        assert (await http.post("/bulk", params={"n": 3})).json() == 15
        refused = await http.post("/bulk", params={"n": 4})
    assert refused.status_code == 402
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json() == {
        "type": "about:blank",
        "title": "Payment Required",
        "status": 402,
        "detail": "this request needs 20 Lensmor credits; 15 are available",
        "error": "insufficient_credits",
        "required": 20,
        "available": 15,
        "reserved": 0,
    }
    assert fake.balance.total_balance == 15


async def test_503_with_retry_after_and_500_for_a_rejected_key(
    app: FastAPI, fake: FakeLensmor, seen: list[Any]
) -> None:
    fake.fail_next(429, headers={"Retry-After": "12"})
    async with client(app) as http:
        unavailable = await http.post("/events/e/unlock")
        fake.fail_next(401)
        rejected = await http.post("/events/e/unlock")
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after"] == "12"
    assert unavailable.json()["error"] == "balance_unavailable"
    assert rejected.status_code == 500
    assert rejected.json()["error"] == "credits_misconfigured"
    assert fake.api_key not in rejected.text
    assert seen == []


async def test_http_exception_is_not_charged_unless_charge_when_says_so(
    app: FastAPI, fake: FakeLensmor, events: Recorder
) -> None:
    async with client(app) as http:
        assert (await http.post("/missing")).status_code == 404
        assert (await http.post("/moved", follow_redirects=False)).status_code == 303
    assert events.kinds == ["admitted", "failed", "admitted", "spent"]
    assert isinstance(events.events[1].error, HTTPException)
    assert fake.balance.total_balance == 20


async def test_raising_endpoint_releases(app: FastAPI, events: Recorder) -> None:
    async with client(app) as http:
        assert (await http.post("/boom")).status_code == 500
        statuses = [(await http.post(f"/events/{i}/unlock")).status_code for i in range(3)]
    assert statuses == [200, 200, 200]
    assert events.kinds[:2] == ["admitted", "failed"]
    assert isinstance(events.events[1].error, RuntimeError)


async def test_streaming_settles_after_the_last_chunk(fake: FakeLensmor, seen: list[Any]) -> None:
    order: list[str] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=lambda e: order.append(e.kind)
    )
    app = make_app(fake, guard, order)
    async with client(app) as http:
        assert (await http.get("/stream")).content == b"xxx"
    assert order == ["admitted", "chunk 0", "chunk 1", "chunk 2", "spent"]


async def test_cost_zero_reads_nothing(app: FastAPI, fake: FakeLensmor, seen: list[Any]) -> None:
    async with client(app) as http:
        assert (await http.get("/free")).json() == 0
    assert fake.balance_requests == 0
    assert seen[0].balance_before is None


async def test_on_error_chooses_the_exception(fake: FakeLensmor, guard: CreditGuard) -> None:
    app = FastAPI()

    def on_error(request: Request, error: CreditGuardError) -> Exception:
        return HTTPException(402, f"top up to use {request.url.path}")

    @app.post("/x", dependencies=[Depends(RequireCredits(31, guard=guard, on_error=on_error))])
    async def x() -> None:
        raise AssertionError("not admitted")

    async with client(app) as http:
        response = await http.post("/x")
    assert response.status_code == 402
    assert response.json() == {"detail": "top up to use /x"}


async def test_tenant_guard_callable_and_async_guard_callable(fake: FakeLensmor) -> None:
    guard = CreditGuard("other-key", transport=fake.transport)

    async def tenant(request: Request) -> CreditGuard:
        return guard.for_key(request.headers["x-lensmor-key"])

    app = FastAPI()

    @app.post("/x", dependencies=[Depends(RequireCredits(10, guard=tenant))])
    async def x() -> str:
        return "ok"

    async with client(app) as http:
        good = await http.post("/x", headers={"x-lensmor-key": fake.api_key})
        bad = await http.post("/x", headers={"x-lensmor-key": "stolen"})
    assert good.status_code == 200
    assert bad.status_code == 500


async def test_default_guard_comes_from_the_environment(
    fake: FakeLensmor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from creditguard.guard import guard as _guard
    from creditguard.testing import serve

    with serve(fake.app) as url:
        monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
        monkeypatch.setenv("LENSMOR_BASE_URL", url)
        monkeypatch.setattr(_guard, "_default", None)
        app = FastAPI()

        @app.post("/x", dependencies=[Depends(RequireCredits(10))])
        async def x() -> str:
            return "ok"

        async with client(app) as http:
            response = await http.post("/x")
        default = _guard._default
        assert default is not None
        assert default.base_url == url
        assert fake.balance_requests == 1  # the admission's; no refresh after the response
        assert calls(default) == (10, 1, 1)  # the spend waits for a read
        assert (await default.abalance()).total_balance == 30  # /x charged nothing
        assert fake.balance_requests == 2
        assert calls(default) == (0, 0, 0)
        await default.aclose()
    assert response.status_code == 200


def test_signature_injects_only_the_request() -> None:
    dep = RequireCredits(3)
    params = inspect.signature(dep).parameters
    assert list(params) == ["request"]
    assert params["request"].annotation is Request
    assert repr(dep) == "RequireCredits(3)"
    with pytest.raises(ValueError, match=">= 0"):
        RequireCredits(-1)
    with pytest.raises(TypeError, match="guard"):
        RequireCredits(1, guard="key")  # type: ignore[arg-type]


async def test_actionfailed_is_exported() -> None:
    assert issubclass(ActionFailed, CreditGuardError)
    await anyio.lowlevel.checkpoint()
