"""Route patterns (``creditguard.web.common.Routes``) and what the adapters leave behind."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from creditguard import CreditGuard
from creditguard.web.common import Routes


def test_literal_routes_win_then_templates_in_order() -> None:
    routes = Routes(
        {
            "/a/{x}": 1,
            "POST /a/{x}": 2,
            "POST /a/b": 3,
            "/a/c": 4,
            "GET /files/{rest:path}": 5,
            "/b/{x}/{y}": 6,
        }
    )
    assert routes.cost("POST", "/a/b") == 3  # literal, method first
    assert routes.cost("GET", "/a/c") == 4  # literal without a method
    assert routes.cost("GET", "/a/b") == 1  # no literal for GET: the first template
    assert routes.cost("POST", "/a/q") == 1  # the method-less template comes first
    assert routes.cost("GET", "/files/x/y/z") == 5
    assert routes.cost("POST", "/files/x") is None
    assert routes.cost("PATCH", "/b/1/2") == 6
    assert routes.cost("PATCH", "/b/1") is None
    assert routes.cost("GET", "/a/b/c") is None  # {x} is one segment
    assert routes.cost("GET", "/nowhere") is None


def test_a_method_template_before_a_method_less_one() -> None:
    routes = Routes({"POST /e/{id}": 10, "/e/{id}": 1, "DELETE /e/{id}": 7})
    assert routes.cost("POST", "/e/1") == 10
    assert routes.cost("GET", "/e/1") == 1
    assert routes.cost("DELETE", "/e/1") == 1  # the method-less pattern is earlier


def test_literal_method_falls_back_to_method_less_literal() -> None:
    routes = Routes({"POST /x": 2, "/x": 1, "/y": 0})
    assert routes.cost("POST", "/x") == 2
    assert routes.cost("GET", "/x") == 1
    assert routes.cost("GET", "/y") == 0
    assert bool(routes)
    assert not Routes({})
    assert Routes({"/{x}": 1})


def test_regex_characters_in_paths_are_literal() -> None:
    routes = Routes({"/a.b/{x}": 1, "/c+d": 2})
    assert routes.cost("GET", "/a.b/1") == 1
    assert routes.cost("GET", "/aXb/1") is None
    assert routes.cost("GET", "/c+d") == 2
    assert routes.cost("GET", "/ccd") is None


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Collection off: what only the cycle collector would free stays alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_flask_response_is_freed_without_the_cycle_collector(
    guard: CreditGuard, no_gc: None
) -> None:
    from flask import Flask, Response

    from creditguard.flask import CreditGuardExtension, requires_credits

    app = Flask(__name__)
    CreditGuardExtension(app, guard=guard)
    refs: list[weakref.ref[Any]] = []

    @app.post("/x")
    @requires_credits(1)
    def x() -> Response:
        response = Response("ok")
        refs.append(weakref.ref(response))
        return response

    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/x"}
    environ.update({"SERVER_NAME": "t", "SERVER_PORT": "80", "wsgi.url_scheme": "http"})
    start_response: Any = lambda status, headers, exc_info=None: None  # noqa: E731
    body: Any = app.wsgi_app(environ, start_response)
    assert b"".join(body) == b"ok"
    body.close()
    del body
    assert refs[0]() is None


def test_django_response_is_freed_without_the_cycle_collector(
    guard: CreditGuard, no_gc: None
) -> None:
    from django.http import HttpResponse
    from django.test import RequestFactory

    from creditguard.django import requires_credits

    refs: list[weakref.ref[Any]] = []

    @requires_credits(1, guard=guard)
    def view(request: Any) -> HttpResponse:
        response = HttpResponse("ok")
        refs.append(weakref.ref(response))
        return response

    response = view(RequestFactory().post("/x"))
    response.close()
    response.close()  # a second close does not settle again
    del response
    assert refs[0]() is None


def test_converters_match_what_the_frameworks_route() -> None:
    uuid = "123e4567-e89b-12d3-a456-426614174000"
    routes = Routes(
        {
            "GET /items/{id:int}": 1,
            "GET /items/{slug:slug}": 2,
            "GET /users/{id:uuid}": 3,
            "GET /prices/{p:float}": 4,
            "GET /names/{name:str}": 5,
            "GET /files/{rest:path}": 6,
        }
    )
    assert routes.cost("GET", "/items/42") == 1
    assert routes.cost("GET", "/items/a-b_c") == 2
    assert routes.cost("GET", "/items/a.b") is None
    assert routes.cost("GET", f"/users/{uuid}") == 3
    assert routes.cost("GET", f"/users/{uuid.upper()}") == 3
    assert routes.cost("GET", "/users/42") is None
    assert (routes.cost("GET", "/prices/1.5"), routes.cost("GET", "/prices/2")) == (4, 4)
    assert routes.cost("GET", "/names/x") == 5
    assert routes.cost("GET", "/names/x/y") is None
    assert routes.cost("GET", "/files/") == 6  # Starlette's {p:path} may be empty
    assert routes.cost("GET", "/files/a/b") == 6


@pytest.mark.parametrize("pattern", ["/a/{x:nope}", "/a/{x", "/a/x}", "GET /a/{x:int"])
def test_unknown_converters_and_malformed_parameters_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"converter|malformed"):
        Routes({pattern: 1})


def test_head_is_priced_as_its_get_unless_named() -> None:
    routes = Routes({"GET /a": 1, "GET /b/{x}": 2, "GET /c": 3, "HEAD /c": 0, "POST /d": 4})
    assert (routes.cost("HEAD", "/a"), routes.cost("HEAD", "/b/1")) == (1, 2)
    assert (routes.cost("HEAD", "/c"), routes.cost("GET", "/c")) == (0, 3)
    assert routes.cost("HEAD", "/d") is None
