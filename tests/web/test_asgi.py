"""creditguard.asgi: the pure ASGI middleware, under asyncio and trio, through httpx's
ASGI transport, Starlette's own test client and raw ASGI calls."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from creditguard import CreditGuard, CreditGuardError, Spend, current_spend
from creditguard.asgi import SPEND_KEY, ActionFailed, CreditGuardMiddleware
from creditguard.testing import FakeLensmor

from .conftest import Clock, Recorder, calls

pytestmark = pytest.mark.anyio

COSTS = {
    "POST /events/{event_id}/unlock": 10,
    "GET /stream": 10,
    "POST /boom": 10,
    "POST /missing": 10,
    "POST /free": 0,
}


def starlette_app(
    fake: FakeLensmor, seen: list[Any], watch: CreditGuard | None = None
) -> Starlette:
    async def unlock(request: Request) -> Response:
        spend = request.state.creditguard_spend
        seen.append((spend, current_spend()))
        if watch is not None:  # the account as the endpoint runs
            seen.append(calls(watch))
        fake.charge(10)
        return JSONResponse({"event": request.path_params["event_id"]})

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                seen.append(f"chunk {i}")
                yield f"chunk {i}\n".encode()
            fake.charge(10)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def boom(request: Request) -> Response:
        raise RuntimeError("the paid call failed")

    async def missing(request: Request) -> Response:
        return JSONResponse({"detail": "no such event"}, status_code=404)

    async def free(request: Request) -> Response:
        seen.append(request.state._state.get(SPEND_KEY))
        return PlainTextResponse("free")

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello " + await websocket.receive_text())
        await websocket.close()

    return Starlette(
        routes=[
            Route("/events/{event_id}/unlock", unlock, methods=["POST"]),
            Route("/stream", stream),
            Route("/boom", boom, methods=["POST"]),
            Route("/missing", missing, methods=["POST"]),
            Route("/free", free, methods=["POST", "GET"]),
            WebSocketRoute("/ws", socket),
        ]
    )


@pytest.fixture
def seen() -> list[Any]:
    return []


@pytest.fixture
def app(fake: FakeLensmor, guard: CreditGuard, seen: list[Any]) -> CreditGuardMiddleware:
    return CreditGuardMiddleware(starlette_app(fake, seen), guard=guard, cost=COSTS)


def client(app: Any) -> httpx.AsyncClient:
    # raise_app_exceptions=False: a raising endpoint answers 500, as under a server.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_paid_route_admits_runs_and_settles(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    app = CreditGuardMiddleware(starlette_app(fake, seen, watch=guard), guard=guard, cost=COSTS)
    async with client(app) as http:
        response = await http.post("/events/ev-1/unlock")
    assert response.status_code == 200
    assert response.json() == {"event": "ev-1"}
    assert events.kinds == ["admitted", "spent"]
    (spend, current), during = seen
    assert isinstance(spend, Spend)
    assert current is spend
    assert spend.cost == 10
    assert spend.balance_before is not None
    assert spend.balance_before.total_balance == 30
    assert during == (10, 1, 0)  # admitted before the endpoint: its cost reserved
    # Settled as a decorated call is: no read of its own (the one read is the admission's,
    # on a cold cache); the spend has exited and its reservation waits for the next read.
    assert fake.balance_requests == 1
    assert spend.balance_after is None
    assert calls(guard) == (10, 1, 1)
    assert fake.balance.total_balance == 20
    assert (await guard.abalance()).total_balance == 20  # that read includes the charge
    assert fake.balance_requests == 2
    assert calls(guard) == (0, 0, 0)


async def test_sequential_requests_read_the_balance_once_per_ttl(clock: Clock) -> None:
    """Requests one after another make one upstream balance read per TTL, not one per
    request; the read after them includes every charge."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    seen: list[Any] = []
    async with CreditGuard(fake.api_key, transport=fake.transport, ttl=60) as guard:
        app = CreditGuardMiddleware(starlette_app(fake, seen), guard=guard, cost=COSTS)
        async with client(app) as http:
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
    befores = [spend.balance_before.total_balance for spend, _ in seen]
    assert befores == [100] * 4 + [60] * 4  # reservations, not the balance, carried the rest


