"""End to end over real loopback HTTP: the guarded app under uvicorn (ASGI) or a threaded
WSGI server, the sandbox under uvicorn as the credits service, concurrent clients on a
paid route whose balance covers exactly K calls: K answers 200, the rest 402."""

from __future__ import annotations

import contextlib
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor, serve

K = 10
COST = 10
CLIENTS = 30


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    server = make_server(
        "127.0.0.1", 0, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def hammer(url: str) -> list[int]:
    """CLIENTS threads, released together, each POSTing the paid route once."""
    start = threading.Barrier(CLIENTS)
    statuses: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            start.wait()
            status = client.post(f"{url}/events/ev-{i}/unlock").status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def charge_headers(fake: FakeLensmor) -> dict[str, str]:
    return {"Authorization": f"Bearer {fake.api_key}"}


# -- the apps: each unlock makes the paid call, a real charge on the sandbox -------------


def fastapi_app(guard: CreditGuard, sandbox: str, fake: FakeLensmor) -> Any:
    from fastapi import Depends, FastAPI

    from creditguard.fastapi import RequireCredits

    app = FastAPI()

    @app.post(
        "/events/{event_id}/unlock", dependencies=[Depends(RequireCredits(COST, guard=guard))]
    )
    async def unlock(event_id: str) -> dict[str, str]:
        async with httpx.AsyncClient() as client:
            paid = await client.post(
                f"{sandbox}/sandbox/charge",
                params={"credits": COST},
                headers=charge_headers(fake),
            )
        paid.raise_for_status()
        return {"event": event_id}

    return app


def asgi_app(guard: CreditGuard, sandbox: str, fake: FakeLensmor) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from creditguard.asgi import CreditGuardMiddleware

    async def unlock(request: Request) -> JSONResponse:
        async with httpx.AsyncClient() as client:
            paid = await client.post(
                f"{sandbox}/sandbox/charge",
                params={"credits": COST},
                headers=charge_headers(fake),
            )
        paid.raise_for_status()
        return JSONResponse({"event": request.path_params["event_id"]})

    inner = Starlette(routes=[Route("/events/{event_id}/unlock", unlock, methods=["POST"])])
    return CreditGuardMiddleware(inner, guard=guard, cost={"POST /events/{event_id}/unlock": COST})


def flask_app(guard: CreditGuard, sandbox: str, fake: FakeLensmor) -> Any:
    from flask import Flask

    from creditguard.flask import CreditGuardExtension, requires_credits

    app = Flask(__name__)
    CreditGuardExtension(app, guard=guard)

    @app.post("/events/<event_id>/unlock")
    @requires_credits(COST)
    def unlock(event_id: str) -> dict[str, str]:
        paid = httpx.post(
            f"{sandbox}/sandbox/charge", params={"credits": COST}, headers=charge_headers(fake)
        )
        paid.raise_for_status()
        return {"event": event_id}

    return app


def wsgi_app(guard: CreditGuard, sandbox: str, fake: FakeLensmor) -> Any:
    from creditguard.wsgi import CreditGuardMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        paid = httpx.post(
            f"{sandbox}/sandbox/charge", params={"credits": COST}, headers=charge_headers(fake)
        )
        paid.raise_for_status()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"unlocked"]

    return CreditGuardMiddleware(app, guard=guard, cost={"POST /events/{event_id}/unlock": COST})


Builder = Callable[[CreditGuard, str, FakeLensmor], Any]


def run_scenario(build: Builder, server: Callable[[Any], Any]) -> None:
    fake = FakeLensmor(subscription_balance=K * COST, gift_balance=0)
    with serve(fake.app) as sandbox:
        guard = CreditGuard(fake.api_key, base_url=sandbox, ttl=60)
        try:
            with server(build(guard, sandbox, fake)) as url:
                statuses = hammer(url)
        finally:
            guard.close()
    assert len(statuses) == CLIENTS
    assert statuses.count(200) == K, sorted(statuses)
    assert statuses.count(402) == CLIENTS - K, sorted(statuses)
    assert fake.charges == K
    assert fake.balance.total_balance == 0  # every credit spent, never below zero


@pytest.mark.parametrize("build", [fastapi_app, asgi_app], ids=["fastapi", "asgi"])
def test_asgi_under_uvicorn(build: Builder) -> None:
    run_scenario(build, serve)


@pytest.mark.parametrize("build", [flask_app, wsgi_app], ids=["flask", "wsgi"])
def test_wsgi_under_a_threaded_server(build: Builder) -> None:
    run_scenario(build, serve_wsgi)
