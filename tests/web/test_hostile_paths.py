"""No variant of a priced path reaches its handler without being charged, in any adapter.

Each adapter guards the same four routes (a POST with a parameter, a GET, an ``{int}``
route and a ``{path}`` route); every hostile spelling of their paths (encoded slashes,
dot segments, doubled and trailing slashes, control characters, case changes,
``;params``, percent-encoded letters) and HEAD for GET is sent over the framework's own
test client (and, for Starlette, over real uvicorn). A handler records the spend it ran
with; none may run without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from creditguard import CreditGuard, current_spend
from creditguard.asgi import SPEND_KEY, CreditGuardMiddleware
from creditguard.testing import FakeLensmor, serve

from .conftest import Recorder

COSTS = {
    "POST /events/{event_id}/unlock": 1,
    "GET /page": 1,
    "GET /items/{item_id:int}": 1,
    "GET /files/{rest:path}": 1,
}
BASES = [
    ("POST", "/events/ev1/unlock"),
    ("GET", "/page"),
    ("HEAD", "/page"),
    ("GET", "/items/12"),
    ("GET", "/files/a/b"),
    ("GET", "/files/"),
]


def variants(path: str) -> list[str]:
    """``path`` and hostile spellings of it (as sent on the wire, percent-encoded)."""
    head, _, last = path.rpartition("/")
    first = path.split("/")[1]
    out = [path]
    out += [path + tail for tail in ("%0A", "%0a", "%0D", "%0D%0A", "%00", "%09", "%20", "/")]
    out += [path + ";x=1", f"{head};x/{last}", f"{head}%0A/{last}", f"{head}%00/{last}"]
    out += [f"{head}%2F{last}", f"{head}%2f{last}", f"{head}%252F{last}", f"{head}//{last}"]
    out += ["/" + path, f"/./{path[1:]}", f"{head}/./{last}", f"/x/..{path}", f"/%2E%2E{path}"]
    out += [path.upper(), path.replace(first, first.capitalize(), 1), path.replace("e", "%65", 1)]
    out += [path.replace("/", "%2F", 1), path.replace("/", "%5C", 1)]
    return out


CASES = [(method, hostile) for method, path in BASES for hostile in variants(path)]


@pytest.fixture
def fake() -> FakeLensmor:
    return FakeLensmor(subscription_balance=100_000, gift_balance=0)


@pytest.fixture
def reached() -> list[tuple[str, object]]:
    """What each handler that ran saw: (its path, its spend or None)."""
    return []


def _check(reached: list[tuple[str, object]], results: list[tuple[str, str, int]]) -> None:
    free = [path for path, spend in reached if spend is None]
    assert free == [], f"priced handlers ran free for {free!r}"
    ran = {path for path, _ in reached}
    assert any(status < 300 for _, _, status in results)  # the plain paths did run
    assert ran


# -- Starlette and FastAPI --------------------------------------------------------------


def starlette_app(reached: list[tuple[str, object]]) -> Starlette:
    async def handler(request: Request) -> Response:
        spend = request.scope.get("state", {}).get(SPEND_KEY)
        reached.append((request.url.path, spend))
        return PlainTextResponse("ran")

    return Starlette(
        routes=[
            Route("/events/{event_id}/unlock", handler, methods=["POST"]),
            Route("/page", handler),
            Route("/items/{item_id:int}", handler),
            Route("/files/{rest:path}", handler),
        ]
    )


async def _send_all(app: Any, prefix: str = "") -> list[tuple[str, str, int]]:
    transport = httpx.ASGITransport(app=app)
    results = []
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        for method, path in CASES:
            response = await http.request(method, prefix + path)
            results.append((method, path, response.status_code))
    return results


@pytest.mark.anyio
async def test_asgi_middleware_in_front_of_starlette(
    guard: CreditGuard, reached: list[tuple[str, object]]
) -> None:
    app = CreditGuardMiddleware(starlette_app(reached), guard=guard, cost=COSTS)
    results = await _send_all(app)
    _check(reached, results)
    assert ("POST", "/events/ev1/unlock%0A", 400) in results
    assert ("HEAD", "/page", 200) in results


@pytest.mark.anyio
async def test_asgi_middleware_inside_a_mount(
    guard: CreditGuard, events: Recorder, reached: list[tuple[str, object]]
) -> None:
    guarded = CreditGuardMiddleware(starlette_app(reached), guard=guard, cost=COSTS)
    app = Starlette(routes=[Mount("/api", app=guarded)])
    results = await _send_all(app, "/api")
    _check(reached, results)
    assert ("POST", "/events/ev1/unlock", 200) in results
    assert "spent" in events.kinds


def test_asgi_middleware_over_uvicorn(
    guard: CreditGuard, reached: list[tuple[str, object]]
) -> None:
    app = CreditGuardMiddleware(starlette_app(reached), guard=guard, cost=COSTS)
    results = []
    with serve(app) as url, httpx.Client(base_url=url) as http:
        for method, path in CASES:
            response = http.request(method, path)
            results.append((method, path, response.status_code))
    _check(reached, results)
    assert ("POST", "/events/ev1/unlock%0A", 400) in results


@pytest.mark.anyio
async def test_fastapi_dependency(guard: CreditGuard, reached: list[tuple[str, object]]) -> None:
    from fastapi import Depends, FastAPI

    from creditguard.fastapi import RequireCredits

    app = FastAPI()
    paid = [Depends(RequireCredits(1, guard=guard))]

    async def handler(request: Request) -> PlainTextResponse:
        reached.append((request.url.path, current_spend()))
        return PlainTextResponse("ran")

    app.add_api_route("/events/{event_id}/unlock", handler, methods=["POST"], dependencies=paid)
    app.add_api_route("/page", handler, methods=["GET", "HEAD"], dependencies=paid)
    app.add_api_route("/items/{item_id:int}", handler, methods=["GET"], dependencies=paid)
    app.add_api_route("/files/{rest:path}", handler, methods=["GET"], dependencies=paid)
    _check(reached, await _send_all(app))


# -- WSGI, Flask, Django -------------------------------------------------------------------


def flask_app(reached: list[tuple[str, object]], decorate: Callable[[Any], Any]) -> Any:
    from flask import Flask, g, request

    app = Flask(__name__)

    @decorate
    def handler(**kwargs: Any) -> str:
        spend = request.environ.get("creditguard.spend") or g.get("creditguard_spend")
        reached.append((request.path, spend))
        return "ran"

    app.add_url_rule("/events/<event_id>/unlock", "unlock", handler, methods=["POST"])
    app.add_url_rule("/page", "page", handler)
    app.add_url_rule("/items/<int:item_id>", "items", handler)
    app.add_url_rule("/files/<path:rest>", "files", handler)
    return app


def _send_wsgi(client: Any) -> list[tuple[str, str, int]]:
    results = []
    for method, path in CASES:
        response = client.open(path, method=method)
        results.append((method, path, response.status_code))
        response.close()
    return results


def test_wsgi_middleware_in_front_of_flask(
    guard: CreditGuard, reached: list[tuple[str, object]]
) -> None:
    from werkzeug.test import Client

    from creditguard.wsgi import CreditGuardMiddleware as WSGIMiddleware

    app = WSGIMiddleware(flask_app(reached, lambda view: view), guard=guard, cost=COSTS)
    results = _send_wsgi(Client(app))
    _check(reached, results)
    assert ("POST", "/events/ev1/unlock%0A", 400) in results


def test_flask_decorator(guard: CreditGuard, reached: list[tuple[str, object]]) -> None:
    from creditguard.flask import requires_credits

    app = flask_app(reached, requires_credits(1, guard=guard))
    _check(reached, _send_wsgi(app.test_client()))


def test_django_middleware(guard: CreditGuard, reached: list[tuple[str, object]]) -> None:
    from django.test import Client, override_settings

    from . import django_urls

    django_urls.seen.clear()
    django_urls.state["fake"] = FakeLensmor(subscription_balance=100_000, gift_balance=0)
    results = []
    costs = {**COSTS, "GET /page": 10}
    try:
        with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": costs}):
            client = Client(raise_request_exception=False)
            for method, path in CASES:
                response = client.generic(method, path)
                results.append((method, path, response.status_code))
                response.close()
        for entry in django_urls.seen:
            reached.append(("view", entry[0] if isinstance(entry, tuple) else entry))
    finally:
        django_urls.seen.clear()
        django_urls.state.clear()
    _check(reached, results)
    assert ("POST", "/events/ev1/unlock%0A", 400) in results