async def test_not_enough_credits_is_402_and_the_endpoint_does_not_run(
    app: CreditGuardMiddleware, fake: FakeLensmor, seen: list[Any]
) -> None:
    async with client(app) as http:
        statuses = [(await http.post(f"/events/ev-{i}/unlock")).status_code for i in range(3)]
        response = await http.post("/events/ev-4/unlock")
    assert statuses == [200, 200, 200]
    assert response.status_code == 402
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["error"] == "insufficient_credits"
    assert body["required"] == 10
    assert body["available"] == 0
    assert body["status"] == 402
    assert body["title"] == "Payment Required"
    assert len(seen) == 3
    assert fake.charges == 3


async def test_rate_limited_balance_is_503_with_retry_after(
    app: CreditGuardMiddleware, fake: FakeLensmor, seen: list[Any]
) -> None:
    fake.fail_next(429, headers={"Retry-After": "30"})
    async with client(app) as http:
        response = await http.post("/events/ev-1/unlock")
    assert response.status_code == 503
    assert response.json()["error"] == "balance_unavailable"
    assert response.headers["retry-after"] == "30"
    assert seen == []


async def test_unreadable_balance_is_503_without_retry_after(
    app: CreditGuardMiddleware, fake: FakeLensmor
) -> None:
    fake.fail_next("not-json")
    async with client(app) as http:
        response = await http.post("/events/ev-1/unlock")
    assert response.status_code == 503
    assert response.json()["error"] == "balance_unavailable"
    assert "retry-after" not in response.headers


