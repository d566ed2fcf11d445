"""The spending policy through every web adapter: ``subject=`` (a callable of the
request) and the 402 ``allowance_exceeded`` answer, through real framework test clients.

Each adapter prices a route at 40 credits on a guard with ``Allowance(100)``: a user's
two requests are served, the third is answered 402 with ``remaining`` 20, ``resets_at``
and ``Retry-After``, and the body never names the user; another user is still served,
and a request without a subject is checked against the account only."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from creditguard import Allowance, CreditGuard
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend

USER = "alice@example.com"
HEADER = "X-User"


@pytest.fixture
def rich() -> FakeLensmor:
    return FakeLensmor(subscription_balance=10_000, gift_balance=0)


@pytest.fixture
def guard(rich: FakeLensmor, new_backend: NewBackend) -> Iterator[CreditGuard]:
    with CreditGuard(
        rich.api_key,
        transport=rich.transport,
        ttl=60,
        backend=new_backend(),
        allowance=Allowance(100),
    ) as g:
        yield g


Ask = Callable[[str | None], tuple[int, dict[str, str], bytes]]


def check(ask: Ask, rich: FakeLensmor) -> None:
    for _ in range(2):
        status, _, _ = ask(USER)
        assert status == 200
    status, headers, body = ask(USER)
    assert status == 402
    answer = json.loads(body)
    assert answer["error"] == "allowance_exceeded"
    assert answer["remaining"] == 20
    assert answer["required"] == 40
    resets = datetime.fromisoformat(answer["resets_at"])
    assert resets > datetime.now(timezone.utc)
    assert int(headers["retry-after"]) > 0
    assert USER.encode() not in body
    assert b"alice" not in body
    assert ask("bob")[0] == 200  # another user has an allowance of their own
    for _ in range(3):
        assert ask(None)[0] == 200  # no subject: only the account's rules
    assert rich.balance.total_balance == 10_000 - 40 * 6


def _user(headers: Any) -> str | None:
    value = headers.get(HEADER)
    return None if value is None else str(value)


def test_fastapi(guard: CreditGuard, rich: FakeLensmor) -> None:
    from fastapi import Depends, FastAPI, Request
    from fastapi.testclient import TestClient

    from creditguard.fastapi import RequireCredits

    app = FastAPI()

    def subject(request: Request) -> str | None:
        return _user(request.headers)

    @app.post("/search", dependencies=[Depends(RequireCredits(40, guard=guard, subject=subject))])
    def search() -> dict[str, str]:
        rich.charge(40)
        return {"ok": "yes"}

    client = TestClient(app)

    def ask(user: str | None) -> tuple[int, dict[str, str], bytes]:
        response = client.post("/search", headers={HEADER: user} if user else {})
        return response.status_code, dict(response.headers), response.content

    check(ask, rich)


def test_fastapi_async_subject(guard: CreditGuard, rich: FakeLensmor) -> None:
    from fastapi import Depends, FastAPI, Request
    from fastapi.testclient import TestClient

    from creditguard.fastapi import RequireCredits

    app = FastAPI()

    async def subject(request: Request) -> str | None:
        return _user(request.headers)

    @app.post("/search", dependencies=[Depends(RequireCredits(40, guard=guard, subject=subject))])
    async def search() -> dict[str, str]:
        rich.charge(40)
        return {"ok": "yes"}

    client = TestClient(app)

    def ask(user: str | None) -> tuple[int, dict[str, str], bytes]:
        response = client.post("/search", headers={HEADER: user} if user else {})
        return response.status_code, dict(response.headers), response.content

    check(ask, rich)


def test_asgi_middleware(guard: CreditGuard, rich: FakeLensmor) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from creditguard.asgi import CreditGuardMiddleware

    async def search(request: Request) -> JSONResponse:
        rich.charge(40)
        return JSONResponse({"ok": "yes"})

    def subject(scope: Any) -> str | None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        return headers.get(HEADER.lower())

    app = CreditGuardMiddleware(
        Starlette(routes=[Route("/search", search, methods=["POST"])]),
        guard=guard,
        cost={"POST /search": 40},
        subject=subject,
    )
    client = TestClient(app)

    def ask(user: str | None) -> tuple[int, dict[str, str], bytes]:
        response = client.post("/search", headers={HEADER: user} if user else {})
        return response.status_code, dict(response.headers), response.content

    check(ask, rich)


def test_wsgi_middleware(guard: CreditGuard, rich: FakeLensmor) -> None:
    from creditguard.wsgi import CreditGuardMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        rich.charge(40)
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    wrapped = CreditGuardMiddleware(
        app,
        guard=guard,
        cost={"POST /search": 40},
        subject=lambda environ: environ.get("HTTP_X_USER"),
    )
    client = httpx.Client(transport=httpx.WSGITransport(app=wrapped), base_url="http://t")

    def ask(user: str | None) -> tuple[int, dict[str, str], bytes]:
        response = client.post("/search", headers={HEADER: user} if user else {})
        return response.status_code, dict(response.headers), response.content

    check(ask, rich)


def test_flask(guard: CreditGuard, rich: FakeLensmor) -> None:
    from flask import Flask, request

    from creditguard.flask import requires_credits

    app = Flask(__name__)

    @app.post("/search")
    @requires_credits(40, guard=guard, subject=lambda req: req.headers.get(HEADER))
    def search() -> str:
        rich.charge(40)
        return "ok"

    assert request is not None
    client = app.test_client()

    def ask(user: str | None) -> tuple[int, dict[str, str], bytes]:
        response = client.post("/search", headers={HEADER: user} if user else {})
        response.close()  # as a WSGI server does once it sent the body: the spend ends
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status_code, headers, response.get_data()

    check(ask, rich)


def test_django_decorator_and_setting(guard: CreditGuard, rich: FakeLensmor) -> None:
    from django.test import Client, override_settings

    from tests.web import django_urls

    django_urls.state["fake"] = rich

    def ask_with(path: str) -> Ask:
        def ask(user: str | None) -> tuple[int, dict[str, str], bytes]:
            headers = {"HTTP_X_USER": user} if user else {}
            response = Client().post(path, **headers)  # type: ignore[arg-type]
            return response.status_code, dict(response.headers.items()), response.content

        return ask

    try:
        with override_settings(CREDITGUARD={"GUARD": guard}):
            check(ask_with("/policy/decorated"), rich)
        subject = "tests.web.django_urls.user_of"
        costs = {"POST /policy/plain": 40}
        with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": costs, "SUBJECT": subject}):
            status, _, body = ask_with("/policy/plain")(USER)
            assert status == 402  # the decorator's requests spent alice's allowance
            assert json.loads(body)["error"] == "allowance_exceeded"
            assert ask_with("/policy/plain")("carol")[0] == 200
    finally:
        django_urls.state.clear()


def test_a_floor_refusal_does_not_tell_the_floor(rich: FakeLensmor) -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from creditguard.fastapi import RequireCredits

    with CreditGuard(rich.api_key, transport=rich.transport, keep=9_990) as guard:
        app = FastAPI()

        @app.post("/search", dependencies=[Depends(RequireCredits(40, guard=guard))])
        def search() -> dict[str, str]:
            return {"ok": "yes"}

        response = TestClient(app).post("/search")
    assert response.status_code == 402
    body = response.json()
    assert body["error"] == "insufficient_credits"
    assert "keep" not in body
    assert "9990" not in response.text


def test_a_subject_callable_that_is_not_callable_is_refused(guard: CreditGuard) -> None:
    from creditguard.fastapi import RequireCredits

    with pytest.raises(TypeError, match="subject"):
        RequireCredits(40, guard=guard, subject="alice")  # type: ignore[arg-type]
