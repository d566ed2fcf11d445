"""The ASGI middleware in front of a Starlette or FastAPI router prices a request as the
router routes it: a request the router answers 405 (a method no route of its path takes,
so no endpoint runs) is free, never refused 402 nor reserved."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from creditguard import CreditGuard
from creditguard.asgi import CreditGuardMiddleware
from creditguard.testing import FakeLensmor

from .conftest import Recorder, calls

pytestmark = pytest.mark.anyio


def client(app: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
def poor() -> FakeLensmor:
    """5 credits: no request of 10 can be paid."""
    return FakeLensmor(subscription_balance=5, gift_balance=0)


@pytest.fixture
def poor_guard(poor: FakeLensmor, events: Recorder) -> CreditGuard:
    return CreditGuard(poor.api_key, transport=poor.transport, ttl=60, on_event=events)


async def test_head_on_a_fastapi_get_route_is_405_not_priced(
    poor: FakeLensmor, poor_guard: CreditGuard, events: Recorder
) -> None:
    """FastAPI's routes take exactly their methods: HEAD on a GET route is 405 (unlike
    Starlette's ``Route``, which runs the GET endpoint for HEAD)."""
    api = FastAPI()

    @api.get("/search")
    async def search() -> dict[str, int]:
        return {"found": 1}

    app = CreditGuardMiddleware(api, guard=poor_guard, cost={"GET /search": 10})
    async with client(app) as http:
        assert (await http.head("/search")).status_code == 405
        assert (await http.options("/search")).status_code == 405
        assert (await http.get("/search")).status_code == 402  # the GET itself is priced
    assert events.kinds == ["denied"]
    assert poor.balance_requests == 1
    assert calls(poor_guard) == (0, 0, 0)


async def test_a_method_a_starlette_route_does_not_take_is_free(
    poor: FakeLensmor, poor_guard: CreditGuard, events: Recorder
) -> None:
    async def upload(request: Request) -> Response:  # pragma: no cover - never run
        return PlainTextResponse("uploaded")

    inner = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    outer = Starlette(routes=[Mount("/api", app=inner)])
    app = CreditGuardMiddleware(outer, guard=poor_guard, cost={"/api/upload": 10})
    async with client(app) as http:
        for method in ("GET", "PUT", "DELETE", "OPTIONS"):
            response = await http.request(method, "/api/upload")
            assert response.status_code == 405, method
        assert (await http.post("/api/upload")).status_code == 402
    assert events.kinds == ["denied"]
    assert poor.balance_requests == 1


async def test_a_cors_preflight_is_never_charged(guard: CreditGuard, events: Recorder) -> None:
    """The app's CORS middleware answers the preflight 200 itself; a method-less pattern
    (any method) must not charge it as the paid POST."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    async def search(request: Request) -> Response:
        return PlainTextResponse("found")

    inner = Starlette(
        routes=[Route("/search", search, methods=["POST"])],
        middleware=[Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["POST"])],
    )
    app = CreditGuardMiddleware(inner, guard=guard, cost={"/search": 10})
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with client(app) as http:
        assert (await http.options("/search", headers=preflight)).status_code == 200
        assert events.kinds == []
        assert (await http.post("/search")).status_code == 200
    assert events.kinds == ["admitted", "spent"]
