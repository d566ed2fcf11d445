"""creditguard.django: the middleware and the view decorator, sync and async, through
Django's test clients (settings configured once, in conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.http import HttpResponse
from django.test import AsyncClient, Client, override_settings

from creditguard import CreditGuard, CreditGuardError
from creditguard.django import ActionFailed, CreditGuardMiddleware, guard_from_settings
from creditguard.testing import FakeLensmor

from . import django_urls
from .conftest import Clock, Recorder, calls

COSTS = {
    "POST /events/{event_id}/unlock": 10,
    "POST /async/events/{event_id}/unlock": 10,
    "POST /missing": 10,
    "POST /boom": 10,
    "GET /stream": 10,
}


@pytest.fixture(autouse=True)
def views(fake: FakeLensmor) -> Iterator[list[Any]]:
    django_urls.seen.clear()
    django_urls.state["fake"] = fake
    yield django_urls.seen
    django_urls.state.clear()


@pytest.fixture
def configured(guard: CreditGuard) -> Iterator[None]:
    with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": COSTS}):
        yield


@pytest.mark.usefixtures("configured")
def test_middleware_admits_and_settles(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, views: list[Any]
) -> None:
    django_urls.state["watch"] = guard
    response = Client().post("/events/ev-1/unlock")
    assert response.status_code == 200
    assert response.json() == {"event": "ev-1"}
    assert events.kinds == ["admitted", "spent"]
    (spend, current), during = views
    assert current is spend
    assert spend.balance_before.total_balance == 30
    assert during == (10, 1, 0)  # admitted before the view: its cost reserved
    # Settled as a decorated call is: no read of its own (the one read is the admission's,
    # on a cold cache); the spend has exited and its reservation waits for the next read.
    assert fake.balance_requests == 1
    assert spend.balance_after is None
    assert calls(guard) == (10, 1, 1)
    assert guard.balance().total_balance == 20  # that read includes the charge
    assert fake.balance_requests == 2
    assert calls(guard) == (0, 0, 0)


def test_sequential_requests_read_the_balance_once_per_ttl(clock: Clock) -> None:
    """Requests one after another, to a middleware-priced view and to a decorated one,
    make one upstream balance read per TTL, not one per request; the read after them
    includes every charge."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    django_urls.state["fake"] = fake
    with (
        CreditGuard(fake.api_key, transport=fake.transport, ttl=60) as guard,
        override_settings(CREDITGUARD={"GUARD": guard, "COSTS": COSTS}),
    ):
        client = Client()
        for i in range(2):
            assert client.post(f"/events/a{i}/unlock").status_code == 200
            assert client.get("/decorated").status_code == 200
        assert fake.balance_requests == 1  # the first admission's (a cold cache)
        assert calls(guard) == (40, 4, 4)
        clock.advance(61)  # the cached balance has outlived its TTL
        for i in range(2):
            assert client.post(f"/events/b{i}/unlock").status_code == 200
            assert client.get("/decorated").status_code == 200
        assert fake.balance_requests == 2  # one more admission read settled the first four
        assert calls(guard) == (40, 4, 4)
        assert guard.balance().total_balance == 20 == fake.balance.total_balance
        assert fake.balance_requests == 3
        assert calls(guard) == (0, 0, 0)
    spends = [each[0] if isinstance(each, tuple) else each for each in django_urls.seen]
    befores = [spend.balance_before.total_balance for spend in spends]
    assert befores == [100] * 4 + [60] * 4  # reservations, not the balance, carried the rest


@pytest.mark.usefixtures("configured")
def test_middleware_answers(fake: FakeLensmor, views: list[Any]) -> None:
    client = Client()
    fake.fail_next(429, headers={"Retry-After": "4"})
    unavailable = client.post("/events/e/unlock")
    assert unavailable.status_code == 503
    assert unavailable["Retry-After"] == "4"
    assert unavailable.json()["error"] == "balance_unavailable"
    fake.fail_next(401)
    rejected = client.post("/events/e/unlock")
    assert rejected.status_code == 500
    assert rejected.json()["error"] == "credits_misconfigured"
    assert fake.api_key not in rejected.content.decode()
    assert [client.post("/events/e/unlock").status_code for _ in range(3)] == [200] * 3
    refused = client.post("/events/e/unlock")
    assert refused.status_code == 402
    assert refused["Content-Type"] == "application/problem+json"
    assert (refused.json()["required"], refused.json()["available"]) == (10, 0)
    assert len(views) == 3


