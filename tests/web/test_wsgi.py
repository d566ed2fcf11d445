"""creditguard.wsgi: the pure WSGI middleware, called as a PEP 3333 server would."""

from __future__ import annotations

import gc
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from creditguard import CreditGuard, CreditGuardError, current_spend
from creditguard.testing import FakeLensmor
from creditguard.wsgi import SPEND_KEY, ActionFailed, CreditGuardMiddleware

from .conftest import Clock, Recorder, calls

COSTS = {
    "POST /events/{event_id}/unlock": 10,
    "GET /files/{name:path}": 10,
    "POST /boom": 10,
    "POST /zero": 0,
}


def environ(method: str, path: str, **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, **extra}
    setup_testing_defaults(env)
    env["wsgi.input"] = io.BytesIO()
    return env


class Server:
    """Calls a WSGI app the way a server does: start_response, iterate, close."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def call(
        self, env: dict[str, Any], *, close: bool = True
    ) -> tuple[int, dict[str, str], bytes, Any]:
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return lambda data: None

        result = self.app(env, start_response)
        body = b"".join(result)
        if close and hasattr(result, "close"):
            result.close()
        return int(started[0][:3]), dict(started[1]), body, result


def plain_app(
    fake: FakeLensmor, seen: list[Any], watch: CreditGuard | None = None
) -> Callable[..., Iterable[bytes]]:
    def app(env: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = env["PATH_INFO"]
        seen.append((env.get(SPEND_KEY), current_spend()))
        if watch is not None:  # the account as the app runs
            seen.append(calls(watch))
        if path == "/boom":
            raise RuntimeError("the paid call failed")
        if path == "/missing":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no"]
        if path.startswith("/files/"):
            return stream(start_response)
        fake.charge(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"unlocked"]

    def stream(start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])  # lazily, as generators do
        for i in range(3):
            seen.append(f"chunk {i}")
            yield b"x"
        fake.charge(10)

    return app


@pytest.fixture
def seen() -> list[Any]:
    return []


@pytest.fixture
def server(fake: FakeLensmor, guard: CreditGuard, seen: list[Any]) -> Server:
    return Server(CreditGuardMiddleware(plain_app(fake, seen), guard=guard, cost=COSTS))


def test_paid_request_settles_in_close(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    server = Server(
        CreditGuardMiddleware(plain_app(fake, seen, watch=guard), guard=guard, cost=COSTS)
    )
    status, _, body, result = server.call(environ("POST", "/events/e1/unlock"), close=False)
    assert (status, body) == (200, b"unlocked")
    (spend, current), during = seen
    assert current is spend
    assert spend.balance_before.total_balance == 30
    assert during == (10, 1, 0)  # admitted before the app ran: its cost reserved
    assert events.kinds == ["admitted"]  # the server has the body; not settled yet
    assert calls(guard) == (10, 1, 0)
    result.close()
    assert events.kinds == ["admitted", "spent"]
    # Settled as a decorated call is: no read of its own (the one read is the admission's,
    # on a cold cache); the spend has exited and its reservation waits for the next read.
    assert fake.balance_requests == 1
    assert spend.balance_after is None
    assert calls(guard) == (10, 1, 1)
    result.close()  # idempotent
    assert events.kinds == ["admitted", "spent"]
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
        server = Server(CreditGuardMiddleware(plain_app(fake, seen), guard=guard, cost=COSTS))
        for i in range(4):
            assert server.call(environ("POST", f"/events/a{i}/unlock"))[0] == 200
        assert fake.balance_requests == 1  # the first admission's (a cold cache)
        assert calls(guard) == (40, 4, 4)
        clock.advance(61)  # the cached balance has outlived its TTL
        for i in range(4):
            assert server.call(environ("POST", f"/events/b{i}/unlock"))[0] == 200
        assert fake.balance_requests == 2  # one more admission read settled a0..a3
        assert calls(guard) == (40, 4, 4)
        assert guard.balance().total_balance == 20 == fake.balance.total_balance
        assert fake.balance_requests == 3
        assert calls(guard) == (0, 0, 0)
    befores = [spend.balance_before.total_balance for spend, _ in seen]
    assert befores == [100] * 4 + [60] * 4  # reservations, not the balance, carried the rest


def test_402_503_and_500_answers(server: Server, fake: FakeLensmor, seen: list[Any]) -> None:
    fake.fail_next(429, headers={"Retry-After": "7"})
    status, headers, body, _ = server.call(environ("POST", "/events/e/unlock"))
    assert status == 503
    assert headers["retry-after"] == "7"
    assert json.loads(body)["error"] == "balance_unavailable"
    fake.fail_next(403)
    status, headers, body, _ = server.call(environ("POST", "/events/e/unlock"))
    assert status == 500
    assert json.loads(body)["error"] == "credits_misconfigured"
    assert fake.api_key.encode() not in body
    for _ in range(3):
        assert server.call(environ("POST", "/events/e/unlock"))[0] == 200
    status, headers, body, _ = server.call(environ("POST", "/events/e/unlock"))
    assert status == 402
    assert headers["content-type"] == "application/problem+json"
    assert int(headers["Content-Length"]) == len(body)
    problem = json.loads(body)
    assert (problem["error"], problem["required"], problem["available"]) == (
        "insufficient_credits",
        10,
        0,
    )
    assert len(seen) == 3


def test_raising_app_releases_at_once(server: Server, events: Recorder) -> None:
    with pytest.raises(RuntimeError):
        server.call(environ("POST", "/boom"), close=False)
    assert events.kinds == ["admitted", "failed"]
    for _ in range(3):
        assert server.call(environ("POST", "/events/e/unlock"))[0] == 200


def test_error_status_is_not_charged_unless_charge_when(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    cost = {"POST /missing": 10}
    server = Server(CreditGuardMiddleware(plain_app(fake, seen), guard=guard, cost=cost))
    assert server.call(environ("POST", "/missing"))[0] == 404
    error = events.events[-1].error
    assert isinstance(error, ActionFailed)
    assert error.status == 404
    lenient = CreditGuardMiddleware(
        plain_app(fake, seen), guard=guard, cost=cost, charge_when=lambda status: status != 500
    )
    assert Server(lenient).call(environ("POST", "/missing"))[0] == 404
    assert events.kinds == ["admitted", "failed", "admitted", "spent"]


def test_streaming_body_settles_after_the_last_chunk(fake: FakeLensmor, seen: list[Any]) -> None:
    order: list[str] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=lambda e: order.append(e.kind)
    )
    server = Server(CreditGuardMiddleware(plain_app(fake, order), guard=guard, cost=COSTS))
    status, _, body, _ = server.call(environ("GET", "/files/a/b.csv"))
    assert (status, body) == (200, b"xxx")
    assert order[0] == "admitted"
    assert order[-4:] == ["chunk 0", "chunk 1", "chunk 2", "spent"]


def test_error_while_iterating_ends_the_spend_as_failed(
    guard: CreditGuard, events: Recorder
) -> None:
    def app(env: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"a"
        raise OSError("disk gone")

    server = Server(CreditGuardMiddleware(app, guard=guard, cost={"GET /": 10}))
    env = environ("GET", "/")
    result = CreditGuardMiddleware(app, guard=guard, cost={"GET /": 10})(env, lambda *a: None)
    with pytest.raises(OSError, match="disk gone"):
        list(result)
    result.close()  # type: ignore[attr-defined]
    assert events.kinds == ["admitted", "failed"]
    assert isinstance(events.events[-1].error, OSError)
    assert server.app is not None


def test_a_body_that_fails_to_start_iterating_ends_the_spend_as_failed(
    guard: CreditGuard, events: Recorder
) -> None:
    class Export:
        """A body that opens its file when iterated: the file is gone."""

        def __iter__(self) -> Iterator[bytes]:
            raise FileNotFoundError("export.csv")

    def app(env: dict[str, Any], start_response: Any) -> Export:
        start_response("200 OK", [])
        return Export()

    result = CreditGuardMiddleware(app, guard=guard, cost={"GET /": 10})(
        environ("GET", "/"), lambda *a: None
    )
    with pytest.raises(FileNotFoundError):
        list(result)
    result.close()  # type: ignore[attr-defined]
    assert events.kinds == ["admitted", "failed"]
    assert isinstance(events.events[-1].error, FileNotFoundError)
    assert calls(guard) == (0, 0, 0)


def test_inner_iterable_is_closed_once(guard: CreditGuard, events: Recorder) -> None:
    closed: list[str] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"a"])

        def close(self) -> None:
            closed.append("closed")

    def app(env: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return Body()

    result = CreditGuardMiddleware(app, guard=guard, cost={"GET /": 10})(
        environ("GET", "/"), lambda *a: None
    )
    assert list(result) == [b"a"]
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert closed == ["closed"]
    assert events.kinds == ["admitted", "spent"]


def test_start_response_exc_info_is_forwarded(guard: CreditGuard) -> None:
    forwarded: list[Any] = []

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            raise ValueError("x")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b""]

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        forwarded.append(exc_info)
        return lambda data: None

    result = CreditGuardMiddleware(app, guard=guard, cost={"GET /": 1})(
        environ("GET", "/"), start_response
    )
    list(result)
    result.close()  # type: ignore[attr-defined]
    assert forwarded[0][0] is ValueError


def test_free_routes_read_nothing(server: Server, fake: FakeLensmor, seen: list[Any]) -> None:
    outer = current_spend()  # free routes leave it alone
    assert server.call(environ("GET", "/events/e/unlock"))[0] == 200  # GET is not priced
    assert server.call(environ("POST", "/zero"))[0] == 200
    assert fake.balance_requests == 0
    assert seen == [(None, outer), (None, outer)]


def test_on_error_and_tenant_guards(fake: FakeLensmor, seen: list[Any]) -> None:
    shared = CreditGuard(fake.api_key, transport=fake.transport)

    def on_error(env: dict[str, Any], error: CreditGuardError) -> Any:
        def answer(env: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("402 Payment Required", [("Content-Type", "text/plain")])
            return [type(error).__name__.encode()]

        return answer

    app = CreditGuardMiddleware(
        plain_app(fake, seen),
        guard=lambda env: shared.for_key(env["HTTP_X_LENSMOR_KEY"]),
        cost=lambda env: 40 if env["PATH_INFO"].startswith("/events/") else 0,
        on_error=on_error,
    )
    status, _, body, _ = Server(app).call(
        environ("POST", "/events/e/unlock", HTTP_X_LENSMOR_KEY=fake.api_key)
    )
    assert (status, body) == (402, b"InsufficientCredits")
    status, _, body, _ = Server(app).call(
        environ("POST", "/events/e/unlock", HTTP_X_LENSMOR_KEY="nope")
    )
    assert (status, body) == (402, b"AuthenticationError")


def test_arguments_are_checked(guard: CreditGuard) -> None:
    async def acost(env: Any) -> int:
        return 1

    with pytest.raises(TypeError, match="synchronous"):
        CreditGuardMiddleware(plain_app(FakeLensmor(), []), guard=guard, cost=acost)
    with pytest.raises(TypeError, match="not an int"):
        CreditGuardMiddleware(plain_app(FakeLensmor(), []), guard=guard, cost=3)
    with pytest.raises(ValueError, match="start with"):
        CreditGuardMiddleware(plain_app(FakeLensmor(), []), guard=guard, cost={"GET x": 3})


def test_a_response_dropped_unclosed_by_an_outer_layer_ends_its_spend(
    fake: FakeLensmor, guard: CreditGuard, events: Recorder, seen: list[Any]
) -> None:
    guarded = CreditGuardMiddleware(plain_app(fake, seen), guard=guard, cost=COSTS)

    def replacing(env: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """A layer outside ours that answers its own body and never closes ours."""
        inner = guarded(env, lambda status, headers, exc_info=None: lambda data: None)
        b"".join(inner)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"replaced"]

    status, _, body, _ = Server(replacing).call(environ("POST", "/events/e/unlock"))
    gc.collect()
    assert (status, body) == (200, b"replaced")
    assert events.kinds == ["admitted", "failed"]  # released, not stranded


def test_head_is_priced_as_its_get(server: Server, events: Recorder) -> None:
    status, _, _, _ = server.call(environ("HEAD", "/files/a.txt"))
    assert status == 200
    assert events.kinds == ["admitted", "spent"]


def test_a_non_ascii_path_is_priced_as_the_framework_decodes_it(
    guard: CreditGuard, events: Recorder
) -> None:
    """PEP 3333 hands ``PATH_INFO`` over as bytes decoded as latin-1; Flask and Django
    route on it decoded as UTF-8, and so must the patterns match it."""
    from flask import Flask

    flask_app = Flask(__name__)

    @flask_app.get("/café/<name>")
    def menu(name: str) -> str:
        return f"menu {name}"

    app = CreditGuardMiddleware(flask_app, guard=guard, cost={"GET /café/{name}": 10})
    wire = "/café/crème".encode().decode("latin-1")  # as a WSGI server passes it
    status, _, body, _ = Server(app).call(environ("GET", wire))
    assert (status, body) == (200, "menu crème".encode())
    assert events.kinds == ["admitted", "spent"]
    status, _, _, _ = Server(app).call(environ("GET", "/caf\xe9/x"))  # latin-1, not UTF-8
    assert status == 404
    assert events.kinds == ["admitted", "spent"]


def test_an_unreachable_credit_state_store_is_named(fake: FakeLensmor, seen: list[Any]) -> None:
    from creditguard.redis import RedisBackend

    backend = RedisBackend("redis://127.0.0.1:1/0")  # nothing listens there
    with CreditGuard(fake.api_key, transport=fake.transport, backend=backend) as guard:
        app = CreditGuardMiddleware(plain_app(fake, seen), guard=guard, cost=COSTS)
        status, _, body, _ = Server(app).call(environ("POST", "/events/e/unlock"))
    problem = json.loads(body)
    assert status == 503
    assert problem["error"] == "balance_unavailable"
    assert problem["detail"] == "the credit state store is unavailable right now"
    assert "Lensmor" not in problem["detail"]
    assert seen == []
