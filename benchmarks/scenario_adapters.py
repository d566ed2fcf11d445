#!/usr/bin/env python3
"""``adapters``: the per-request time each framework adapter adds, beside the core's own.

For each adapter, in process and on a warm cache (zero-latency in-memory upstream), the
same app is called unguarded and guarded, and a bare ``guard.spend(1)`` block (the
core's own logic: admission, then the refresh read after the action) is timed beside
them. A variant's value is ``(guarded - unguarded) - core`` in microseconds per request:
what the adapter itself costs. ``added_us`` (guarded - unguarded) and ``core_us`` are
recorded beside it.

ASGI apps (``asgi``, ``starlette``, ``fastapi``) are called directly with a prepared
scope, ``receive`` and ``send`` on asyncio; WSGI apps (``wsgi``, ``flask``, ``django``)
with a prepared environ, iterating and closing the response as a server does.

Standalone: ``python benchmarks/scenario_adapters.py [--quick|--smoke]`` prints a table.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import sys
import time
import types
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor

SCENARIO = "adapters"
TARGET_US = 10.0  # per request, over the core guard's own logic
ADAPTERS = ("asgi", "starlette", "fastapi", "wsgi", "flask", "django")

SyncRun = Callable[[], None]
AsyncRun = Callable[[], Awaitable[None]]


def _guard() -> CreditGuard:
    fake = FakeLensmor(subscription_balance=10**12, gift_balance=0, api_key="bench-key")
    return CreditGuard(
        fake.api_key, base_url="https://lensmor.bench.invalid", transport=fake.transport, ttl=3600
    )


# -- ASGI ------------------------------------------------------------------------------


def _asgi_call(app: Any, method: str, path: str) -> AsyncRun:
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "server": ("bench", 80),
        "client": ("127.0.0.1", 1234),
    }
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: Any) -> None:
        pass

    async def call() -> None:
        await app(dict(scope_base), receive, send)

    return call


def _raw_asgi() -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def unlock(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/events/{event_id}/unlock", unlock, methods=["POST"])])


def _fastapi(guard: CreditGuard | None) -> Any:
    from fastapi import Depends, FastAPI

    from creditguard.fastapi import RequireCredits

    app = FastAPI()
    deps = [] if guard is None else [Depends(RequireCredits(1, guard=guard))]

    @app.post("/events/{event_id}/unlock", dependencies=deps)
    async def unlock(event_id: str) -> str:
        return event_id

    return app


def _asgi_pair(adapter: str, guard: CreditGuard) -> tuple[AsyncRun, AsyncRun]:
    from creditguard.asgi import CreditGuardMiddleware

    cost = {"POST /events/{event_id}/unlock": 1}
    path = "/events/ev-1/unlock"
    if adapter == "asgi":
        bare = _raw_asgi()
        guarded = CreditGuardMiddleware(_raw_asgi(), guard=guard, cost=cost)
    elif adapter == "starlette":
        bare = _starlette()
        guarded = CreditGuardMiddleware(_starlette(), guard=guard, cost=cost)
    else:
        bare, guarded = _fastapi(None), _fastapi(guard)
    return _asgi_call(bare, "POST", path), _asgi_call(guarded, "POST", path)


# -- WSGI ------------------------------------------------------------------------------


def _wsgi_call(app: Any, method: str, path: str) -> SyncRun:
    base = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "bench",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    def call() -> None:
        environ = dict(base)
        environ["wsgi.input"] = io.BytesIO()
        result: Iterable[bytes] = app(environ, start_response)
        for _ in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()

    return call


def _raw_wsgi(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _flask(guard: CreditGuard | None) -> Any:
    from flask import Flask

    from creditguard.flask import CreditGuardExtension, requires_credits

    app = Flask(f"bench_{id(guard)}")

    def unlock(event_id: str) -> str:
        return event_id

    if guard is not None:
        CreditGuardExtension(app, guard=guard)
        unlock = requires_credits(1)(unlock)  # type: ignore[assignment]
    app.add_url_rule("/events/<event_id>/unlock", view_func=unlock, methods=["POST"])
    return app


def _django(guard: CreditGuard) -> tuple[Any, Any]:
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="bench",
            ALLOWED_HOSTS=["bench"],
            ROOT_URLCONF="bench_adapters_urls",
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            DATABASES={},
        )
        import django

        django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.http import HttpResponse
    from django.test import override_settings
    from django.urls import path

    from creditguard.django import requires_credits

    def unlock(request: Any, event_id: str) -> Any:
        return HttpResponse(event_id)

    urls = types.ModuleType("bench_adapters_urls")
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("bare/<str:event_id>/unlock", unlock),
        path("events/<str:event_id>/unlock", requires_credits(1, guard=guard)(unlock)),
    ]
    sys.modules[urls.__name__] = urls
    override = override_settings(ROOT_URLCONF=urls.__name__, MIDDLEWARE=[], ALLOWED_HOSTS=["*"])
    override.enable()
    handler = WSGIHandler()
    return handler, override


def _wsgi_pair(adapter: str, guard: CreditGuard) -> tuple[SyncRun, SyncRun, Callable[[], None]]:
    from creditguard.wsgi import CreditGuardMiddleware

    path = "/events/ev-1/unlock"
    done: Callable[[], None] = lambda: None  # noqa: E731
    if adapter == "wsgi":
        cost = {"POST /events/{event_id}/unlock": 1}
        bare = _wsgi_call(_raw_wsgi, "POST", path)
        guarded = _wsgi_call(CreditGuardMiddleware(_raw_wsgi, guard=guard, cost=cost), "POST", path)
    elif adapter == "flask":
        bare = _wsgi_call(_flask(None), "POST", path)
        guarded = _wsgi_call(_flask(guard), "POST", path)
    else:
        handler, override = _django(guard)
        bare = _wsgi_call(handler, "POST", "/bare/ev-1/unlock")
        guarded = _wsgi_call(handler, "POST", path)
        done = override.disable
    return bare, guarded, done


# -- timing ------------------------------------------------------------------------------


def _per_call_us(run: SyncRun, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        run()
    return (time.perf_counter_ns() - start) / n / 1000


async def _aper_call_us(run: AsyncRun, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        await run()
    return (time.perf_counter_ns() - start) / n / 1000


def _calls(settings: Any) -> int:
    # A framework request costs far more than a bare guarded call: a fifth of the calls.
    return max(10, int(settings.overhead_calls) // 5)


def _measure_async(adapter: str, n: int, guard: CreditGuard) -> tuple[float, float, float]:
    bare, guarded = _asgi_pair(adapter, guard)

    async def core() -> None:
        async with guard.spend(1):
            pass

    async def measure() -> tuple[float, float, float]:
        for run in (bare, guarded, core):  # warm up: imports, caches, the balance
            for _ in range(max(5, n // 10)):
                await run()
        b = await _aper_call_us(bare, n)
        g = await _aper_call_us(guarded, n)
        c = await _aper_call_us(core, n)
        return b, g, c

    return asyncio.run(measure())


def _measure_sync(adapter: str, n: int, guard: CreditGuard) -> tuple[float, float, float]:
    bare, guarded, done = _wsgi_pair(adapter, guard)

    def core() -> None:
        with guard.spend(1):
            pass

    try:
        for run in (bare, guarded, core):
            for _ in range(max(5, n // 10)):
                run()
        b = _per_call_us(bare, n)
        g = _per_call_us(guarded, n)
        c = _per_call_us(core, n)
    finally:
        done()
    return b, g, c


def run(settings: Any, rec: Any) -> None:
    """Record, per adapter and round, the µs per request the adapter adds over the core."""
    n = _calls(settings)
    for round_no in range(settings.rounds):
        order = ADAPTERS[round_no % len(ADAPTERS) :] + ADAPTERS[: round_no % len(ADAPTERS)]
        for adapter in order:
            guard = _guard()
            try:
                if adapter in ("asgi", "starlette", "fastapi"):
                    bare, guarded, core = _measure_async(adapter, n, guard)
                else:
                    bare, guarded, core = _measure_sync(adapter, n, guard)
            finally:
                guard.close()
            added = guarded - bare
            rec.add(
                SCENARIO,
                adapter,
                added - core,
                "us",
                added_us=added,
                core_us=core,
                bare_us=bare,
                calls=float(n),
            )


class _Rec:
    """A minimal recorder for the standalone run."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, float]]] = {}

    def add(self, scenario: str, variant: str, value: float, unit: str, **extra: float) -> None:
        self.rows.setdefault(variant, []).append({"value": value, **extra})


def main(argv: list[str]) -> int:
    mode = "smoke" if "--smoke" in argv else "quick" if "--quick" in argv else "full"
    rounds = {"full": 5, "quick": 3, "smoke": 2}[mode]
    calls = {"full": 5000, "quick": 1500, "smoke": 50}[mode]
    settings = types.SimpleNamespace(mode=mode, rounds=rounds, overhead_calls=calls)
    rec = _Rec()
    run(settings, rec)
    print(f"adapters ({mode}: {rounds} rounds, {_calls(settings)} requests per measurement)")
    print(
        f"  {'adapter':<10}{'adapter µs':>12}{'added µs':>11}{'core µs':>10}{'app µs':>10}"
        f"   target <= {TARGET_US:g} µs over the core"
    )
    for adapter in ADAPTERS:
        rows = rec.rows[adapter]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(row[key] for row in rows)

        verdict = "ok" if med("value") <= TARGET_US else "over"
        print(
            f"  {adapter:<10}{med('value'):>12.1f}{med('added_us'):>11.1f}{med('core_us'):>10.1f}"
            f"{med('bare_us'):>10.1f}   {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
