#!/usr/bin/env python3
"""``adapters``: the per-request time each framework adapter adds, beside the core's own.

For each adapter, in process and on a warm cache (zero-latency in-memory upstream), four
builds of the same app are called side by side:

* ``bare``: the app unguarded;
* ``hook``: the app with a no-op hook of the adapter's shape: what the framework charges
  for *any* extension of that kind, whatever it does (a pass-through ASGI / WSGI
  middleware; a FastAPI ``yield`` dependency taking ``Request``; a Flask view decorator
  calling ``make_response`` and ``call_on_close``, with an ``after_request`` and a
  ``teardown_request`` handler; a Django middleware; a Django view decorator);
* ``spend``: that no-op hook running a bare ``guard.spend(1)`` block around the request:
  the least any adapter of that shape does;
* ``guarded``: the app guarded by the adapter, for 1 credit a request;

and a bare ``guard.spend(1)`` block alone (``core``: the core guard's own logic,
admission and the refresh read after the action) is timed beside them. Per adapter and
round, in µs per request:

* value (the JSON ``median``): ``guarded - bare``, the µs the guarded app takes per request
  over the unguarded one;
* ``own_us``, the adapter's **own work**: ``guarded - spend``; the target (at most
  :data:`TARGET_US` over the core guard's own logic) is judged on it;
* ``over_core_us``: ``guarded - hook - core``: the own work plus ``context_us``;
* ``context_us``: ``spend - hook - core``, what the core's logic costs more inside a
  framework request than in a tight loop (caches, the framework's context); any adapter
  pays it, a hand-written one too;
* ``hook_us`` (``hook - bare``), ``core_us``, ``bare_us``.

The builds are timed **interleaved**: they take turns in blocks of :data:`BLOCK`
requests (the order rotating from block to block), every request is timed, and each
one's time per request is its **median** request time in the round: drift on a shared
machine moves them together, and a request that was preempted (or ran a full garbage
collection) does not move the figure.

ASGI apps (``asgi``, ``starlette``, ``fastapi``) are called directly with a prepared
scope, ``receive`` and ``send`` on asyncio; WSGI apps (``wsgi``, ``flask``, ``django``,
``django_view``) with a prepared environ, iterating and closing the response as a server
does. ``django`` is the middleware, ``django_view`` the view decorator.

Standalone: ``python benchmarks/scenario_adapters.py [--quick|--smoke]`` prints a table.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import io
import statistics
import sys
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor

SCENARIO = "adapters"
TARGET_US = 10.0  # per request: the adapter's own work, over the core guard's logic
ADAPTERS = ("asgi", "starlette", "fastapi", "wsgi", "flask", "django", "django_view")
BLOCK = 10  # requests per turn of a build
COST = {"POST /events/{event_id}/unlock": 1}
PATH = "/events/ev-1/unlock"

SyncRun = Callable[[], None]
AsyncRun = Callable[[], Awaitable[None]]

# The guarded builds and where their adapter modules live: ``{prefix}asgi`` etc. Another
# implementation can be timed in the same run beside the shipped one by adding an entry
# (``{"guarded": "creditguard.", "before": "some.package."}``).
GUARDED = {"guarded": "creditguard."}
# The unguarded builds: the app alone, with a no-op hook of the adapter's shape, and with
# that hook running a bare ``guard.spend(1)`` block.
HOOKS = ("bare", "hook", "spend")


def _adapter(prefix: str, name: str) -> Any:
    return importlib.import_module(prefix + name)


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


class _PassThroughASGI:
    """The no-op ASGI middleware: calls the app."""

    __slots__ = ("app",)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class _SpendASGI(_PassThroughASGI):
    """The pass-through middleware running the app in a bare ``guard.spend(1)`` block."""

    __slots__ = ("guard",)

    def __init__(self, app: Any, guard: CreditGuard) -> None:
        super().__init__(app)
        self.guard = guard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with self.guard.spend(1):
            await self.app(scope, receive, send)


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


class _NoopDependency:
    """A FastAPI dependency of ``RequireCredits``'s shape doing nothing: a callable object
    whose ``__call__`` is an async generator taking the ``Request``."""

    def __init__(self) -> None:
        from starlette.requests import Request

        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request
                )
            ]
        )

    async def __call__(self, request: Any) -> AsyncIterator[None]:
        yield None


class _SpendDependency(_NoopDependency):
    """The no-op dependency yielding inside a bare ``guard.spend(1)`` block."""

    def __init__(self, guard: CreditGuard) -> None:
        super().__init__()
        self.guard = guard

    async def __call__(self, request: Any) -> AsyncIterator[None]:
        async with self.guard.spend(1):
            yield None


def _fastapi(build: str, guard: CreditGuard) -> Any:
    from fastapi import Depends, FastAPI

    app = FastAPI()
    if build == "bare":
        deps = []
    elif build == "hook":
        deps = [Depends(_NoopDependency())]
    elif build == "spend":
        deps = [Depends(_SpendDependency(guard))]
    else:
        require_credits = _adapter(GUARDED[build], "fastapi").RequireCredits
        deps = [Depends(require_credits(1, guard=guard))]

    @app.post("/events/{event_id}/unlock", dependencies=deps)
    async def unlock(event_id: str) -> str:
        return event_id

    return app


def _asgi_builds(adapter: str, guard: CreditGuard) -> dict[str, AsyncRun]:
    apps: dict[str, Any]
    if adapter == "fastapi":
        apps = {build: _fastapi(build, guard) for build in (*HOOKS, *GUARDED)}
    else:
        make = _raw_asgi if adapter == "asgi" else _starlette
        apps = {
            "bare": make(),
            "hook": _PassThroughASGI(make()),
            "spend": _SpendASGI(make(), guard),
        }
        for build, prefix in GUARDED.items():
            middleware = _adapter(prefix, "asgi").CreditGuardMiddleware
            apps[build] = middleware(make(), guard=guard, cost=COST)
    return {build: _asgi_call(app, "POST", PATH) for build, app in apps.items()}


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


class _PassThroughWSGI:
    """The no-op WSGI middleware: calls the app."""

    __slots__ = ("app",)

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


class _SpendWSGI(_PassThroughWSGI):
    """The pass-through middleware calling the app in a bare ``guard.spend(1)`` block."""

    __slots__ = ("guard",)

    def __init__(self, app: Any, guard: CreditGuard) -> None:
        super().__init__(app)
        self.guard = guard

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.guard.spend(1):
            return self.app(environ, start_response)


def _noop() -> None:
    pass


def _flask(build: str, guard: CreditGuard) -> Any:
    from flask import Flask, make_response

    app = Flask(f"bench_{build}")

    def unlock(event_id: str) -> str:
        return event_id

    if build in HOOKS[1:]:
        # The extension's shape: an after_request and a teardown_request handler, and a
        # decorator making the view's response and settling in call_on_close.
        app.after_request(lambda response: response)
        app.teardown_request(lambda error: None)
        view = unlock

        @functools.wraps(view)
        def hooked(*args: Any, **kwargs: Any) -> Any:
            response = make_response(view(*args, **kwargs))
            response.call_on_close(_noop)
            return response

        @functools.wraps(view)
        def spending(*args: Any, **kwargs: Any) -> Any:
            with guard.spend(1):
                response = make_response(view(*args, **kwargs))
            response.call_on_close(_noop)
            return response

        unlock = hooked if build == "hook" else spending
    elif build != "bare":
        module = _adapter(GUARDED[build], "flask")
        module.CreditGuardExtension(app, guard=guard)
        unlock = module.requires_credits(1)(unlock)
    app.add_url_rule("/events/<event_id>/unlock", view_func=unlock, methods=["POST"])
    return app


def _django_setup() -> None:
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


class NoopMiddleware:
    """The no-op Django middleware (sync and async capable, like the adapter's)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)


class SpendMiddleware(NoopMiddleware):
    """The no-op middleware calling the view in a bare ``guard.spend(1)`` block."""

    guard: CreditGuard | None = None

    def __call__(self, request: Any) -> Any:
        assert self.guard is not None
        with self.guard.spend(1):
            return self.get_response(request)


def _noop_decorator(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return view(*args, **kwargs)

    return wrapped


def _spend_decorator(guard: CreditGuard) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with guard.spend(1):
                return view(*args, **kwargs)

        return wrapped

    return decorate


def _django_builds(
    adapter: str, guard: CreditGuard
) -> tuple[dict[str, SyncRun], Callable[[], None]]:
    _django_setup()
    builds = (*HOOKS, *GUARDED)
    from django.core.handlers.wsgi import WSGIHandler
    from django.http import HttpResponse
    from django.test import override_settings
    from django.urls import path

    def unlock(request: Any, event_id: str) -> Any:
        return HttpResponse(event_id)

    urls = types.ModuleType("bench_adapters_urls")
    spend_middleware = type("SpendMiddleware", (SpendMiddleware,), {"guard": guard})
    urls.NoopMiddleware = NoopMiddleware  # type: ignore[attr-defined]
    urls.SpendMiddleware = spend_middleware  # type: ignore[attr-defined]
    if adapter == "django":
        # One route; the builds differ by their MIDDLEWARE only.
        urls.urlpatterns = [path("events/<str:event_id>/unlock", unlock)]  # type: ignore[attr-defined]
        paths = dict.fromkeys(builds, PATH)
        middleware = {
            "bare": [],
            "hook": ["bench_adapters_urls.NoopMiddleware"],
            "spend": ["bench_adapters_urls.SpendMiddleware"],
        }
        for build, prefix in GUARDED.items():
            middleware[build] = [f"{prefix}django.CreditGuardMiddleware"]
    else:
        # One route per build; the guarded ones last, so they alone pay for the failed
        # matches of the others (their figures are upper bounds by that much).
        patterns = [
            path("bare/<str:event_id>/unlock", unlock),
            path("hook/<str:event_id>/unlock", _noop_decorator(unlock)),
            path("spend/<str:event_id>/unlock", _spend_decorator(guard)(unlock)),
        ]
        for build, prefix in GUARDED.items():
            decorate = _adapter(prefix, "django").requires_credits(1, guard=guard)
            patterns.append(path(f"{build}/<str:event_id>/unlock", decorate(unlock)))
        urls.urlpatterns = patterns  # type: ignore[attr-defined]
        paths = {build: f"/{build}/ev-1/unlock" for build in builds}
        middleware = {build: [] for build in builds}
    sys.modules[urls.__name__] = urls
    override = override_settings(
        ROOT_URLCONF=urls.__name__,
        MIDDLEWARE=[],
        ALLOWED_HOSTS=["*"],
        CREDITGUARD={"GUARD": guard, "COSTS": COST},
    )
    override.enable()
    runs: dict[str, SyncRun] = {}
    for build in builds:
        with override_settings(MIDDLEWARE=middleware[build]):
            handler = WSGIHandler()  # loads MIDDLEWARE now
        runs[build] = _wsgi_call(handler, "POST", paths[build])
    return runs, override.disable


def _wsgi_builds(adapter: str, guard: CreditGuard) -> tuple[dict[str, SyncRun], Callable[[], None]]:
    if adapter in ("django", "django_view"):
        return _django_builds(adapter, guard)
    apps: dict[str, Any]
    if adapter == "wsgi":
        apps = {
            "bare": _raw_wsgi,
            "hook": _PassThroughWSGI(_raw_wsgi),
            "spend": _SpendWSGI(_raw_wsgi, guard),
        }
        for build, prefix in GUARDED.items():
            middleware = _adapter(prefix, "wsgi").CreditGuardMiddleware
            apps[build] = middleware(_raw_wsgi, guard=guard, cost=COST)
    else:
        apps = {build: _flask(build, guard) for build in (*HOOKS, *GUARDED)}
    return {build: _wsgi_call(app, "POST", PATH) for build, app in apps.items()}, _noop


# -- timing ------------------------------------------------------------------------------


def _blocks(n: int) -> int:
    return max(3, n // BLOCK)


def _measure_sync(runs: dict[str, SyncRun], n: int) -> dict[str, float]:
    names = list(runs)
    times: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for run in runs.values():  # warm up: imports, caches, the balance
        for _ in range(max(5, n // 10)):
            run()
    for block in range(_blocks(n)):
        k = block % len(names)
        for name in names[k:] + names[:k]:
            run, out = runs[name], times[name]
            for _ in range(BLOCK):
                start = clock()
                run()
                out.append(clock() - start)
    return {name: statistics.median(xs) / 1000 for name, xs in times.items()}


async def _ameasure(runs: dict[str, AsyncRun], n: int) -> dict[str, float]:
    names = list(runs)
    times: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for run in runs.values():
        for _ in range(max(5, n // 10)):
            await run()
    for block in range(_blocks(n)):
        k = block % len(names)
        for name in names[k:] + names[:k]:
            run, out = runs[name], times[name]
            for _ in range(BLOCK):
                start = clock()
                await run()
                out.append(clock() - start)
    return {name: statistics.median(xs) / 1000 for name, xs in times.items()}


def _calls(settings: Any) -> int:
    # A framework request costs far more than a bare guarded call: fewer of them.
    return max(BLOCK, int(settings.overhead_calls) // 2)


def measure(adapter: str, n: int, guard: CreditGuard) -> dict[str, float]:
    """µs per request of each build (:data:`HOOKS`, then each of :data:`GUARDED`) and of
    ``core``."""
    if adapter in ("asgi", "starlette", "fastapi"):
        aruns: dict[str, AsyncRun] = dict(_asgi_builds(adapter, guard))

        async def core() -> None:
            async with guard.spend(1):
                pass

        aruns["core"] = core
        return asyncio.run(_ameasure(aruns, n))
    runs, done = _wsgi_builds(adapter, guard)

    def sync_core() -> None:
        with guard.spend(1):
            pass

    runs["core"] = sync_core
    try:
        return _measure_sync(runs, n)
    finally:
        done()


def run(settings: Any, rec: Any) -> None:
    """Record, per adapter and round, the µs per request of the adapter's own work."""
    n = _calls(settings)
    for round_no in range(settings.rounds):
        order = ADAPTERS[round_no % len(ADAPTERS) :] + ADAPTERS[: round_no % len(ADAPTERS)]
        for adapter in order:
            guard = _guard()
            try:
                t = measure(adapter, n, guard)
            finally:
                guard.close()
            for build in GUARDED:
                rec.add(
                    SCENARIO,
                    adapter if build == "guarded" else f"{adapter}@{build}",
                    t[build] - t["bare"],  # median: µs added per request
                    "us",
                    own_us=t[build] - t["spend"],
                    over_core_us=t[build] - t["hook"] - t["core"],
                    context_us=t["spend"] - t["hook"] - t["core"],
                    hook_us=t["hook"] - t["bare"],
                    core_us=t["core"],
                    bare_us=t["bare"],
                    calls=float(n),
                )


def targets(rec: Any, settings: Any) -> dict[str, dict[str, Any]]:
    """Each adapter's own work per request, against :data:`TARGET_US`."""
    out: dict[str, dict[str, Any]] = {}
    for adapter in ADAPTERS:
        values = rec.extras(SCENARIO, adapter, "own_us")
        if not values:
            continue
        value = statistics.median(values)
        out[f"adapters.{adapter}"] = {
            "what": f"{adapter}: the adapter's own work per request, µs",
            "value": value,
            "target": f"<= {TARGET_US:g}",
            "met": value <= TARGET_US,
        }
    return out


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
    n = _calls(settings)
    print(
        f"adapters ({mode}: {rounds} rounds, {n} requests per build in turns of {BLOCK},"
        " median request time per round; medians over rounds)"
    )
    print(
        f"  {'adapter':<20}{'own':>7}{'added':>8}{'over core':>11}{'context':>9}{'hook':>7}"
        f"{'core':>7}{'app':>7}   µs per request; own: target <= {TARGET_US:g}"
    )
    for variant in sorted(rec.rows, key=lambda v: (ADAPTERS.index(v.split("@")[0]), v)):
        rows = rec.rows[variant]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(row[key] for row in rows)

        verdict = "ok" if med("own_us") <= TARGET_US else "over"
        print(
            f"  {variant:<20}{med('own_us'):>7.1f}{med('value'):>8.1f}"
            f"{med('over_core_us'):>11.1f}{med('context_us'):>9.1f}{med('hook_us'):>7.1f}"
            f"{med('core_us'):>7.1f}{med('bare_us'):>7.1f}   {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
