"""A FastAPI dependency that guards a path operation for a number of Lensmor credits.

::

    from typing import Annotated

    from fastapi import Depends, FastAPI
    from creditguard import Spend
    from creditguard.web.fastapi import RequireCredits

    @app.post("/events/{event_id}/unlock", dependencies=[Depends(RequireCredits(10))])
    async def unlock(event_id: str) -> dict[str, str]: ...

    @app.post("/search")
    async def search(spend: Annotated[Spend, Depends(RequireCredits(5))]) -> dict[str, int]: ...

See ``docs/howto/asgi-starlette-fastapi.md``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from creditguard.core.errors import CreditGuardError
from creditguard.guard.guard import CreditGuard, Spend
from creditguard.web.common import (
    PROBLEM_CONTENT_TYPE,
    ActionFailed,
    GuardSpec,
    Problem,
    aresolve_guard,
    asubject_of,
    charged,
    check_cost,
    check_guard_spec,
    check_hook,
    check_subject_spec,
    default_guard,
    is_async_callable,
    problem_for,
    route_action,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["ActionFailed", "CreditsRefused", "RequireCredits"]

OnError = Callable[["Request", CreditGuardError], BaseException]


def _http_exception(exc: CreditGuardError, request: Request) -> BaseException:
    """The exception answering ``exc``: a :class:`CreditsRefused` (an ``HTTPException``),
    whose handler (registered in the app's handlers the first time) answers the problem
    JSON as it is, top level, as every adapter does."""
    problem = problem_for(exc)
    if problem is None:  # pragma: no cover - every CreditGuardError has an answer
        return exc
    handlers = request.scope.get("starlette.exception_handlers")
    if isinstance(handlers, tuple) and handlers and isinstance(handlers[0], dict):
        handlers[0].setdefault(CreditsRefused, _answer)
    refused: BaseException = CreditsRefused(problem)
    return refused


def _refused_class() -> type[Exception]:
    from fastapi import HTTPException

    class CreditsRefused(HTTPException):
        """The guard refused the request: ``problem`` is the answer (status, headers,
        body); ``detail`` is its body."""

        def __init__(self, problem: Problem) -> None:
            super().__init__(problem.status, detail=problem.body, headers=dict(problem.headers))
            self.problem = problem

    return CreditsRefused


CreditsRefused: Any = _refused_class()


def _answer(request: Request, exc: Exception) -> Response:
    from starlette.responses import Response

    problem: Problem = exc.problem  # type: ignore[attr-defined]
    return Response(
        problem.content(),
        status_code=problem.status,
        headers=dict(problem.headers),
        media_type=PROBLEM_CONTENT_TYPE,
    )


class RequireCredits:
    """A dependency (``Depends(RequireCredits(cost))``) admitting the request for ``cost``
    credits before the endpoint runs; its value is the request's :class:`~creditguard.Spend`.

    ``cost`` is an int >= 0 or a callable of the Starlette ``Request`` (sync or async)
    returning one; 0 reads nothing. ``guard`` is a :class:`~creditguard.CreditGuard`, a
    callable of the ``Request`` (sync or async) returning the tenant's guard, or ``None``:
    the process-wide default guard built from ``LENSMOR_API_KEY`` and ``LENSMOR_BASE_URL``
    (the one ``creditguard.requires_credits`` uses).

    Refusals are raised as :data:`CreditsRefused` (an ``HTTPException``), answered with
    the same top-level ``application/problem+json`` body as every adapter: 402
    ``insufficient_credits``, 503 ``credits_busy`` or ``balance_unavailable`` (with
    ``Retry-After``) or 500 ``credits_misconfigured``. ``on_error(request, error)``
    returns the exception to raise instead (your own ``HTTPException``, or ``error``
    itself for an app exception handler).

    The spend ends after the response has been sent (FastAPI >= 0.118 runs the exit of
    dependencies with ``yield`` then), with no balance read of its own: like a decorated
    call's, it settles at a later read (``balance_after`` is ``None``). When the endpoint,
    or anything after it, raises, the spend ends as failed (reservation released, cached
    balance distrusted), unless the exception is an ``HTTPException`` whose status
    ``charge_when(status)`` charges (default: ``status < 400``). A response the endpoint
    *returns* is charged whatever its status: raise ``HTTPException`` for failures, or use
    :class:`creditguard.asgi.CreditGuardMiddleware`, which sees every status.

    ``subject`` (a callable of the ``Request``, sync or async, returning a str, or
    ``None``) names who the request spends for: the guard's ``allowance`` for it applies,
    and a request past it is answered 402 ``allowance_exceeded``.
    """

    __slots__ = (
        "__signature__",
        "_charge_when",
        "_cost",
        "_cost_is_async",
        "_guard",
        "_on_error",
        "_static",
        "_subject",
    )

    def __init__(
        self,
        cost: int | Callable[[Request], Any],
        *,
        guard: GuardSpec | None = None,
        on_error: OnError | None = None,
        charge_when: Callable[[int], bool] | None = None,
        subject: Callable[[Request], Any] | None = None,
    ) -> None:
        from starlette.requests import Request as RuntimeRequest

        check_subject_spec(subject)
        self._subject = subject
        if callable(cost):
            self._static: int | None = None
            self._cost: Callable[[Request], Any] | None = cost
            self._cost_is_async = is_async_callable(cost)
        else:
            self._static = check_cost(cost)
            self._cost = None
            self._cost_is_async = False
        check_guard_spec(guard, optional=True)
        check_hook("on_error", on_error)
        check_hook("charge_when", charge_when)
        self._guard = guard
        self._on_error = on_error
        self._charge_when = charge_when or charged
        # FastAPI reads the dependency's parameters from this: it injects the Request.
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=RuntimeRequest
                )
            ]
        )

    def __repr__(self) -> str:
        cost = self._static if self._static is not None else self._cost
        return f"RequireCredits({cost!r})"

    async def _amount(self, request: Request) -> int:
        assert self._cost is not None
        value = self._cost(request)
        if type(value) is not int and (self._cost_is_async or inspect.isawaitable(value)):
            value = await value
        return check_cost(value)

    async def __call__(self, request: Request) -> AsyncIterator[Spend]:
        amount = self._static
        if amount is None:
            amount = await self._amount(request)
        try:
            guard = self._guard
            if guard is None:
                guard = default_guard()
            elif not isinstance(guard, CreditGuard):
                guard = await aresolve_guard(guard, request)
            who = await asubject_of(self._subject, request) if amount else None
            route = getattr(request.scope.get("route"), "path", None)
            action = route_action(request.scope.get("method"), route)
            spend = Spend(guard, amount, defer=True, subject=who, action=action)
            if amount:
                await spend.__aenter__()
        except CreditGuardError as exc:
            if self._on_error is not None:
                raise self._on_error(request, exc) from None
            raise _http_exception(exc, request) from None
        if not amount:
            yield spend  # free: nothing reserved, nothing to settle
            return
        try:
            yield spend
        except BaseException as error:
            status = getattr(error, "status_code", None)
            if _is_http_exception(error) and type(status) is int and self._charge_when(status):
                await spend.__aexit__(None, None, None)
            else:
                await spend.__aexit__(*sys.exc_info())
            raise
        await spend.__aexit__(None, None, None)


def _is_http_exception(error: BaseException) -> bool:
    global _HTTPException
    if _HTTPException is None:
        from starlette.exceptions import HTTPException

        _HTTPException = HTTPException
    return isinstance(error, _HTTPException)


_HTTPException: type[BaseException] | None = None