@pytest.mark.usefixtures("configured")
def test_failures_release(events: Recorder) -> None:
    client = Client(raise_request_exception=False)
    assert client.post("/boom").status_code == 500
    assert client.post("/missing").status_code == 404
    assert events.kinds == ["admitted", "failed", "admitted", "failed"]
    assert isinstance(events.events[3].error, ActionFailed)
    assert [client.post(f"/events/{i}/unlock").status_code for i in range(3)] == [200] * 3


@pytest.mark.usefixtures("configured")
def test_streaming_settles_after_the_last_chunk(
    fake: FakeLensmor, events: Recorder, views: list[Any]
) -> None:
    response = Client().get("/stream")
    assert events.kinds == ["admitted"]  # not iterated yet
    assert b"".join(response.streaming_content) == b"xxx"
    response.close()
    assert events.kinds == ["admitted", "spent"]
    assert views == ["chunk 0", "chunk 1", "chunk 2"]


@pytest.mark.usefixtures("configured")
def test_free_routes_read_nothing(fake: FakeLensmor, views: list[Any]) -> None:
    assert Client().get("/free").content == b"free"
    assert fake.balance_requests == 0
    assert views == [None]


# Django's async stack (asgiref) runs on asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.usefixtures("configured")
async def test_async_stack(fake: FakeLensmor, events: Recorder, views: list[Any]) -> None:
    response = await AsyncClient().post("/async/events/ev-2/unlock")
    assert response.status_code == 200
    assert events.kinds == ["admitted", "spent"]
    spend, current = views[0]
    assert current is spend
    refused = [(await AsyncClient().post("/async/events/e/unlock")).status_code for _ in range(3)]
    assert refused == [200, 200, 402]


def test_charge_when_and_on_error_settings(guard: CreditGuard, events: Recorder) -> None:
    def on_error(request: Any, error: CreditGuardError) -> HttpResponse:
        return HttpResponse(f"top up: {type(error).__name__}", status=402)

    settings = {
        "GUARD": guard,
        "COSTS": {"POST /missing": 10, "POST /events/{id}/unlock": 31},
        "CHARGE_WHEN": lambda status: True,
        "ON_ERROR": on_error,
    }
    with override_settings(CREDITGUARD=settings):
        client = Client()
        assert client.post("/missing").status_code == 404
        refused = client.post("/events/e/unlock")
    assert (refused.status_code, refused.content) == (402, b"top up: InsufficientCredits")
    assert events.kinds == ["admitted", "spent", "denied"]


def test_decorator_sync_and_async(guard: CreditGuard, fake: FakeLensmor, views: list[Any]) -> None:
    with override_settings(CREDITGUARD={"GUARD": guard}):
        assert Client().get("/decorated").content == b"decorated"
        assert Client().get("/adecorated?n=2").content == b"adecorated"
        refused = Client().get("/adecorated?n=3")
    assert refused.status_code == 402
    assert refused.json()["required"] == 15
    assert fake.balance.total_balance == 10
    decorated, adecorated = views
    assert (decorated.balance_before.total_balance, decorated.balance_after) == (30, None)
    assert (adecorated.balance_before.total_balance, adecorated.balance_after) == (30, None)
    # No read of their own: the admission's (a cold cache), then the one the refused
    # request made, as the spends waiting for a read left it too little; that read
    # settled both (the 402 is on the balance after them: 10 available).
    assert refused.json()["available"] == 10
    assert fake.balance_requests == 2
    assert calls(guard) == (0, 0, 0)


# Django's async stack (asgiref) runs on asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_decorator_in_the_async_client(guard: CreditGuard, events: Recorder) -> None:
    with override_settings(CREDITGUARD={"GUARD": guard}):
        response = await AsyncClient().get("/adecorated?n=1")
    assert response.content == b"adecorated"
    assert events.kinds == ["admitted", "spent"]