async def test_rejected_key_is_500_and_the_key_stays_secret(
    fake: FakeLensmor, seen: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-live-do-not-leak-0123456789"
    wrong = CreditGuard(secret, transport=fake.transport)
    app = CreditGuardMiddleware(starlette_app(fake, seen), guard=wrong, cost=COSTS)
    with caplog.at_level(logging.DEBUG):
        async with client(app) as http:
            response = await http.post("/events/ev-1/unlock")
    assert response.status_code == 500
    assert response.json()["error"] == "credits_misconfigured"
    assert secret not in response.text
    assert caplog.records, "the misconfiguration is logged"
    assert all(secret not in record.getMessage() for record in caplog.records)
    assert seen == []


async def test_on_error_replaces_the_answer(
    fake: FakeLensmor, guard: CreditGuard, seen: list[Any]
) -> None:
    errors: list[CreditGuardError] = []

    def on_error(scope: MutableMapping[str, Any], error: CreditGuardError) -> Response:
        errors.append(error)
        return PlainTextResponse(f"top up: {scope['path']}", status_code=402)

    app = CreditGuardMiddleware(
        starlette_app(fake, seen), guard=guard, cost={"POST /x": 31}, on_error=on_error
    )
    async with client(app) as http:
        response = await http.post("/x")
    assert response.status_code == 402
    assert response.text == "top up: /x"
    assert type(errors[0]).__name__ == "InsufficientCredits"


async def test_async_on_error_returning_none_keeps_the_default(
    fake: FakeLensmor, guard: CreditGuard, seen: list[Any]
) -> None:
    async def on_error(scope: MutableMapping[str, Any], error: CreditGuardError) -> None:
        return None

    app = CreditGuardMiddleware(
        starlette_app(fake, seen), guard=guard, cost={"POST /x": 31}, on_error=on_error
    )
    async with client(app) as http:
        response = await http.post("/x")
    assert response.status_code == 402
    assert response.json()["error"] == "insufficient_credits"


async def test_raising_endpoint_releases_its_credits(
    app: CreditGuardMiddleware, fake: FakeLensmor, events: Recorder
) -> None:
    async with client(app) as http:
        assert (await http.post("/boom")).status_code == 500
        # All 30 credits are free again: three paid calls still fit.
        statuses = [(await http.post(f"/events/ev-{i}/unlock")).status_code for i in range(3)]
    assert statuses == [200, 200, 200]
    assert events.kinds[:2] == ["admitted", "failed"]
    # Starlette answers 500 for the exception, then re-raises it.
    error = events.events[1].error
    assert isinstance(error, (ActionFailed, RuntimeError))


async def test_error_status_is_not_charged_by_default(
    app: CreditGuardMiddleware, events: Recorder
) -> None:
    async with client(app) as http:
        response = await http.post("/missing")
    assert response.status_code == 404
    assert events.kinds == ["admitted", "failed"]
    error = events.events[1].error
    assert isinstance(error, ActionFailed)
    assert error.status == 404


async def test_charge_when_decides_which_statuses_are_spent(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    app = CreditGuardMiddleware(
        starlette_app(fake, seen), guard=guard, cost=COSTS, charge_when=lambda status: True
    )
    async with client(app) as http:
        response = await http.post("/missing")
    assert response.status_code == 404
    assert events.kinds == ["admitted", "spent"]


async def test_free_routes_and_cost_zero_never_read_the_balance(
    app: CreditGuardMiddleware, fake: FakeLensmor, seen: list[Any]
) -> None:
    async with client(app) as http:
        assert (await http.get("/free")).text == "free"  # no pattern: free
        assert (await http.post("/free")).text == "free"  # priced 0
    assert fake.balance_requests == 0
    assert seen == [None, None]


async def test_streaming_response_settles_after_the_last_chunk(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    order: list[str] = []
    events_hook = events

    def record(event: Any) -> None:
        events_hook(event)
        order.append(event.kind)

    observed = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, on_event=record)
    inner = starlette_app(fake, order)
    app = CreditGuardMiddleware(inner, guard=observed, cost=COSTS)
    async with client(app) as http:
        response = await http.get("/stream")
    assert response.text == "chunk 0\nchunk 1\nchunk 2\n"
    assert order == ["admitted", "chunk 0", "chunk 1", "chunk 2", "spent"]
    assert events.events[-1].balance_after is None  # no read of its own
    assert fake.balance_requests == 1  # the admission's
    assert calls(observed) == (10, 1, 1)
    assert (await observed.abalance()).total_balance == 20
    assert calls(observed) == (0, 0, 0)
    await observed.aclose()


async def test_settles_only_after_the_final_body_message_is_sent(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder
) -> None:
    """Raw ASGI: the server has the whole response before the spend exits."""
    log: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        fake.charge(10)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        log.append(f"app returned {calls(guard)}")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        log.append(f"{message['type']} {events.kinds} {calls(guard)}")

    middleware = CreditGuardMiddleware(app, guard=guard, cost={"GET /": 10})
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await middleware(scope, receive, send)
    # (reserved, in flight, settling): the spend runs until the final message is sent.
    assert log == [
        "http.response.start ['admitted'] (10, 1, 0)",
        "http.response.body ['admitted'] (10, 1, 0)",
        "http.response.body ['admitted'] (10, 1, 0)",  # the final message: not settled yet
        "app returned (10, 1, 1)",  # exited once it was sent; waits for a read
    ]
    assert events.kinds == ["admitted", "spent"]
    assert scope["state"][SPEND_KEY].balance_after is None
    assert fake.balance_requests == 1  # the admission's: none after the response
    assert (await guard.abalance()).total_balance == 20
    assert fake.balance_requests == 2
    assert calls(guard) == (0, 0, 0)


async def test_an_app_that_never_finishes_its_response_is_not_charged(
    guard: CreditGuard, events: Recorder
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})

    async def send(message: Any) -> None:
        pass

    middleware = CreditGuardMiddleware(app, guard=guard, cost={"GET /": 10})
    await middleware({"type": "http", "method": "GET", "path": "/"}, None, send)  # type: ignore[arg-type]
    assert events.kinds == ["admitted", "failed"]
    error = events.events[-1].error
    assert isinstance(error, ActionFailed)
    assert error.status == 0


async def test_cancelled_request_releases_its_credits(guard: CreditGuard, events: Recorder) -> None:
    started = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    middleware = CreditGuardMiddleware(app, guard=guard, cost={"GET /": 30})
    async with anyio.create_task_group() as tg:
        tg.start_soon(middleware, {"type": "http", "method": "GET", "path": "/"}, None, None)
        await started.wait()
        tg.cancel_scope.cancel()
    assert events.kinds == ["admitted", "cancelled"]
    async with guard.spend(30):  # all released
        pass


class TenantTransport(httpx.AsyncBaseTransport):
    """One sandbox account per key, behind one transport (as Lensmor has)."""

    def __init__(self, fakes: dict[str, FakeLensmor]) -> None:
        self.fakes = fakes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].removeprefix("Bearer ")
        return await self.fakes[key].transport.handle_async_request(request)


async def test_callable_cost_and_tenant_guards(fake: FakeLensmor, seen: list[Any]) -> None:
    other = FakeLensmor(subscription_balance=5, gift_balance=0, api_key="tenant-b")
    routed = TenantTransport({fake.api_key: fake, other.api_key: other})
    tenants = CreditGuard(fake.api_key, transport=routed, ttl=60)
    keys = {"a": fake.api_key, "b": "tenant-b"}

    def guard_of(scope: Any) -> CreditGuard:
        tenant = dict(scope["headers"])[b"x-tenant"].decode()
        return tenants.for_key(keys[tenant])

    async def price(scope: Any) -> int:
        return 10 if scope["path"].startswith("/events/") else 0

    app = CreditGuardMiddleware(starlette_app(fake, seen), guard=guard_of, cost=price)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as http:
        ok = await http.post("/events/e/unlock", headers={"x-tenant": "a"})
        refused = await http.post("/events/e/unlock", headers={"x-tenant": "b"})
    assert ok.status_code == 200
    assert refused.status_code == 402
    assert refused.json()["available"] == 5


