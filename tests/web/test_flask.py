"""creditguard.flask: the view decorator and the extension, through Flask's test client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, g, request, stream_with_context

from creditguard import CreditGuard, CreditGuardError, Spend, current_spend
from creditguard.flask import EXTENSION_KEY, ActionFailed, CreditGuardExtension, requires_credits
from creditguard.testing import FakeLensmor

from .conftest import Clock, Recorder, calls


def make_app(
    fake: FakeLensmor, seen: list[Any], watch: CreditGuard | None = None, **ext: Any
) -> Flask:
    app = Flask(__name__)
    CreditGuardExtension(app, **ext)

    @app.post("/events/<event_id>/unlock")
    @requires_credits(10)
    def unlock(event_id: str) -> dict[str, str]:
        seen.append((g.creditguard_spend, current_spend()))
        if watch is not None:  # the account as the view runs
            seen.append(calls(watch))
        fake.charge(10)
        return {"event": event_id}

    @app.post("/bulk")
    @requires_credits(lambda req: 5 * int(req.args["n"]))
    async def bulk() -> dict[str, int]:  # an async view
        seen.append(current_spend())
        fake.charge(g.creditguard_spend.cost)
        return {"spent": g.creditguard_spend.cost}

    @app.post("/missing")
    @requires_credits(10)
    def missing() -> tuple[str, int]:
        return "no such event", 404

    @app.post("/boom")
    @requires_credits(10)
    def boom() -> str:
        raise RuntimeError("the paid call failed")

    @app.get("/stream")
    @requires_credits(10)
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            for i in range(3):
                seen.append(f"chunk {i}")
                yield "x"
            fake.charge(10)

        return Response(stream_with_context(chunks()))

    @app.get("/free")
    @requires_credits(0)
    def free() -> str:
        return "free"

    return app


@pytest.fixture
def seen() -> list[Any]:
    return []


@pytest.fixture
def app(fake: FakeLensmor, guard: CreditGuard, seen: list[Any]) -> Flask:
    return make_app(fake, seen, guard=guard)


def test_paid_view_settles_when_the_response_closes(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    client = make_app(fake, seen, watch=guard, guard=guard).test_client()
    response = client.post("/events/ev-1/unlock", buffered=True)
    assert response.status_code == 200
    assert response.json == {"event": "ev-1"}
    assert events.kinds == ["admitted", "spent"]
    (spend, current), during = seen
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
    """Requests one after another make one upstream balance read per TTL, not one per
    request; the read after them includes every charge."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    seen: list[Any] = []
    with CreditGuard(fake.api_key, transport=fake.transport, ttl=60) as guard:
        client = make_app(fake, seen, guard=guard).test_client()
        for i in range(4):
            assert client.post(f"/events/a{i}/unlock", buffered=True).status_code == 200
        assert fake.balance_requests == 1  # the first admission's (a cold cache)
        assert calls(guard) == (40, 4, 4)
        clock.advance(61)  # the cached balance has outlived its TTL
        for i in range(4):
            assert client.post(f"/events/b{i}/unlock", buffered=True).status_code == 200
        assert fake.balance_requests == 2  # one more admission read settled a0..a3
        assert calls(guard) == (40, 4, 4)
        assert guard.balance().total_balance == 20 == fake.balance.total_balance
        assert fake.balance_requests == 3
        assert calls(guard) == (0, 0, 0)
    befores = [spend.balance_before.total_balance for spend, _ in seen]
    assert befores == [100] * 4 + [60] * 4  # reservations, not the balance, carried the rest


def test_settling_waits_for_close(app: Flask, events: Recorder) -> None:
    environ_response = app.test_client().post("/events/e/unlock", buffered=False)
    # The test client hands over the response without closing it: not settled yet.
    assert events.kinds == ["admitted"]
    environ_response.close()
    assert events.kinds == ["admitted", "spent"]


def test_async_view_and_callable_cost(app: Flask, fake: FakeLensmor, seen: list[Any]) -> None:
    client = app.test_client()
    assert client.post("/bulk?n=3", buffered=True).json == {"spent": 15}
    refused = client.post("/bulk?n=4", buffered=True)
    assert refused.status_code == 402
    assert refused.content_type == "application/problem+json"
    assert refused.json["required"] == 20
    assert refused.json["available"] == 15
    assert seen[0] is not None


def test_503_and_500(app: Flask, fake: FakeLensmor) -> None:
    client = app.test_client()
    fake.fail_next(429, headers={"Retry-After": "3"})
    unavailable = client.post("/events/e/unlock", buffered=True)
    assert unavailable.status_code == 503
    assert unavailable.headers["Retry-After"] == "3"
    assert unavailable.json["error"] == "balance_unavailable"
    fake.fail_next(401)
    rejected = client.post("/events/e/unlock", buffered=True)
    assert rejected.status_code == 500
    assert rejected.json["error"] == "credits_misconfigured"
    assert fake.api_key not in rejected.get_data(as_text=True)


def test_raising_view_and_error_status_release(app: Flask, events: Recorder) -> None:
    client = app.test_client()
    assert client.post("/boom", buffered=True).status_code == 500
    assert client.post("/missing", buffered=True).status_code == 404
    assert events.kinds == ["admitted", "failed", "admitted", "failed"]
    assert isinstance(events.events[1].error, RuntimeError)
    assert isinstance(events.events[3].error, ActionFailed)
    statuses = [client.post(f"/events/{i}/unlock", buffered=True).status_code for i in range(3)]
    assert statuses == [200, 200, 200]