def test_settings_build_a_guard_and_dotted_paths(fake: FakeLensmor) -> None:
    from creditguard.testing import serve

    with serve(fake.app) as url:
        config = {
            "API_KEY": fake.api_key,
            "BASE_URL": url,
            "OPTIONS": {"ttl": 9},
            "COSTS": "tests.web.test_django.COSTS",
            "CHARGE_WHEN": "tests.web.test_django.always",
        }
        with override_settings(CREDITGUARD=config):
            guard = guard_from_settings()
            assert (guard.base_url, guard.ttl) == (url, 9)
            assert Client().post("/missing").status_code == 404  # charged: always
            assert guard_from_settings() is guard
            assert fake.balance_requests == 1  # the admission's; no refresh after it
            assert calls(guard) == (10, 1, 1)  # charged: the spend waits for a read
            assert guard.balance().total_balance == 30  # /missing charged nothing
            assert fake.balance_requests == 2
            assert calls(guard) == (0, 0, 0)
            guard.close()


def always(status: int) -> bool:
    return True


def test_tenant_guard_callable(fake: FakeLensmor) -> None:
    shared = CreditGuard("placeholder", transport=fake.transport)

    def tenant(request: Any) -> CreditGuard:
        return shared.for_key(request.headers["X-Lensmor-Key"])

    with override_settings(CREDITGUARD={"GUARD": tenant, "COSTS": COSTS}):
        ok = Client().post("/events/e/unlock", headers={"X-Lensmor-Key": fake.api_key})
        bad = Client().post("/events/e/unlock", headers={"X-Lensmor-Key": "wrong"})
    assert (ok.status_code, bad.status_code) == (200, 500)


def test_bad_settings_fail_at_startup() -> None:
    with override_settings(CREDITGUARD={"COST": {}}), pytest.raises(CreditGuardError, match="COST"):
        CreditGuardMiddleware(lambda request: HttpResponse())
    with override_settings(CREDITGUARD=[]), pytest.raises(CreditGuardError, match="dict"):
        CreditGuardMiddleware(lambda request: HttpResponse())


def test_middleware_is_sync_and_async_capable() -> None:
    from asgiref.sync import iscoroutinefunction

    assert CreditGuardMiddleware.sync_capable
    assert CreditGuardMiddleware.async_capable

    async def get_response(request: Any) -> HttpResponse:
        return HttpResponse()

    with override_settings(CREDITGUARD={}):
        assert iscoroutinefunction(CreditGuardMiddleware(get_response))
        assert not iscoroutinefunction(CreditGuardMiddleware(lambda request: HttpResponse()))


CONDITIONAL = [
    "django.middleware.http.ConditionalGetMiddleware",
    "creditguard.django.CreditGuardMiddleware",
]
PAGE_COSTS = {"GET /page": 10}


def _conditional_gets(client: Client, path: str) -> list[int]:
    """A GET, then two GETs answered 304 by ``ConditionalGetMiddleware`` (outside ours):
    it replaces the response the view answered, and only the one it sends is closed."""
    first = client.get(path)
    etag = first["ETag"]
    return [first.status_code] + [
        client.get(path, headers={"If-None-Match": etag}).status_code for _ in range(2)
    ]


def test_a_response_replaced_by_an_outer_middleware_still_settles(
    guard: CreditGuard, fake: FakeLensmor, events: Recorder
) -> None:
    with override_settings(
        MIDDLEWARE=CONDITIONAL, CREDITGUARD={"GUARD": guard, "COSTS": PAGE_COSTS}
    ):
        assert _conditional_gets(Client(), "/page") == [200, 304, 304]
    assert events.kinds == ["admitted", "spent"] * 3
    assert fake.balance.total_balance == 0


def test_a_decorated_view_behind_a_replacing_middleware_settles(
    guard: CreditGuard, events: Recorder
) -> None:
    with override_settings(MIDDLEWARE=CONDITIONAL, CREDITGUARD={"GUARD": guard}):
        assert _conditional_gets(Client(), "/decorated-page") == [200, 304, 304]
    assert events.kinds == ["admitted", "spent"] * 3


# Django's async stack (asgiref) runs on asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_replaced_responses_settle_in_the_async_stack(
    guard: CreditGuard, events: Recorder
) -> None:
    with override_settings(
        MIDDLEWARE=CONDITIONAL, CREDITGUARD={"GUARD": guard, "COSTS": PAGE_COSTS}
    ):
        client = AsyncClient()
        first = await client.get("/page")
        again = await client.get("/page", headers={"If-None-Match": first["ETag"]})
    assert (first.status_code, again.status_code) == (200, 304)
    assert events.kinds == ["admitted", "spent"] * 2


