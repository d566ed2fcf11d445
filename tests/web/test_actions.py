"""What the metrics and the ledger call a guarded request (``creditguard.action``): its
method and the route pattern the framework routed it to, never its path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from creditguard import CreditGuard
from creditguard.core.observe import Entry
from creditguard.testing import FakeLensmor


class Actions:
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def begin(self, engine: Any, call: Any) -> object:
        return None

    def decided(self, *args: Any) -> None:
        pass

    def ended(self, engine: Any, call: Any, token: object, entry: Entry) -> None:
        self.seen.append(entry.action)

    def read(self, *args: Any) -> None:
        pass


@pytest.fixture
def actions() -> Actions:
    return Actions()


@pytest.fixture
def guard(actions: Actions) -> Iterator[CreditGuard]:
    fake = FakeLensmor()
    with CreditGuard(fake.api_key, transport=fake.transport, ledger=actions) as g:
        yield g


def test_fastapi(guard: CreditGuard, actions: Actions) -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from creditguard.fastapi import RequireCredits

    app = FastAPI()

    @app.post("/events/{event_id}/unlock", dependencies=[Depends(RequireCredits(5, guard=guard))])
    def unlock(event_id: str) -> dict[str, str]:
        return {"event": event_id}

    client = TestClient(app)
    assert client.post("/events/e-41/unlock").status_code == 200
    assert client.post("/events/e-42/unlock").status_code == 200
    assert actions.seen == ["POST /events/{event_id}/unlock"] * 2


def test_asgi_middleware(guard: CreditGuard, actions: Actions) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from creditguard.asgi import CreditGuardMiddleware

    async def unlock(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = CreditGuardMiddleware(
        Starlette(routes=[Route("/events/{event_id}/unlock", unlock, methods=["POST"])]),
        guard=guard,
        cost={"POST /events/{event_id}/unlock": 5},
    )
    assert TestClient(app).post("/events/e-7/unlock").status_code == 200
    assert actions.seen == ["POST /events/{event_id}/unlock"]


def test_flask(guard: CreditGuard, actions: Actions) -> None:
    from flask import Flask

    from creditguard.flask import requires_credits

    app = Flask(__name__)

    @app.post("/events/<event_id>/unlock")
    @requires_credits(5, guard=guard)
    def unlock(event_id: str) -> str:
        return event_id

    response = app.test_client().post("/events/e-9/unlock")
    response.close()
    assert response.status_code == 200
    assert actions.seen == ["POST /events/<event_id>/unlock"]
