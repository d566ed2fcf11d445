"""A streamed response whose body fails part-way is not charged, in every adapter: its
spend ends as failed with the stream's exception (released, cached balance distrusted),
as the ASGI and WSGI middlewares end it (``test_asgi``, ``test_wsgi``)."""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator

import pytest
from flask import Flask, Response, send_file, stream_with_context

from creditguard import CreditGuard
from creditguard.flask import CreditGuardExtension, requires_credits

from .conftest import Recorder, calls


def test_flask_stream_that_fails_part_way_is_not_charged(
    guard: CreditGuard, events: Recorder
) -> None:
    app = Flask(__name__)
    CreditGuardExtension(app, guard=guard)

    @app.get("/broken")
    @requires_credits(10)
    def broken() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"a"
            raise RuntimeError("the export failed")

        return Response(stream_with_context(chunks()))

    @app.get("/plain")
    @requires_credits(10)
    def plain() -> Response:  # a generator outside the request context
        def chunks() -> Iterator[bytes]:
            yield b"a"
            raise RuntimeError("the export failed")

        return Response(chunks())

    for path in ("/broken", "/plain"):
        events.events.clear()
        with pytest.raises(RuntimeError, match="the export failed"):
            app.test_client().get(path, buffered=True)  # iterated, then closed
        assert events.kinds == ["admitted", "failed"], path
        assert isinstance(events.events[-1].error, RuntimeError)
        assert calls(guard) == (0, 0, 0)  # released at once: no read needed


def test_flask_file_response_is_charged_after_its_last_byte(
    guard: CreditGuard, events: Recorder
) -> None:
    """``send_file`` answers with ``direct_passthrough``: Werkzeug hands the server the
    file itself, and the server closes that, not the response."""
    app = Flask(__name__)
    CreditGuardExtension(app, guard=guard)

    @app.get("/report")
    @requires_credits(10)
    def report() -> Response:
        return send_file(io.BytesIO(b"the report"), mimetype="text/plain")

    response = app.test_client().get("/report", buffered=False)
    assert events.kinds == ["admitted"]  # handed over, not yet sent
    assert response.get_data() == b"the report"
    response.close()
    assert events.kinds == ["admitted", "spent"]
    assert calls(guard) == (10, 1, 1)  # charged: waits for a read that includes it
    guard.balance()
    assert calls(guard) == (0, 0, 0)

    events.events.clear()
    dropped = app.test_client().get("/report", buffered=False)
    del dropped  # dropped unclosed by a layer outside Flask: not stranded
    gc.collect()
    assert events.kinds == ["admitted", "failed"]
    assert calls(guard) == (0, 0, 0)


@pytest.fixture
def django_costs(guard: CreditGuard) -> Iterator[None]:
    from django.test import override_settings

    costs = {"GET /broken-stream": 10, "GET /abroken-stream": 10}
    with override_settings(CREDITGUARD={"GUARD": guard, "COSTS": costs}):
        yield


@pytest.mark.usefixtures("django_costs")
def test_django_stream_that_fails_part_way_is_not_charged(
    guard: CreditGuard, events: Recorder
) -> None:
    from django.test import Client

    response = Client().get("/broken-stream")
    with pytest.raises(RuntimeError, match="the export failed"):
        b"".join(response.streaming_content)
    response.close()  # what the WSGI server does after the error
    assert events.kinds == ["admitted", "failed"]
    assert isinstance(events.events[-1].error, RuntimeError)
    assert calls(guard) == (0, 0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Django's async stack: asyncio
@pytest.mark.usefixtures("django_costs")
async def test_django_async_stream_that_fails_part_way_is_not_charged(
    guard: CreditGuard, events: Recorder
) -> None:
    from django.test import AsyncClient

    response = await AsyncClient().get("/abroken-stream")
    with pytest.raises(RuntimeError, match="the export failed"):
        async for _ in response.streaming_content:
            pass
    assert events.kinds == ["admitted", "failed"]
    assert isinstance(events.events[-1].error, RuntimeError)
    assert calls(guard) == (0, 0, 0)
