"""Guard Flask views for a number of Lensmor credits.

::

    from creditguard.flask import CreditGuardExtension, requires_credits

    credits = CreditGuardExtension(app)  # or credits.init_app(app) in an app factory

    @app.post("/events/<event_id>/unlock")
    @requires_credits(10)
    def unlock(event_id: str): ...

See ``docs/howto/flask.md``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec

from ._errors import CreditGuardError
from ._guard import CreditGuard, Spend
from ._web import (
    ActionFailed,
    GuardSpec,
    charged,
    check_cost,
    check_guard_spec,
    check_hook,
    default_guard,
    is_async_callable,
    problem_for,
    resolve_guard,
)

if TYPE_CHECKING:
    from flask import Flask, Request, Response
    from flask.typing import ResponseReturnValue

__all__ = ["EXTENSION_KEY", "ActionFailed", "CreditGuardExtension", "requires_credits"]

P = ParamSpec("P")

EXTENSION_KEY = "creditguard"
"""Where :meth:`CreditGuardExtension.init_app` registers itself in ``app.extensions``."""

OnError = Callable[["Request", CreditGuardError], "ResponseReturnValue | None"]
_PENDING = "creditguard_pending"


class CreditGuardExtension:
    """The Flask extension: one guard per app, built from the app's config.

    ``init_app(app)`` uses ``guard`` when given (a :class:`~creditguard.CreditGuard` or a
    callable of the ``flask.Request`` returning the tenant's guard); otherwise it builds
    ``CreditGuard(app.config["LENSMOR_API_KEY"], base_url=app.config["LENSMOR_BASE_URL"],
    **app.config["CREDITGUARD_OPTIONS"])`` (each key optional; the environment fills in
    the key and URL). ``on_error`` and ``charge_when`` are the defaults of every
    :func:`requires_credits` view of the app. The extension also makes sure a spend is
    settled when an ``after_request`` handler replaces the response, or when something
    fails between the view and the response.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        guard: GuardSpec | None = None,
        on_error: OnError | None = None,
        charge_when: Callable[[int], bool] | None = None,
    ) -> None:
        check_guard_spec(guard, optional=True)
        check_hook("on_error", on_error)
        check_hook("charge_when", charge_when)
        self._guard_spec = guard
        self._built: CreditGuard | None = guard if isinstance(guard, CreditGuard) else None
        self.on_error = on_error
        self.charge_when = charge_when
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        guard = self._guard_spec
        if guard is None:
            guard = CreditGuard(
                app.config.get("LENSMOR_API_KEY"),
                base_url=app.config.get("LENSMOR_BASE_URL"),
                **app.config.get("CREDITGUARD_OPTIONS", {}),
            )
        self._built = guard if isinstance(guard, CreditGuard) else None
        app.extensions[EXTENSION_KEY] = _AppState(guard, self.on_error, self.charge_when)
        app.after_request(_adopt_final_response)
        app.teardown_request(_settle_leftover)

    @property
    def guard(self) -> CreditGuard:
        """The extension's guard (given, or built by the last ``init_app``)."""
        if self._built is None:
            raise CreditGuardError(
                "no CreditGuard here: init_app(app) was not called, or guard is a callable"
            )
        return self._built

    @staticmethod
    def guard_of(app: Flask) -> GuardSpec:
        """The guard (or guard callable) the extension holds for ``app``."""
        state = app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, _AppState):
            raise CreditGuardError("CreditGuardExtension.init_app(app) was not called")
        return state.guard


class _AppState:
    __slots__ = ("charge_when", "guard", "on_error")

    def __init__(
        self,
        guard: GuardSpec,
        on_error: OnError | None,
        charge_when: Callable[[int], bool] | None,
    ) -> None:
        self.guard = guard
        self.on_error = on_error
        self.charge_when = charge_when


