"""The spending policy through every web adapter: ``subject=`` (who a request spends for)
and the 402 answers of an allowance used up (``allowance_exceeded``, ``Retry-After``,
never the subject's id), of a budget, and of the floor (``keep``: not shown).

Each adapter runs the same story through its framework's own test client, on the memory
backend and a real redis-server: a guard with ``Allowance(100)``, a route costing 40, the
subject read from the ``X-User`` header. Alice is served twice, refused the third time
(20 left); Bob is still served; a request without the header has no subject (the
callable returns ``None``): only the account's rules apply, and it is served.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from wsgiref.util import setup_testing_defaults

import httpx
import pytest
from django.http import JsonResponse
from django.urls import path

from creditguard import (
    Allowance,
    AllowanceExceeded,
    BudgetExceeded,
    CreditGuard,
    InsufficientCredits,
    RetryPolicy,
)
from creditguard.django import requires_credits as django_requires_credits
from creditguard.testing import FakeLensmor
from creditguard.web.common import problem_for
from tests.helpers import NewBackend

ALICE = "alice-7f3a9c"
BOB = "bob-41d2e8"
COST = 40
USERS = (ALICE, ALICE, ALICE, BOB, None)  # None: no X-User header

# (status, headers with lower-case names, body) of one answer
Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture
def fake() -> FakeLensmor:
    """Enough credits for every request: only the allowance refuses."""
    return FakeLensmor(subscription_balance=1000, gift_balance=0)


@pytest.fixture
def guard(fake: FakeLensmor, new_backend: NewBackend) -> Iterator[CreditGuard]:
    with CreditGuard(
        fake.api_key,
        transport=fake.transport,
        ttl=60,
        retry=RetryPolicy(attempts=1),
        allowance=Allowance(100),
        backend=new_backend(),
    ) as g:
        yield g


def headers_for(user: str | None) -> dict[str, str]:
    return {} if user is None else {"X-User": user}


def scope_user(scope: Any) -> str | None:
    """The subject of an ASGI request: its ``X-User`` header, or ``None``."""
    for name, value in scope["headers"]:
        if name == b"x-user":
            return str(value.decode("latin-1"))
    return None


def check_story(answers: list[Answer], guard: CreditGuard) -> None:
    """Alice 200, 200, 402 (``allowance_exceeded``); Bob 200; no subject 200."""
    assert [status for status, _, _ in answers] == [200, 200, 402, 200, 200]
    check_allowance_refusal(answers[2])
    assert guard.usage(ALICE).spent == 2 * COST
    assert guard.usage(BOB).spent == COST


def check_allowance_refusal(answer: Answer) -> None:
    status, headers, body = answer
    assert status == 402
    assert headers["content-type"].startswith("application/problem+json")
    data = json.loads(body)
    assert data["error"] == "allowance_exceeded"
    assert data["status"] == 402
    assert data["required"] == COST
    assert data["remaining"] == 20
    resets_at = datetime.fromisoformat(data["resets_at"])
    now = datetime.now(timezone.utc)
    assert resets_at > now
    retry_after = int(headers["retry-after"])
    assert retry_after > 0
    # seconds until resets_at, rounded up
    assert abs(now + timedelta(seconds=retry_after) - resets_at) < timedelta(seconds=5)
    text = body.decode()
    assert ALICE not in text
    assert "alice" not in text
    for hidden in ("subject", "limit", "keep"):
        assert hidden not in data


# -- FastAPI ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_fastapi_require_credits_subject(
    fake: FakeLensmor, guard: CreditGuard, kind: str
) -> None:
    from fastapi import Depends, FastAPI, Request

    from creditguard.fastapi import RequireCredits

    def who(request: Request) -> str | None:
        return request.headers.get("x-user")

    async def awho(request: Request) -> str | None:
        return request.headers.get("x-user")

    app = FastAPI()
    require = RequireCredits(COST, guard=guard, subject=who if kind == "sync" else awho)

    @app.post("/search", dependencies=[Depends(require)])
    async def search() -> dict[str, bool]:
        fake.charge(COST)
        return {"ok": True}

    @app.post("/free", dependencies=[Depends(RequireCredits(0, guard=guard, subject=who))])
    async def free() -> dict[str, bool]:
        return {"ok": True}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        answers = []
        for user in USERS:
            response = await client.post("/search", headers=headers_for(user))
            answers.append((response.status_code, dict(response.headers), response.content))
        # a free route admits nothing: Alice, over her allowance, is served
        assert (await client.post("/free", headers=headers_for(ALICE))).status_code == 200
    check_story(answers, guard)


@pytest.mark.anyio
async def test_fastapi_subject_errors_propagate(guard: CreditGuard) -> None:
    from fastapi import Depends, FastAPI, Request

    from creditguard.fastapi import RequireCredits

    def boom(request: Request) -> str:
        raise LookupError("no user")

    app = FastAPI()

    @app.post("/raises", dependencies=[Depends(RequireCredits(COST, guard=guard, subject=boom))])
    async def raises() -> None: ...

    @app.post(
        "/number", dependencies=[Depends(RequireCredits(COST, guard=guard, subject=lambda r: 7))]
    )
    async def number() -> None: ...

    @app.post(
        "/empty", dependencies=[Depends(RequireCredits(COST, guard=guard, subject=lambda r: ""))]
    )
    async def empty() -> None: ...

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        with pytest.raises(LookupError):
            await client.post("/raises")
        with pytest.raises(TypeError, match="str or None"):
            await client.post("/number")
        with pytest.raises(ValueError, match="non-empty str"):
            await client.post("/empty")
    assert guard.snapshot().reserved == 0  # nothing admitted
    with pytest.raises(TypeError, match="subject must be a callable"):
        RequireCredits(COST, guard=guard, subject="alice")  # type: ignore[arg-type]


# -- Starlette / any ASGI app --------------------------------------------------------------


@pytest.mark.anyio
async def test_asgi_middleware_subject(fake: FakeLensmor, guard: CreditGuard) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from creditguard.asgi import CreditGuardMiddleware

    async def search(request: Request) -> JSONResponse:
        assert request.state.creditguard_spend.cost == COST
        fake.charge(COST)
        return JSONResponse({"ok": True})

    app = CreditGuardMiddleware(
        Starlette(routes=[Route("/search", search, methods=["POST"])]),
        guard=guard,
        cost={"POST /search": COST},
        subject=scope_user,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        answers = []
        for user in USERS:
            response = await client.post("/search", headers=headers_for(user))
            answers.append((response.status_code, dict(response.headers), response.content))
    check_story(answers, guard)


@pytest.mark.anyio
async def test_asgi_middleware_async_subject_and_errors(
    fake: FakeLensmor, guard: CreditGuard
) -> None:
    from creditguard.asgi import CreditGuardMiddleware

    async def plain(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def who(scope: Any) -> str | None:
        if scope["path"] == "/raises":
            raise LookupError("no user")
        return scope_user(scope)

    app = CreditGuardMiddleware(plain, guard=guard, cost=lambda scope: COST, subject=who)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        statuses = [
            (await client.post("/search", headers=headers_for(user))).status_code for user in USERS
        ]
        assert statuses == [200, 200, 402, 200, 200]
        with pytest.raises(LookupError):
            await client.post("/raises", headers=headers_for(BOB))
    with pytest.raises(TypeError, match="subject must be a callable"):
        CreditGuardMiddleware(plain, guard=guard, cost={}, subject=1)  # type: ignore[arg-type]


# -- WSGI ----------------------------------------------------------------------------------


def wsgi_call(
    app: Callable[..., Iterable[bytes]], user: str | None, path: str = "/search"
) -> Answer:
    """Call a WSGI app as a server does: start_response, iterate, close."""
    env: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": path}
    if user is not None:
        env["HTTP_X_USER"] = user
    setup_testing_defaults(env)
    env["wsgi.input"] = io.BytesIO()
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda data: None

    result = app(env, start_response)
    body = b"".join(result)
    close = getattr(result, "close", None)
    if close is not None:
        close()
    return int(started[0][:3]), {k.lower(): v for k, v in started[1]}, body


def test_wsgi_middleware_subject(fake: FakeLensmor, guard: CreditGuard) -> None:
    from creditguard.wsgi import CreditGuardMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        fake.charge(COST)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    guarded = CreditGuardMiddleware(
        app,
        guard=guard,
        cost={"POST /search": COST},
        subject=lambda environ: environ.get("HTTP_X_USER"),
    )
    check_story([wsgi_call(guarded, user) for user in USERS], guard)


def test_wsgi_subject_errors_propagate(guard: CreditGuard) -> None:
    from creditguard.wsgi import CreditGuardMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    def who(environ: dict[str, Any]) -> str | None:
        raise LookupError("no user")

    guarded = CreditGuardMiddleware(app, guard=guard, cost={"POST /search": COST}, subject=who)
    with pytest.raises(LookupError):
        wsgi_call(guarded, ALICE)
    free = wsgi_call(guarded, ALICE, "/free")  # a free route never asks who
    assert free[0] == 200
    assert guard.snapshot().reserved == 0

    async def asubject(environ: dict[str, Any]) -> str:
        return "x"

    with pytest.raises(TypeError, match="synchronous"):
        CreditGuardMiddleware(app, guard=guard, cost={}, subject=asubject)  # type: ignore[arg-type]


def test_a_floor_refusal_does_not_show_the_floor(new_backend: NewBackend) -> None:
    from creditguard.wsgi import CreditGuardMiddleware

    fake = FakeLensmor(subscription_balance=100, gift_balance=0)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        fake.charge(COST)
        start_response("200 OK", [])
        return [b"ok"]

    with CreditGuard(
        fake.api_key, transport=fake.transport, ttl=60, keep=50, backend=new_backend()
    ) as guard:
        guarded = CreditGuardMiddleware(
            app,
            guard=guard,
            cost={"POST /search": COST},
            subject=lambda environ: environ.get("HTTP_X_USER"),
        )
        assert wsgi_call(guarded, ALICE)[0] == 200  # 100 - 40 = 60 above the 50 kept
        status, headers, body = wsgi_call(guarded, ALICE)
    assert status == 402
    data = json.loads(body)
    assert data["error"] == "insufficient_credits"
    assert data["required"] == COST
    assert "keep" not in data
    assert "50" not in data["detail"]
    assert "retry-after" not in headers
    assert ALICE not in body.decode()


# -- Flask -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["view", "extension"])
def test_flask_subject(fake: FakeLensmor, guard: CreditGuard, where: str) -> None:
    from flask import Flask, Request

    from creditguard.flask import CreditGuardExtension, requires_credits

    def who(request: Request) -> str | None:
        return request.headers.get("X-User")

    app = Flask(__name__)
    CreditGuardExtension(app, guard=guard, subject=who if where == "extension" else None)

    @app.post("/search")
    @requires_credits(COST, subject=who if where == "view" else None)
    def search() -> dict[str, bool]:
        fake.charge(COST)
        return {"ok": True}

    client = app.test_client()
    answers = []
    for user in USERS:
        response = client.post("/search", headers=headers_for(user), buffered=True)
        answers.append(
            (response.status_code, {k.lower(): v for k, v in response.headers}, response.data)
        )
    check_story(answers, guard)


def test_flask_subject_errors_propagate(guard: CreditGuard) -> None:
    from flask import Flask, Request

    from creditguard.flask import CreditGuardExtension, requires_credits

    def who(request: Request) -> str | None:
        raise LookupError("no user")

    app = Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    CreditGuardExtension(app, guard=guard)

    @app.post("/search")
    @requires_credits(COST, subject=who)
    def search() -> str:  # pragma: no cover - never admitted
        return "ok"

    with pytest.raises(LookupError):
        app.test_client().post("/search", buffered=True)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    answered = app.test_client().post("/search", buffered=True)
    assert answered.status_code == 500  # as any error of the app
    assert guard.snapshot().reserved == 0
    with pytest.raises(TypeError, match="subject must be a callable"):
        requires_credits(COST, subject="alice")  # type: ignore[arg-type]


# -- Django ----------------------------------------------------------------------------------


def django_who(request: Any) -> str | None:
    value = request.headers.get("X-User")
    return None if value is None else str(value)


def django_search(request: Any) -> JsonResponse:
    assert request.creditguard_spend.cost == COST
    return JsonResponse({"ok": True})


@django_requires_credits(COST, subject=django_who)
def django_decorated(request: Any) -> JsonResponse:
    assert request.creditguard_spend.cost == COST
    return JsonResponse({"ok": True})


@django_requires_credits(COST, subject=django_who)
async def django_adecorated(request: Any) -> JsonResponse:
    assert request.creditguard_spend.cost == COST
    return JsonResponse({"ok": True})


# This module is the URLconf of the Django tests (``ROOT_URLCONF=__name__``).
urlpatterns = [
    path("search", django_search),
    path("decorated", django_decorated),
    path("adecorated", django_adecorated),
]


def _django_answer(response: Any) -> Answer:
    return response.status_code, {k.lower(): v for k, v in response.items()}, response.content


@pytest.mark.parametrize("where", ["middleware", "decorator"])
def test_django_subject(guard: CreditGuard, where: str) -> None:
    from django.test import Client, override_settings

    if where == "middleware":
        setting = {"GUARD": guard, "COSTS": {"POST /search": COST}, "SUBJECT": django_who}
        url = "/search"
    else:
        setting = {"GUARD": guard}
        url = "/decorated"
    with override_settings(ROOT_URLCONF=__name__, CREDITGUARD=setting):
        answers = [_django_answer(Client().post(url, headers=headers_for(user))) for user in USERS]
    check_story(answers, guard)


# Django's async stack (asgiref) runs on asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_django_async_subject(guard: CreditGuard) -> None:
    from django.test import AsyncClient, override_settings

    with override_settings(ROOT_URLCONF=__name__, CREDITGUARD={"GUARD": guard}):
        answers = [
            _django_answer(await AsyncClient().post("/adecorated", headers=headers_for(user)))
            for user in USERS
        ]
    check_story(answers, guard)


def test_django_subject_setting_is_checked(guard: CreditGuard) -> None:
    from django.test import Client, override_settings

    from creditguard import CreditGuardError

    def who(request: Any) -> str | None:
        raise LookupError("no user")

    costs = {"POST /search": COST}
    with (
        override_settings(
            ROOT_URLCONF=__name__, CREDITGUARD={"GUARD": guard, "COSTS": costs, "SUBJECT": who}
        ),
        pytest.raises(LookupError),
    ):
        Client().post("/search")
    assert guard.snapshot().reserved == 0
    with (
        override_settings(
            ROOT_URLCONF=__name__, CREDITGUARD={"GUARD": guard, "COSTS": costs, "SUBJECT": 3}
        ),
        pytest.raises(CreditGuardError, match="SUBJECT"),
    ):
        Client().post("/search")


# -- the answers themselves ----------------------------------------------------------------


def test_allowance_answer_in_another_time_zone() -> None:
    resets_at = datetime.now(timezone.utc).astimezone(timezone(timedelta(hours=2)))
    resets_at += timedelta(seconds=90.2)
    exc = AllowanceExceeded(30, subject=ALICE, limit=50, spent=45, resets_at=resets_at)
    problem = problem_for(exc)
    assert problem is not None
    assert problem.status == 402
    assert problem.body["resets_at"] == resets_at.isoformat()
    assert problem.body["remaining"] == 5
    assert problem.body["available"] == 5
    wait = int(dict(problem.headers)["retry-after"])
    assert wait in (90, 91)  # rounded up
    assert ALICE not in problem.content().decode()
    assert isinstance(exc, InsufficientCredits)


def test_budget_answer() -> None:
    problem = problem_for(BudgetExceeded(30, limit=50, spent=45))
    assert problem is not None
    assert problem.status == 402
    body = problem.body
    assert body["error"] == "budget_exceeded"
    assert (body["required"], body["remaining"]) == (30, 5)
    assert "resets_at" not in body
    assert problem.headers == ()


def test_floor_answer_is_todays_insufficient_credits() -> None:
    plain = problem_for(InsufficientCredits(40, 20))
    floor = problem_for(InsufficientCredits(40, 20, keep=50))
    assert plain is not None
    assert floor is not None
    assert floor == plain
