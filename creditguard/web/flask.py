"""Guard Flask views for a number of Lensmor credits.

::

    from creditguard.web.flask import CreditGuardExtension, requires_credits

    credits = CreditGuardExtension(app)  # or credits.init_app(app) in an app factory

    @app.post("/events/<event_id>/unlock")
    @requires_credits(10)
    def unlock(event_id: str): ...

See ``docs/howto/flask.md``.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, cast

from creditguard.core.errors import CreditGuardError
from creditguard.guard.guard import CreditGuard, Spend
from creditguard.web.common import (
    ActionFailed,
    GuardSpec,
    charged,
    check_cost,
    check_guard_spec,
    check_hook,
    check_subject_spec,
    default_guard,
    is_async_callable,
    problem_for,
    resolve_guard,
    route_action,
    subject_of,
)

if TYPE_CHECKING:
    from flask import Flask, Request, Response
    from flask.typing import ResponseReturnValue

__all__ = [
    "EXTENSION_KEY",
    "ActionFailed",
    "CreditGuardExtension",
    "current_spend",
    "requires_credits",
]

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
    the key and URL). ``on_error``, ``charge_when`` and ``subject`` are the defaults of
    every :func:`requires_credits` view of the app. The extension also makes sure a spend is
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
        subject: Callable[[Request], str | None] | None = None,
    ) -> None:
        check_guard_spec(guard, optional=True)
        check_hook("on_error", on_error)
        check_hook("charge_when", charge_when)
        check_subject_spec(subject)
        self.subject = subject
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
        app.extensions[EXTENSION_KEY] = _AppState(
            guard, self.on_error, self.charge_when, self.subject
        )
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
    __slots__ = ("charge_when", "guard", "on_error", "subject")

    def __init__(
        self,
        guard: GuardSpec,
        on_error: OnError | None,
        charge_when: Callable[[int], bool] | None,
        subject: Callable[[Request], str | None] | None = None,
    ) -> None:
        self.guard = guard
        self.on_error = on_error
        self.charge_when = charge_when
        self.subject = subject


class _Pending:
    """A spend admitted for this request, waiting for its response to be closed."""

    __slots__ = ("attached", "charge_when", "done", "response", "spend")

    def __init__(self, spend: Spend, charge_when: Callable[[int], bool]) -> None:
        self.spend = spend
        self.charge_when = charge_when
        # Weakly: the response must be collectable when dropped unclosed (see attach).
        self.response: weakref.ref[Response] | None = None
        self.attached = 0  # how many responses it was attached to
        self.done = False

    def exit(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        # The response's close callback refers to this object: no cycle through it.
        self.response = None
        if error is None:
            self.spend.__exit__(None, None, None)
        else:
            self.spend.__exit__(type(error), error, error.__traceback__)

    def attach(self, response: Response) -> None:
        """Settle when ``response`` is closed (after the server sent its last byte)."""
        if self.response is not None and self.response() is response:
            return
        self.response = weakref.ref(response)
        self.attached += 1
        # Not a closure over ``response``: that would be a reference cycle.
        response.call_on_close(functools.partial(self._closed, self.attached))
        watched: object = response
        if response.direct_passthrough or response.is_streamed:
            # A streamed body may fail part-way (the spend ends as failed with its
            # error); a passed-through one (``send_file``) is handed to the server as
            # is, and the server closes it, not the response.
            body = _Body(response.response, self, self.attached)
            response.response = body
            if response.direct_passthrough:
                watched = body
        # A WSGI layer outside Flask may drop the response unclosed (PEP 3333 asks it to
        # close it): when the response (a passed-through body) is collected unclosed, the
        # spend ends as failed (released, cached balance distrusted) rather than stay
        # reserved.
        weakref.finalize(watched, self._dropped, self.attached)

    def failed(self, attachment: int, error: BaseException) -> None:
        """The body of a response this spend was attached to raised while sent."""
        if attachment == self.attached:
            self.exit(error)

    def _dropped(self, attachment: int) -> None:
        if attachment == self.attached:
            self.exit(ActionFailed(0))

    def _closed(self, attachment: int) -> None:
        """A response this spend was attached to closed: settle if it is the last one."""
        if attachment == self.attached:
            self.exit(None)


class _Body:
    """A response's streamed or passed-through body, iterated as is: an error while the
    server iterates it ends the spend as failed, and closing it settles the spend."""

    __slots__ = ("__weakref__", "_attachment", "_iterable", "_pending")

    def __init__(self, iterable: Iterable[Any], pending: _Pending, attachment: int) -> None:
        self._iterable = iterable
        self._pending = pending
        self._attachment = attachment

    def __iter__(self) -> Iterator[Any]:
        try:
            # Not ``yield from``: closing this generator must not close the body
            # (``close()`` does that, once).
            for chunk in self._iterable:  # noqa: UP028
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._pending.failed(self._attachment, exc)
            raise

    def close(self) -> None:
        close = getattr(self._iterable, "close", None)
        if close is not None:
            try:
                close()
            except BaseException as exc:
                self._pending.failed(self._attachment, exc)
                raise
        self._pending._closed(self._attachment)


class _Flask:
    """Flask's context globals, imported once, when first needed (``init_app`` or the
    first decorated view): ``g`` and ``current_app`` as the objects of the context, and
    the ``request`` proxy (handed to cost, guard and ``on_error`` callables)."""

    __slots__ = ("app", "g", "request")

    def __init__(self) -> None:
        from flask import current_app, g, request

        # The proxies' own accessors: one lookup each, no attribute forwarding.
        self.app: Callable[[], Flask] = cast(Any, current_app)._get_current_object
        self.g: Callable[[], Any] = cast(Any, g)._get_current_object
        self.request: Request = request


_flask: _Flask | None = None


def _load_flask() -> _Flask:
    global _flask
    if _flask is None:
        _flask = _Flask()
    return _flask


def _adopt_final_response(response: Response) -> Response:
    """``after_request``: an earlier handler may have replaced the response the view's
    spend was attached to; settle on the one that will be sent."""
    pending: _Pending | None = getattr(_load_flask().g(), _PENDING, None)
    if pending is not None and pending.attached and not pending.done:
        if pending.charge_when(response.status_code):
            pending.attach(response)
        else:
            pending.exit(ActionFailed(response.status_code))
    return response


def _settle_leftover(error: BaseException | None) -> None:
    """``teardown_request``: a spend never attached to a response, or whose response was
    lost to an unhandled error, ends as failed."""
    pending: _Pending | None = getattr(_load_flask().g(), _PENDING, None)
    if pending is None or pending.done:
        return
    if error is not None:  # the response the spend waits on will not be sent
        pending.exit(error)
    elif not pending.attached:
        pending.exit(ActionFailed(0))


def current_spend() -> Spend | None:
    """The :class:`~creditguard.Spend` of the request being handled
    (``flask.g.creditguard_spend``, set by :func:`requires_credits`), or ``None`` outside
    a guarded view."""
    from flask import has_app_context

    if not has_app_context():
        return None
    spend = getattr(_load_flask().g(), "creditguard_spend", None)
    return spend if isinstance(spend, Spend) else None


def requires_credits(
    cost: int | Callable[[Request], int],
    *,
    guard: GuardSpec | None = None,
    on_error: OnError | None = None,
    charge_when: Callable[[int], bool] | None = None,
    subject: Callable[[Request], str | None] | None = None,
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
    ``subject``: a callable of the request returning who it spends for (a str, or
    ``None``): the guard's ``allowance`` for it applies (402 ``allowance_exceeded``).

    The view finds its :class:`~creditguard.Spend` with :func:`current_spend` (it is
    ``flask.g.creditguard_spend``). The
    spend ends when the WSGI server closes the response (``call_on_close``; for a
    ``send_file`` response, the file it was handed), after the last byte was sent, with
    no balance read of its own: like a decorated call's, it settles at a later read
    (``balance_after`` is ``None``). A view that raises, a streamed body that raises
    part-way, or a status ``charge_when`` does not charge, ends it as failed.
    """
    cost_of: Callable[[Request], int] | None = None
    static = 0
    if callable(cost):
        cost_of = cost
    else:
        static = check_cost(cost)
    check_guard_spec(guard, optional=True)
    check_hook("on_error", on_error)
    check_hook("charge_when", charge_when)
    check_subject_spec(subject)

    def decorate(view: Callable[P, Any]) -> Callable[P, Response]:
        if not callable(view):
            raise TypeError(f"requires_credits decorates a view, got {type(view).__name__}")
        is_async = is_async_callable(view)
        flask = _load_flask()
        current_app, current_g, request = flask.app, flask.g, flask.request

        @functools.wraps(view)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Response:
            app = current_app()
            state = app.extensions.get(EXTENSION_KEY)
            app_state = state if isinstance(state, _AppState) else None
            amount = static if cost_of is None else check_cost(cost_of(request))
            spec = guard if guard is not None else app_state.guard if app_state else None
            try:
                if spec is None:
                    the_guard = default_guard()
                elif isinstance(spec, CreditGuard):
                    the_guard = spec
                else:
                    the_guard = resolve_guard(spec, request)
                named = subject or (app_state.subject if app_state else None)
                who = subject_of(named, request) if amount else None
                rule = request.url_rule
                action = route_action(request.method, None if rule is None else rule.rule)
                spend = Spend(the_guard, amount, defer=True, subject=who, action=action)
                if amount:
                    spend.__enter__()
            except CreditGuardError as exc:
                hook = on_error or (app_state.on_error if app_state else None)
                return _refusal(app, request, exc, hook)
            g = current_g()
            g.creditguard_spend = spend
            call = app.ensure_sync(view) if is_async else view
            if not amount:
                return app.make_response(call(*args, **kwargs))
            when = charge_when or (app_state.charge_when if app_state else None) or charged
            pending = _Pending(spend, when)
            vars(g).setdefault(_PENDING, pending)
            try:
                response = app.make_response(call(*args, **kwargs))
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


def _refusal(
    app: Flask, request: Request, exc: CreditGuardError, on_error: OnError | None
) -> Response:
    """The answer to a request the guard refused: ``on_error``'s, else the problem JSON."""
    answer = on_error(request, exc) if on_error is not None else None
    if answer is not None:
        return app.make_response(answer)
    problem = problem_for(exc)
    if problem is None:  # pragma: no cover - every CreditGuardError has one
        raise exc
    return app.response_class(
        problem.content(),
        status=problem.status,
        headers=problem.headers,
        content_type=problem.header_list()[0][1],
    )
