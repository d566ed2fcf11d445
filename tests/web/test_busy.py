"""Busy credits answer 503 ``credits_busy`` with ``Retry-After`` in every adapter, and a
402 carries ``reserved``: real provocations, a first request held in its handler.

* GateTimeout: ``max_concurrent=1, gate_timeout=0.05``; a second request finds the gate
  taken for longer than it may wait.
* AdmissionTimeout: ``admission_timeout=0``; the first request holds 20 of 30 credits, a
  second for 20 fits the balance but not beside it.
* InsufficientCredits: a request for 40 of 30, while 20 are held: 402 with ``reserved``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from creditguard import CreditGuard, RetryPolicy
from creditguard.asgi import CreditGuardMiddleware
from creditguard.testing import FakeLensmor

GATE = {"max_concurrent": 1, "gate_timeout": 0.05}
ADMISSION = {"admission_timeout": 0}


def make_guard(fake: FakeLensmor, **options: Any) -> CreditGuard:
    return CreditGuard(
        fake.api_key, transport=fake.transport, ttl=60, retry=RetryPolicy(attempts=1), **options
    )


def check_busy(status: int, headers: Any, body: dict[str, Any], *, admission: bool) -> None:
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    assert headers["content-type"] == "application/problem+json"
    assert body["error"] == "credits_busy"
    if admission:
        assert (body["required"], body["available"], body["reserved"]) == (20, 10, 20)


def check_refused(status: int, body: dict[str, Any]) -> None:
    assert status == 402
    assert body["error"] == "insufficient_credits"
    assert (body["required"], body["reserved"]) == (40, 20)


# -- ASGI and FastAPI (async) ----------------------------------------------------------------


def starlette_held(entered: anyio.Event, release: anyio.Event) -> Starlette:
    async def held(request: Request) -> Response:
        entered.set()
        await release.wait()
        return PlainTextResponse("done")

    async def other(request: Request) -> Response:
        return PlainTextResponse("ran")

    return Starlette(routes=[Route("/held", held), Route("/other/{n}", other)])


def fastapi_held(guard: CreditGuard, entered: anyio.Event, release: anyio.Event) -> Any:
    from fastapi import Depends, FastAPI

    from creditguard.fastapi import RequireCredits

    app = FastAPI()

    @app.get("/held", dependencies=[Depends(RequireCredits(20, guard=guard))])
    async def held() -> str:
        entered.set()
        await release.wait()
        return "done"

    @app.get("/other/{n}", dependencies=[Depends(RequireCredits(_n, guard=guard))])
    async def other() -> str:
        return "ran"

    return app


def _n(request: Any) -> int:
    return int(request.path_params["n"])


async def _provoke_async(build: Callable[[anyio.Event, anyio.Event], Any], n: int) -> Any:
    entered, release = anyio.Event(), anyio.Event()
    app = build(entered, release)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://t") as http,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(http.get, "/held")
        await entered.wait()
        response = await http.get(f"/other/{n}")
        release.set()
    return response


def asgi_builder(guard: CreditGuard) -> Callable[[anyio.Event, anyio.Event], Any]:
    costs: dict[str, int] = {"GET /held": 20, "GET /other/20": 20, "GET /other/40": 40}
    return lambda entered, release: CreditGuardMiddleware(
        starlette_held(entered, release), guard=guard, cost=costs
    )


def fastapi_builder(guard: CreditGuard) -> Callable[[anyio.Event, anyio.Event], Any]:
    return lambda entered, release: fastapi_held(guard, entered, release)


BUILDERS = {"asgi": asgi_builder, "fastapi": fastapi_builder}


@pytest.mark.anyio
@pytest.mark.parametrize("adapter", sorted(BUILDERS))
async def test_async_gate_timeout_is_503(fake: FakeLensmor, adapter: str) -> None:
    with make_guard(fake, **GATE) as guard:
        response = await _provoke_async(BUILDERS[adapter](guard), 20)
    check_busy(response.status_code, response.headers, response.json(), admission=False)


@pytest.mark.anyio
@pytest.mark.parametrize("adapter", sorted(BUILDERS))
async def test_async_admission_timeout_is_503(fake: FakeLensmor, adapter: str) -> None:
    with make_guard(fake, **ADMISSION) as guard:
        response = await _provoke_async(BUILDERS[adapter](guard), 20)
    check_busy(response.status_code, response.headers, response.json(), admission=True)


@pytest.mark.anyio
@pytest.mark.parametrize("adapter", sorted(BUILDERS))
async def test_async_402_carries_reserved(fake: FakeLensmor, adapter: str) -> None:
    with make_guard(fake, **ADMISSION) as guard:
        response = await _provoke_async(BUILDERS[adapter](guard), 40)
    assert response.headers["content-type"] == "application/problem+json"
    check_refused(response.status_code, response.json())


# -- WSGI, Flask, Django (threads) --------------------------------------------------------


class Held:
    """A handler held until released; ``entered`` is set when it runs."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.release.wait(30)