class _Pending:
    """A spend admitted for this request, waiting for its response to be closed."""

    __slots__ = ("charge_when", "done", "response", "spend")

    def __init__(self, spend: Spend, charge_when: Callable[[int], bool]) -> None:
        self.spend = spend
        self.charge_when = charge_when
        self.response: Response | None = None
        self.done = False

    def exit(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        if error is None:
            self.spend.__exit__(None, None, None)
        else:
            self.spend.__exit__(type(error), error, error.__traceback__)

    def attach(self, response: Response) -> None:
        """Settle when ``response`` is closed (after the server sent its last byte)."""
        if self.response is response:
            return
        self.response = response
        response.call_on_close(lambda: self._closed(response))

    def _closed(self, response: Response) -> None:
        if self.response is response:
            self.exit(None)


def _adopt_final_response(response: Response) -> Response:
    """``after_request``: an earlier handler may have replaced the response the view's
    spend was attached to; settle on the one that will be sent."""
    from flask import g

    pending: _Pending | None = g.get(_PENDING)
    if pending is not None and pending.response is not None and not pending.done:
        if pending.charge_when(response.status_code):
            pending.attach(response)
        else:
            pending.exit(ActionFailed(response.status_code))
    return response


def _settle_leftover(error: BaseException | None) -> None:
    """``teardown_request``: a spend never attached to a response, or whose response was
    lost to an unhandled error, ends as failed."""
    from flask import g

    pending: _Pending | None = g.get(_PENDING)
    if pending is None or pending.done:
        return
    if error is not None:  # the response the spend waits on will not be sent
        pending.exit(error)
    elif pending.response is None:
        pending.exit(ActionFailed(0))


def requires_credits(
    cost: int | Callable[[Request], int],
    *,
    guard: GuardSpec | None = None,
    on_error: OnError | None = None,
    charge_when: Callable[[int], bool] | None = None,
) -> Callable[[Callable[P, Any]], Callable[P, Response]]:
    """Decorate a Flask view (sync or ``async def``) so each request is admitted for
    ``cost`` credits before it runs.

    ``cost``: an int >= 0 or a callable of ``flask.request`` returning one (0 reads
    nothing). ``guard``: a :class:`~creditguard.CreditGuard` or a callable of the request
    returning one; by default the app's :class:`CreditGuardExtension` guard, else the
    process-wide default guard (``LENSMOR_API_KEY``, ``LENSMOR_BASE_URL``).
    ``on_error(request, error)`` may return a view response (``(body, status)``, a
    ``Response``...) that answers instead of the problem JSON, or ``None``.
    ``charge_when(status)``: whether a response is charged (default ``status < 400``).

    The view finds its :class:`~creditguard.Spend` in ``flask.g.creditguard_spend``. The
    spend is settled when the WSGI server closes the response (``call_on_close``), after
    the last byte was sent; a view that raises, or answers a status ``charge_when`` does
    not charge, ends it as failed.
    """
    if callable(cost):
        cost_of: Callable[[Request], int] = cost

        def amount_of(request: Request) -> int:
            return check_cost(cost_of(request))

    else:
        static = check_cost(cost)

        def amount_of(request: Request) -> int:
            return static

    check_guard_spec(guard, optional=True)
    check_hook("on_error", on_error)
    check_hook("charge_when", charge_when)

    def decorate(view: Callable[P, Any]) -> Callable[P, Response]:
        if not callable(view):
            raise TypeError(f"requires_credits decorates a view, got {type(view).__name__}")
        is_async = is_async_callable(view)

        @functools.wraps(view)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Response:
            from flask import current_app, g, make_response, request

            state = current_app.extensions.get(EXTENSION_KEY)
            app_state = state if isinstance(state, _AppState) else None
            amount = amount_of(request)
            spec = guard if guard is not None else app_state.guard if app_state else None
            try:
                the_guard = default_guard() if spec is None else resolve_guard(spec, request)
                spend = the_guard.spend(amount)
                if amount:
                    spend.__enter__()
            except CreditGuardError as exc:
                hook = on_error or (app_state.on_error if app_state else None)
                answer = hook(request, exc) if hook is not None else None
                if answer is not None:
                    return make_response(answer)
                problem = problem_for(exc)
                if problem is None:  # pragma: no cover - every CreditGuardError has one
                    raise
                return current_app.response_class(
                    problem.content(),
                    status=problem.status,
                    headers=problem.headers,
                    content_type=problem.header_list()[0][1],
                )
            g.creditguard_spend = spend
            call = current_app.ensure_sync(view) if is_async else view
            if not amount:
                return make_response(call(*args, **kwargs))
            when = charge_when or (app_state.charge_when if app_state else None) or charged
            pending = _Pending(spend, when)
            g.setdefault(_PENDING, pending)
            try:
                response = make_response(call(*args, **kwargs))
            except BaseException:
                pending.exit(sys.exc_info()[1])
                raise
            if when(response.status_code):
                pending.attach(response)
            else:
                pending.exit(ActionFailed(response.status_code))
            return response

        return guarded

    return decorate
