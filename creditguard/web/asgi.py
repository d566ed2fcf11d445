"""Guard paid routes of any ASGI app (Starlette, FastAPI, Quart, Litestar...): pure ASGI.

::

    from creditguard.web.asgi import CreditGuardMiddleware

    app = CreditGuardMiddleware(app, guard=guard, cost={"POST /events/{event_id}/unlock": 10})

Only ``http`` requests with a cost above 0 touch the credits service; lifespan, websockets
and free routes go straight to the app. See ``docs/howto/asgi-starlette-fastapi.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from creditguard.core.errors import CreditGuardError
from creditguard.guard.guard import CreditGuard, Spend
from creditguard.web.common import (
    BAD_PATH,
    ActionFailed,
    CostSpec,
    GuardSpec,
    Problem,
    acall_cost,
    aresolve_guard,
    asubject_of,
    charged,
    check_subject_spec,
    middleware_cost,
    problem_for,
    route_action,
    route_path,
    undecidable,
)

__all__ = ["SPEND_KEY", "ActionFailed", "CreditGuardMiddleware", "send_problem"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
OnError = Callable[[Scope, CreditGuardError], "ASGIApp | Awaitable[ASGIApp | None] | None"]

SPEND_KEY = "creditguard_spend"
"""The key of the request's :class:`~creditguard.Spend` in ``scope["state"]`` (Starlette:
``request.state.creditguard_spend``)."""


async def send_problem(problem: Problem, send: Send) -> None:
    """Send ``problem`` as a complete HTTP response."""
    body = problem.content()
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in problem.header_list()]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CreditGuardMiddleware:
    """ASGI middleware that admits each paid request against the guard, answers 402 / 503
    / 500 when it cannot, and ends the spend once the response's last body message is
    sent, with no balance read of its own: like a decorated call's, the spend settles at
    a later read (``balance_after`` is ``None``).

    ``cost`` prices a request: a mapping of route patterns (``"POST /events/{id}/unlock"``,
    matched against the path the app routes on: ``scope["path"]`` less
    ``scope["root_path"]``, so inside a ``Mount("/api", ...)`` the patterns leave out
    ``/api``; a path holding control characters is answered 400) to ints, a callable of
    the ASGI ``scope`` returning an int (sync or async), or ``None``
    (nothing is paid). ``guard`` is a :class:`~creditguard.CreditGuard`, or a callable of
    the ``scope`` (sync or async) returning the guard of the request's tenant.
    ``on_error(scope, error)`` may return an ASGI app (a Starlette ``Response``) that
    answers instead of the default problem JSON, or ``None`` for the default.
    ``charge_when(status)`` decides whether a finished response is charged (default:
    ``status < 400``); otherwise the spend ends as failed: the reservation is released
    and the cached balance distrusted.

    The endpoint finds its :class:`~creditguard.Spend` in ``scope["state"]["creditguard_spend"]``
    (``request.state.creditguard_spend`` in Starlette and FastAPI).

    ``subject`` (a callable of the ``scope``, sync or async, returning a str, or ``None``)
    names who a paid request spends for: the guard's ``allowance`` for it applies (402
    ``allowance_exceeded`` past it).
    """

    __slots__ = ("_charge_when", "_cost", "_guard", "_on_error", "_subject", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        guard: GuardSpec,
        cost: CostSpec = None,
        on_error: OnError | None = None,
        charge_when: Callable[[int], bool] | None = None,
        subject: Callable[[Scope], Any] | None = None,
    ) -> None:
        self.app = app
        self._guard = guard
        self._cost = middleware_cost(guard, cost, on_error, charge_when)
        check_subject_spec(subject)
        self._subject = subject
        self._on_error = on_error
        self._charge_when = charge_when or charged

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cost = self._cost
        route: str | None = None
        if cost.routes is not None:
            path = route_path(scope)
            if undecidable(path):
                await send_problem(BAD_PATH, send)
                return
            route = starlette_route(self.app, scope)
            if route == NOT_ALLOWED:  # the router answers 405: no endpoint runs
                await self.app(scope, receive, send)
                return
            if route is None:
                amount = cost.routes.cost(scope["method"], path)
            else:
                amount = cost.routes.route_cost(scope["method"], route, path)
        elif cost.func is not None:
            amount = await acall_cost(cost.func, scope)
        else:
            amount = None
        if not amount:
            await self.app(scope, receive, send)
            return
        try:
            guard = self._guard
            if not isinstance(guard, CreditGuard):
                guard = await aresolve_guard(guard, scope)
            who = await asubject_of(self._subject, scope)
            action = route_action(scope.get("method"), route)
            spend = Spend(guard, amount, defer=True, subject=who, action=action)
            await spend.__aenter__()
        except CreditGuardError as exc:
            await self._refuse(scope, receive, send, exc)
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state[SPEND_KEY] = spend
        response = _Response(spend, self._charge_when, send)
        try:
            await self.app(scope, receive, response.send)
        except BaseException:
            if not response.settled:
                response.settled = True
                await spend.__aexit__(*sys.exc_info())
            raise
        if not response.settled:
            response.settled = True
            await spend.__aexit__(ActionFailed, ActionFailed(0), None)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, exc: CreditGuardError
    ) -> None:
        if self._on_error is not None:
            answer = self._on_error(scope, exc)
            if not callable(answer) and answer is not None:
                answer = await answer
            if answer is not None:
                await answer(scope, receive, send)
                return
        problem = problem_for(exc)
        if problem is None:  # pragma: no cover - every CreditGuardError has an answer
            raise exc
        await send_problem(problem, send)


def _router_of(app: object) -> list[Any] | None:
    """The routes of the Starlette (or FastAPI) router ``app`` ends in, following the
    ``.app`` of the middlewares in front of it; ``None`` when there is none."""
    for _ in range(32):
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


NOT_ALLOWED = ""
"""What :func:`starlette_route` says of a request the router answers 405 itself."""


def starlette_route(app: object, scope: Scope) -> str | None:
    """The template (``/api/events/{event_id}/unlock``, mount prefixes included, relative
    to where ``app`` is mounted) of the route a Starlette router in ``app`` will run for
    ``scope``: its routes tried in order with ``route.matches(scope)``, as the router
    does, into mounts. :data:`NOT_ALLOWED` when the router answers 405 (only routes that
    do not take the request's method match its path: FastAPI's GET routes do not take
    HEAD): no endpoint runs. ``None`` when ``app`` has no Starlette router, or the
    request does not end at a ``Route`` (no match, a mounted app of another kind): the
    path's patterns price it then."""
    routes = _router_of(app)
    if routes is None:
        return None
    try:
        from starlette.routing import Match, Mount, Route
    except ImportError:  # pragma: no cover - routes without Starlette
        return None
    prefix = ""
    scope = dict(scope)
    while True:
        partial = False
        for candidate in routes:
            match, child = candidate.matches(scope)
            if match is Match.FULL:
                break
            partial = partial or (match is Match.PARTIAL and isinstance(candidate, Route))
        else:
            return NOT_ALLOWED if partial else None
        if isinstance(candidate, Route):
            return prefix + candidate.path
        if not isinstance(candidate, Mount) or not candidate.routes:
            return None
        scope.update(child)
        prefix += candidate.path
        routes = candidate.routes


class _Response:
    """Watches the response's messages: the spend is exited right after the final one is
    sent (charged or failed by its status)."""

    __slots__ = ("_charge_when", "_send", "settled", "spend", "status", "trailers")

    def __init__(self, spend: Spend, charge_when: Callable[[int], bool], send: Send) -> None:
        self.spend = spend
        self._charge_when = charge_when
        self._send = send
        self.status = 0
        self.trailers = False
        self.settled = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.trailers = bool(message.get("trailers", False))
            await self._send(message)
            return
        await self._send(message)
        if self.settled:
            return
        if kind == "http.response.body":
            final = not message.get("more_body", False) and not self.trailers
        elif kind == "http.response.trailers":
            final = not message.get("more_trailers", False)
        else:  # http.response.pathsend / zerocopysend
            final = kind == "http.response.pathsend" or (
                kind == "http.response.zerocopysend" and not message.get("more_body", False)
            )
        if final:
            self.settled = True
            status = self.status
            if self._charge_when(status):
                await self.spend.__aexit__(None, None, None)
            else:
                await self.spend.__aexit__(ActionFailed, ActionFailed(status), None)