def test_head_is_priced_as_its_get(guard: CreditGuard, events: Recorder, views: list[Any]) -> None:
    with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": PAGE_COSTS}):
        assert Client().head("/page").status_code == 200
    assert events.kinds == ["admitted", "spent"]
    assert views[0] is not None


def test_converters_in_cost_patterns(guard: CreditGuard, views: list[Any]) -> None:
    costs = {"GET /items/{item_id:int}": 1, "GET /files/{rest:path}": 1}
    with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": costs}):
        assert Client().get("/items/12").content == b"item 12"
        assert Client().get("/files/a/b.txt").content == b"file a/b.txt"
    assert all(spend is not None for spend in views)
    assert len(views) == 2


def test_current_spend_accessor(guard: CreditGuard, views: list[Any]) -> None:
    from django.test import RequestFactory

    from creditguard import Spend
    from creditguard.django import current_spend

    with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": PAGE_COSTS}):
        assert Client().get("/page").status_code == 200
    assert isinstance(views[0], Spend)
    request = RequestFactory().get("/page")
    assert current_spend(request) is None
    request.creditguard_spend = views[0]
    assert current_spend(request) is views[0]


def test_the_route_django_runs_is_priced_by_its_own_pattern(
    guard: CreditGuard, events: Recorder, views: list[Any]
) -> None:
    # Django tries its URL patterns in order: "shadow/<str:name>" takes /shadow/free,
    # which the cost mapping's literal pattern prices 0.
    costs = {"GET /shadow/{who}": 10, "GET /shadow/free": 0}
    with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": costs}):
        assert Client().get("/shadow/free").content == b"shadow free"
    assert views[0] is not None
    assert events.kinds == ["admitted", "spent"]


@pytest.mark.usefixtures("configured")
def test_a_response_dropped_unclosed_by_an_outer_layer_ends_its_spend(
    guard: CreditGuard, events: Recorder
) -> None:
    """A WSGI layer outside Django that drops the response unclosed (PEP 3333 asks it to
    close it) never lets Django send ``request_finished``; the request's thread (a
    thread-per-request server's) ends with it. The spend ends as failed, not stranded."""
    import gc
    import io
    import threading

    from django.core.handlers.wsgi import WSGIHandler

    handler = WSGIHandler()
    sent: list[bytes] = []

    def serve() -> None:
        env = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/events/ev-1/unlock",
            "SERVER_NAME": "testserver",
            "SERVER_PORT": "80",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
        }
        sent.append(b"".join(handler(env, lambda *args: None)))  # never closed

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    gc.collect()
    assert sent == [b'{"event": "ev-1"}']
    assert events.kinds == ["admitted", "failed"]
    assert isinstance(events.events[-1].error, ActionFailed)
    assert calls(guard) == (0, 0, 0)


def test_replaced_responses_settle_under_a_real_asgi_server(fake: FakeLensmor) -> None:
    """Django's ASGI handler runs the view in a task of its own and closes the response
    (``request_finished``) outside it: the spend still settles, 304 or not."""
    import threading

    from django.core.asgi import get_asgi_application

    from creditguard import GuardEvent, RetryPolicy
    from creditguard.testing import serve

    kinds: list[str] = []
    settled = threading.Event()

    def on_event(event: GuardEvent) -> None:
        kinds.append(event.kind)
        if kinds.count("spent") + kinds.count("failed") == 2:
            settled.set()

    with (
        CreditGuard(
            fake.api_key,
            transport=fake.transport,
            ttl=60,
            on_event=on_event,
            retry=RetryPolicy(attempts=1),
        ) as guard,
        override_settings(
            MIDDLEWARE=CONDITIONAL, CREDITGUARD={"GUARD": guard, "COSTS": PAGE_COSTS}
        ),
    ):
        django_app = get_asgi_application()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":  # Django's handler takes HTTP only
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            await django_app(scope, receive, send)

        with serve(app) as url, httpx.Client(base_url=url) as http:
            first = http.get("/page")
            again = http.get("/page", headers={"If-None-Match": first.headers["ETag"]})
            assert settled.wait(15), kinds
    assert (first.status_code, again.status_code) == (200, 304)
    assert sorted(kinds) == ["admitted", "admitted", "spent", "spent"]
