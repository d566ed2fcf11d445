"""Guard paid routes of any WSGI app (PEP 3333: Flask, Django, Bottle, Pyramid...).

::

    from creditguard.web.wsgi import CreditGuardMiddleware

    app = CreditGuardMiddleware(app, guard=guard, cost={"POST /events/{event_id}/unlock": 10})

Free routes go straight to the app. A paid response's spend ends in its iterable's
``close()``, which the server calls after the last byte is written, and settles at a later
balance read, as a decorated call's does. See ``docs/howto/wsgi.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from creditguard.core.errors import CreditGuardError
from creditguard.guard.guard import CreditGuard, Spend
from creditguard.web.common import (
    BAD_PATH,
    ActionFailed,
    CostSpec,
    GuardSpec,
    Problem,
    charged,
    check_cost,
    check_subject_spec,
    is_async_callable,
    middleware_cost,
    problem_for,
    resolve_guard,
    subject_of,
    undecidable,
)

__all__ = ["SPEND_KEY", "ActionFailed", "CreditGuardMiddleware", "problem_app"]

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
OnError = Callable[[Environ, CreditGuardError], "WSGIApp | None"]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

SPEND_KEY = "creditguard.spend"
"""The key of the request's :class:`~creditguard.Spend` in the WSGI ``environ``."""