async def _drive(app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[Any]:
    """Run ``app`` on ``scope`` feeding it ``incoming`` messages; what it sent."""
    sent: list[Any] = []
    queue = list(incoming)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_lifespan_and_websockets_pass_through(fake: FakeLensmor, seen: list[Any]) -> None:
    phases: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        phases.append("startup")
        yield
        phases.append("shutdown")

    inner = starlette_app(fake, seen)
    inner.router.lifespan_context = lifespan
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    app = CreditGuardMiddleware(inner, guard=guard, cost=lambda scope: 10)
    sent = await _drive(
        app,
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert phases == ["startup", "shutdown"]
    ws_scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [],
        "scheme": "ws",
        "server": ("testserver", 80),
        "subprotocols": [],
    }
    sent = await _drive(
        app,
        ws_scope,
        [
            {"type": "websocket.connect"},
            {"type": "websocket.receive", "text": "ws"},
        ],
    )
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "hello ws"
    assert fake.balance_requests == 0


def test_arguments_are_checked(guard: CreditGuard) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(TypeError, match="guard"):
        CreditGuardMiddleware(app, guard="key", cost={})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost"):
        CreditGuardMiddleware(app, guard=guard, cost=10)
    with pytest.raises(ValueError, match="upper case"):
        CreditGuardMiddleware(app, guard=guard, cost={"post /x": 1})
    with pytest.raises(ValueError, match=">= 0"):
        CreditGuardMiddleware(app, guard=guard, cost={"POST /x": -1})
    with pytest.raises(TypeError, match="on_error"):
        CreditGuardMiddleware(app, guard=guard, on_error=3)  # type: ignore[arg-type]


async def test_a_bad_cost_callable_is_a_programming_error(guard: CreditGuard) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    middleware = CreditGuardMiddleware(app, guard=guard, cost=lambda scope: "10")
    with pytest.raises(TypeError, match="must be an int"):
        await middleware({"type": "http", "method": "GET", "path": "/"}, None, None)  # type: ignore[arg-type]


def test_problem_bodies_are_compact_json() -> None:
    from creditguard import InsufficientCredits
    from creditguard.web.common import problem_for

    problem = problem_for(InsufficientCredits(10, 3))
    assert problem is not None
    assert json.loads(problem.content())["required"] == 10
    assert problem_for(ValueError("not ours")) is None


def shadowing_app(seen: list[Any]) -> Starlette:
    """``/items/{name}`` is listed first: Starlette runs it for ``/items/free`` too."""

    async def item(request: Request) -> Response:
        seen.append(request.scope.get("state", {}).get(SPEND_KEY))
        return PlainTextResponse("item")

    async def free(request: Request) -> Response:  # pragma: no cover - shadowed
        seen.append("free endpoint")
        return PlainTextResponse("free")

    return Starlette(routes=[Route("/items/{name}", item), Route("/items/free", free)])


async def test_the_route_starlette_runs_is_priced_by_its_own_pattern(
    guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    costs = {"GET /items/{item}": 10, "GET /items/free": 0}
    app = CreditGuardMiddleware(shadowing_app(seen), guard=guard, cost=costs)
    async with client(app) as http:
        assert (await http.get("/items/free")).text == "item"
        assert (await http.head("/items/free")).status_code == 200
    assert len(seen) == 2
    assert all(isinstance(spend, Spend) for spend in seen)
    assert events.kinds == ["admitted", "spent"] * 2


async def test_routes_are_resolved_into_mounts_and_behind_root_path(
    guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    from starlette.routing import Mount

    costs = {"GET /api/items/{item}": 10, "GET /api/items/free": 0}
    inner = shadowing_app(seen)
    app = CreditGuardMiddleware(
        Starlette(routes=[Mount("/api", app=inner)]), guard=guard, cost=costs
    )
    transport = httpx.ASGITransport(app=app, root_path="/prefix")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        # The server's root_path is in scope["path"]; the app routes on what follows it.
        assert (await http.get("/prefix/api/items/free")).text == "item"
    assert [type(spend) for spend in seen] == [Spend]
    assert events.kinds == ["admitted", "spent"]