def test_charge_when_from_the_extension(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    app = make_app(fake, seen, guard=guard, charge_when=lambda status: True)
    assert app.test_client().post("/missing", buffered=True).status_code == 404
    assert events.kinds == ["admitted", "spent"]


def test_streaming_settles_after_the_last_chunk(fake: FakeLensmor) -> None:
    order: list[str] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=lambda e: order.append(e.kind)
    )
    app = make_app(fake, order, guard=guard)
    assert app.test_client().get("/stream", buffered=True).data == b"xxx"
    assert order == ["admitted", "chunk 0", "chunk 1", "chunk 2", "spent"]


def test_free_view_reads_nothing(app: Flask, fake: FakeLensmor) -> None:
    assert app.test_client().get("/free", buffered=True).data == b"free"
    assert fake.balance_requests == 0


def test_after_request_replacing_the_response_still_settles(app: Flask, events: Recorder) -> None:
    @app.after_request
    def replace(response: Response) -> Response:
        return Response("replaced", status=response.status_code)

    response = app.test_client().post("/events/e/unlock", buffered=True)
    assert response.data == b"replaced"
    assert events.kinds == ["admitted", "spent"]


def test_after_request_failing_ends_the_spend_as_failed(app: Flask, events: Recorder) -> None:
    @app.after_request
    def broken(response: Response) -> Response:
        if request.path.startswith("/events/"):
            raise RuntimeError("after_request failed")
        return response

    assert app.test_client().post("/events/e/unlock", buffered=True).status_code == 500
    assert events.kinds == ["admitted", "failed"]


def test_on_error_replaces_the_answer(fake: FakeLensmor, guard: CreditGuard) -> None:
    app = Flask(__name__)

    def on_error(req: Any, error: CreditGuardError) -> tuple[str, int]:
        return f"top up for {req.path}", 402

    @app.post("/x")
    @requires_credits(31, guard=guard, on_error=on_error)
    def x() -> str:
        raise AssertionError("not admitted")

    response = app.test_client().post("/x", buffered=True)
    assert (response.status_code, response.data) == (402, b"top up for /x")


def test_extension_builds_its_guard_from_app_config(fake: FakeLensmor) -> None:
    from creditguard.testing import serve

    with serve(fake.app) as url:
        app = Flask(__name__)
        app.config.update(
            LENSMOR_API_KEY=fake.api_key,
            LENSMOR_BASE_URL=url,
            CREDITGUARD_OPTIONS={"ttl": 30},
        )
        credits = CreditGuardExtension()
        credits.init_app(app)

        @app.post("/x")
        @requires_credits(10)
        def x() -> str:
            return "ok"

        assert app.test_client().post("/x", buffered=True).data == b"ok"
        guard = CreditGuardExtension.guard_of(app)
        assert isinstance(guard, CreditGuard)
        assert (guard.base_url, guard.ttl) == (url, 30)
        assert EXTENSION_KEY in app.extensions
        assert fake.balance_requests == 1  # the admission's; no refresh after the response
        assert calls(guard) == (10, 1, 1)  # the spend waits for a read
        assert guard.balance().total_balance == 30  # /x charged nothing
        assert fake.balance_requests == 2
        assert calls(guard) == (0, 0, 0)
        guard.close()


def test_guard_of_without_init_app() -> None:
    with pytest.raises(CreditGuardError, match="init_app"):
        CreditGuardExtension.guard_of(Flask(__name__))


def test_without_the_extension_the_default_guard_is_used(
    fake: FakeLensmor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from creditguard.guard import guard as _guard
    from creditguard.testing import serve

    with serve(fake.app) as url:
        monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
        monkeypatch.setenv("LENSMOR_BASE_URL", url)
        monkeypatch.setattr(_guard, "_default", None)
        app = Flask(__name__)

        @app.post("/x")
        @requires_credits(10)
        def x() -> str:
            return "ok"

        assert app.test_client().post("/x", buffered=True).data == b"ok"
        assert _guard._default is not None
        _guard._default.close()


def test_module_then_framework_import() -> None:
    import importlib

    import creditguard.flask

    flask = importlib.import_module("flask")
    assert flask.Flask is Flask
    assert creditguard.flask.requires_credits is requires_credits
    assert json.loads("{}") == {}


def test_current_spend_accessor(guard: CreditGuard) -> None:
    from creditguard.flask import current_spend as flask_spend

    app = Flask(__name__)
    CreditGuardExtension(app, guard=guard)
    found: list[Any] = []

    @app.get("/paid")
    @requires_credits(10)
    def paid() -> str:
        found.append(flask_spend())
        return "paid"

    @app.get("/plain")
    def plain() -> str:
        found.append(flask_spend())
        return "plain"

    client = app.test_client()
    assert client.get("/paid").status_code == client.get("/plain").status_code == 200
    assert isinstance(found[0], Spend)
    assert found[0].cost == 10
    assert found[1] is None
    assert flask_spend() is None  # outside any request


def test_a_response_dropped_unclosed_by_an_outer_layer_ends_its_spend(
    app: Flask, events: Recorder
) -> None:
    import gc

    from werkzeug.test import Client

    inner = app.wsgi_app

    def replacing(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        """A WSGI layer outside Flask that answers its own body and never closes Flask's."""
        b"".join(inner(environ, lambda status, headers, exc_info=None: lambda data: None))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"replaced"]

    app.wsgi_app = replacing  # type: ignore[method-assign]
    response = Client(app).post("/events/e/unlock")
    gc.collect()
    assert response.get_data() == b"replaced"
    assert events.kinds == ["admitted", "failed"]  # released, not stranded