def _provoke_sync(held: Held, first: Callable[[], Any], second: Callable[[], Any]) -> Any:
    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert held.entered.wait(30)
        return second()
    finally:
        held.release.set()
        worker.join(30)


def wsgi_app(guard: CreditGuard, held: Held) -> Any:
    from werkzeug.test import Client

    from creditguard.wsgi import CreditGuardMiddleware as WSGIMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/held":
            held.hold()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    costs = {"GET /held": 20, "GET /other/20": 20, "GET /other/40": 40}
    return Client(WSGIMiddleware(app, guard=guard, cost=costs))


def flask_client(guard: CreditGuard, held: Held) -> Any:
    from flask import Flask

    from creditguard.flask import CreditGuardExtension, requires_credits

    app = Flask(__name__)
    CreditGuardExtension(app, guard=guard)

    @app.get("/held")
    @requires_credits(20)
    def held_view() -> str:
        held.hold()
        return "done"

    @app.get("/other/<int:n>")
    @requires_credits(lambda request: int(request.view_args["n"]))  # type: ignore[index]
    def other(n: int) -> str:
        return "ran"

    return app.test_client()


def django_client(guard: CreditGuard, held: Held) -> Any:
    from django.test import Client

    from . import django_urls

    django_urls.state["held"] = held
    return Client()


SYNC = {"wsgi": wsgi_app, "flask": flask_client, "django": django_client}


@pytest.fixture
def django_settings() -> Iterator[Callable[[CreditGuard], Any]]:
    from django.test import override_settings

    from . import django_urls

    costs = {"GET /held": 20, "GET /other/20": 20, "GET /other/40": 40}
    yield lambda guard: override_settings(CREDITGUARD={"GUARD": guard, "COSTS": costs})
    django_urls.state.clear()


def _sync(
    fake: FakeLensmor, adapter: str, options: dict[str, Any], n: int, settings: Any
) -> tuple[int, Any, dict[str, Any]]:
    held = Held()
    with make_guard(fake, **options) as guard, settings(guard):
        client = SYNC[adapter](guard, held)
        response = _provoke_sync(
            held, lambda: client.get("/held").close(), lambda: client.get(f"/other/{n}")
        )
        status = response.status_code
        headers = {k.lower(): v for k, v in response.headers.items()}
        body = json.loads(response.content if adapter == "django" else response.get_data())
        response.close()
    return status, headers, body


@pytest.mark.parametrize("adapter", sorted(SYNC))
def test_sync_gate_timeout_is_503(
    fake: FakeLensmor, adapter: str, django_settings: Callable[[CreditGuard], Any]
) -> None:
    status, headers, body = _sync(fake, adapter, GATE, 20, django_settings)
    check_busy(status, headers, body, admission=False)


@pytest.mark.parametrize("adapter", sorted(SYNC))
def test_sync_admission_timeout_is_503(
    fake: FakeLensmor, adapter: str, django_settings: Callable[[CreditGuard], Any]
) -> None:
    status, headers, body = _sync(fake, adapter, ADMISSION, 20, django_settings)
    check_busy(status, headers, body, admission=True)


@pytest.mark.parametrize("adapter", sorted(SYNC))
def test_sync_402_carries_reserved(
    fake: FakeLensmor, adapter: str, django_settings: Callable[[CreditGuard], Any]
) -> None:
    status, headers, body = _sync(fake, adapter, ADMISSION, 40, django_settings)
    assert headers["content-type"] == "application/problem+json"
    check_refused(status, body)