_REASONS = {
    400: "Bad Request",
    402: "Payment Required",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem_app(problem: Problem) -> WSGIApp:
    """A WSGI app answering ``problem``."""

    def answer(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        body = problem.content()
        headers = [*problem.header_list(), ("Content-Length", str(len(body)))]
        start_response(f"{problem.status} {_REASONS.get(problem.status, 'Error')}", headers)
        return [body]

    return answer


class CreditGuardMiddleware:
    """WSGI middleware that admits each paid request against the guard, answers 402 / 503
    / 500 when it cannot, and ends the spend when the server closes the response, with no
    balance read of its own: like a decorated call's, the spend settles at a later read
    (``balance_after`` is ``None``).

    ``cost``: a mapping of route patterns (``"POST /events/{id}/unlock"``, matched against
    ``REQUEST_METHOD`` and ``PATH_INFO`` decoded as UTF-8, as Flask and Django decode it;
    a path holding control characters is answered 400) to ints, a callable of the
    ``environ`` returning an int, or ``None``. ``guard``: a
    :class:`~creditguard.CreditGuard`, or a callable of the ``environ`` returning the
    guard of the request's tenant. ``on_error(environ, error)`` may return a WSGI app (a
    Werkzeug ``Response``, say) that answers instead of the default problem JSON, or
    ``None``. ``charge_when(status)`` decides whether a
    finished response is charged (default: ``status < 400``).

    The app finds its :class:`~creditguard.Spend` in ``environ["creditguard.spend"]``.

    ``subject`` (a callable of the ``environ`` returning a str, or ``None``) names who a
    paid request spends for: the guard's ``allowance`` for it applies (402
    ``allowance_exceeded`` past it).
    """

    __slots__ = ("_charge_when", "_cost", "_guard", "_on_error", "_subject", "app")

    def __init__(
        self,
        app: WSGIApp,
        *,
        guard: GuardSpec,
        cost: CostSpec = None,
        on_error: OnError | None = None,
        charge_when: Callable[[int], bool] | None = None,
        subject: Callable[[Environ], str | None] | None = None,
    ) -> None:
        built = middleware_cost(guard, cost, on_error, charge_when)
        if built.is_async:
            raise TypeError("a WSGI cost callable must be synchronous")
        check_subject_spec(subject)
        if subject is not None and is_async_callable(subject):
            raise TypeError("a WSGI subject callable must be synchronous")
        self._subject = subject
        self.app = app
        self._guard = guard
        self._cost = built
        self._on_error = on_error
        self._charge_when = charge_when or charged

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        cost = self._cost
        if cost.routes is not None:
            path = route_path(environ)
            if undecidable(path):
                return problem_app(BAD_PATH)(environ, start_response)
            amount = cost.routes.cost(environ["REQUEST_METHOD"], path)
        elif cost.func is not None:
            amount = check_cost(cost.func(environ))
        else:
            return self.app(environ, start_response)
        if not amount:
            return self.app(environ, start_response)
        try:
            guard = self._guard
            if not isinstance(guard, CreditGuard):
                guard = resolve_guard(guard, environ)
            spend = Spend(guard, amount, defer=True, subject=subject_of(self._subject, environ))
            spend.__enter__()
        except CreditGuardError as exc:
            answer = self._on_error(environ, exc) if self._on_error is not None else None
            if answer is None:
                problem = problem_for(exc)
                if problem is None:  # pragma: no cover - every CreditGuardError has one
                    raise
                answer = problem_app(problem)
            return answer(environ, start_response)
        environ[SPEND_KEY] = spend
        return run(self.app, environ, start_response, spend, self._charge_when)


def route_path(environ: Environ) -> str:
    """The path the app routes on: ``PATH_INFO`` (PEP 3333 passes its bytes decoded as
    latin-1) decoded as UTF-8, as Werkzeug (Flask) and Django decode it."""
    path: str = environ.get("PATH_INFO") or "/"
    if path.isascii():
        return path
    try:
        return path.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # not as PEP 3333 says: already decoded
        return path


def run(
    app: WSGIApp,
    environ: Environ,
    start_response: StartResponse,
    spend: Spend,
    charge_when: Callable[[int], bool],
) -> Iterable[bytes]:
    """Call ``app`` for an admitted ``spend``; the spend ends in the response's
    ``close()``, or at once when the app raises."""
    response = SettledResponse(spend, charge_when, start_response)
    try:
        response.iterable = app(environ, response.start_response)
    except BaseException:
        exc_type, exc, tb = sys.exc_info()
        response.closed = True
        spend.__exit__(exc_type, exc, tb)
        raise
    return response


class SettledResponse:
    """The app's response iterable, passed through; ``close()`` settles the spend."""

    __slots__ = (
        "_charge_when",
        "_error",
        "_spend",
        "_start_response",
        "closed",
        "iterable",
        "status",
    )

    def __init__(
        self,
        spend: Spend,
        charge_when: Callable[[int], bool],
        start_response: StartResponse | None = None,
    ) -> None:
        self._spend = spend
        self._charge_when = charge_when
        self._start_response = start_response
        self._error: BaseException | None = None
        self.iterable: Iterable[bytes] = ()
        self.status = 0
        self.closed = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        """The app's ``start_response``: notes the status, then calls the server's."""
        self.status = int(status[:3])
        start_response = self._start_response
        assert start_response is not None
        if exc_info is None:
            return start_response(status, headers)
        return start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        iterable = self.iterable
        if type(iterable) is list or type(iterable) is tuple:
            return iter(iterable)  # iterating it cannot fail
        return self._watched(iterable)

    def _watched(self, iterable: Iterable[bytes]) -> Iterator[bytes]:
        """Iterate ``iterable``, noting the error that ends the iteration (or keeps it
        from starting), if any."""
        try:
            # Not ``yield from``: closing this generator must not close the app's iterable
            # (``close()`` does that, once).
            for chunk in iterable:  # noqa: UP028
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._error = exc
            raise

    def __del__(self) -> None:
        # Dropped without ``close()`` (a WSGI layer outside this one replaced the response
        # and broke PEP 3333's promise to close it): the reservation is not stranded; the
        # spend ends as failed (released, cached balance distrusted).
        if not self.closed:
            self.closed = True
            self._end(self._error or ActionFailed(0))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.iterable, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            self._end(exc)
            raise
        self._end(self._error)

    def _end(self, error: BaseException | None) -> None:
        spend = self._spend
        if error is not None:
            spend.__exit__(type(error), error, error.__traceback__)
            return
        if self.status and self._charge_when(self.status):
            spend.__exit__(None, None, None)
        else:
            failed = ActionFailed(self.status)
            spend.__exit__(ActionFailed, failed, None)
