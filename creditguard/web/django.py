"""Guard Django views for Lensmor credits: a middleware and a view decorator.

Settings::

    MIDDLEWARE = [..., "creditguard.django.CreditGuardMiddleware"]
    CREDITGUARD = {
        "COSTS": {"POST /events/{event_id}/unlock": 10},
        # "API_KEY" / "BASE_URL" / "OPTIONS", or "GUARD"; "ON_ERROR"; "CHARGE_WHEN"
    }

or per view::

    from creditguard.web.django import requires_credits

    @requires_credits(10)
    def unlock(request, event_id): ...

Sync and async (ASGI) both. See ``docs/howto/django.md``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar, cast

from creditguard.core.errors import CreditGuardError
from creditguard.guard.guard import CreditGuard, Spend
from creditguard.web.common import (
    BAD_PATH,
    PROBLEM_CONTENT_TYPE,
    ActionFailed,
    CostOf,
    GuardSpec,
    Problem,
    angle_template,
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
    undecidable,
)

__all__ = [
    "SPEND_ATTRIBUTE",
    "ActionFailed",
    "CreditGuardMiddleware",
    "current_spend",
    "guard_from_settings",
    "requires_credits",
]

P = ParamSpec("P")
R = TypeVar("R")

SPEND_ATTRIBUTE = "creditguard_spend"
"""The request attribute holding the request's :class:`~creditguard.Spend`."""

SETTING = "CREDITGUARD"
_KEYS = frozenset(
    {"GUARD", "API_KEY", "BASE_URL", "OPTIONS", "COSTS", "ON_ERROR", "CHARGE_WHEN", "SUBJECT"}
)


def _django(module: str) -> Any:
    """A Django module, imported when first needed (Django ships no type hints: its
    objects are ``Any`` here)."""
    return importlib.import_module(module)


def _load(value: Any) -> Any:
    """A dotted path (``"myapp.credits.guard_for"``) imported, anything else as is."""
    if isinstance(value, str):
        module, _, name = value.rpartition(".")
        if not module:
            raise CreditGuardError(f"{SETTING}: {value!r} is not a dotted path")
        return getattr(importlib.import_module(module), name)
    return value


class _Config:
    """The ``CREDITGUARD`` setting, validated and compiled once (again when it changes)."""

    def __init__(self, raw: Mapping[str, Any] | None) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise CreditGuardError(f"the {SETTING} setting must be a dict")
        unknown = set(raw) - _KEYS
        if unknown:
            raise CreditGuardError(f"unknown {SETTING} keys: {', '.join(sorted(unknown))}")
        self.present = bool(raw)
        self.raw = raw
        self.costs = CostOf.build(_load(raw.get("COSTS")))
        if self.costs.is_async:
            raise CreditGuardError(f"{SETTING}['COSTS']: the cost callable must be synchronous")
        self.on_error = _load(raw.get("ON_ERROR"))
        self.charge_when: Callable[[int], bool] = _load(raw.get("CHARGE_WHEN")) or charged
        self.subject: Callable[[Any], Any] | None = _load(raw.get("SUBJECT"))
        check_hook("ON_ERROR", self.on_error)
        check_hook("CHARGE_WHEN", self.charge_when)
        if self.subject is not None and not callable(self.subject):
            raise CreditGuardError(f"{SETTING}['SUBJECT'] must be a callable of the request")
        self._guard: GuardSpec | None = None
        self._lock = threading.Lock()

    def guard(self) -> GuardSpec:
        guard = self._guard
        if guard is not None:
            return guard
        with self._lock:
            if self._guard is None:
                raw = self.raw
                if "GUARD" in raw:
                    spec = _load(raw["GUARD"])
                    check_guard_spec(spec)
                    self._guard = spec
                elif {"API_KEY", "BASE_URL", "OPTIONS"} & set(raw):
                    self._guard = CreditGuard(
                        raw.get("API_KEY"), base_url=raw.get("BASE_URL"), **raw.get("OPTIONS", {})
                    )
                else:
                    self._guard = default_guard()
            return self._guard


_config_lock = threading.Lock()
_config: _Config | None = None


def _settings() -> _Config:
    global _config
    config = _config
    if config is None:
        settings = _django("django.conf").settings
        setting_changed = _django("django.core.signals").setting_changed
        with _config_lock:
            if _config is None:
                setting_changed.connect(_forget, dispatch_uid="creditguard.django")
                _config = _Config(getattr(settings, SETTING, None))
            config = _config
    return config


def _forget(*, setting: str, **kwargs: Any) -> None:
    """``setting_changed`` receiver: ``override_settings(CREDITGUARD=...)`` takes effect."""
    global _config
    if setting == SETTING:
        with _config_lock:
            _config = None


def current_spend(request: Any) -> Spend | None:
    """The :class:`~creditguard.Spend` of ``request`` (``request.creditguard_spend``, set
    by the middleware or :func:`requires_credits`), or ``None`` when it is not guarded."""
    spend = getattr(request, SPEND_ATTRIBUTE, None)
    return spend if isinstance(spend, Spend) else None


def guard_from_settings(request: Any = None) -> CreditGuard:
    """The guard the ``CREDITGUARD`` setting describes (for ``request``, when ``GUARD`` is
    a callable): ``GUARD``; else one built from ``API_KEY``, ``BASE_URL`` and ``OPTIONS``;
    else, without any of them, the process-wide default guard from the environment."""
    spec = _settings().guard()
    if isinstance(spec, CreditGuard):
        return spec
    return resolve_guard(spec, request)


def _route_of(request: Any, path: str) -> str | None:
    """The route Django will run for ``path`` (as ``request.resolver_match.route`` will
    say, in ``{name}`` syntax), or ``None``: no match, or a ``re_path`` route."""
    urls = _django("django.urls")
    try:
        match = urls.resolve(path, getattr(request, "urlconf", None))
    except urls.Resolver404:
        return None
    route = getattr(match, "route", None)
    return angle_template(route) if isinstance(route, str) and route else None


def _refusal(
    request: Any, exc: CreditGuardError, on_error: Callable[[Any, CreditGuardError], Any] | None
) -> Any:
    if on_error is not None:
        answer = on_error(request, exc)
        if answer is not None:
            return answer
    problem = problem_for(exc)
    if problem is None:  # pragma: no cover - every CreditGuardError has an answer
        raise exc
    return _answer(problem)


def _answer(problem: Problem) -> Any:
    """``problem`` as an ``HttpResponse``."""
    HttpResponse = _django("django.http").HttpResponse

    response = HttpResponse(
        problem.content(), status=problem.status, content_type=PROBLEM_CONTENT_TYPE
    )
    for name, value in problem.headers:
        response[name] = value
    return response


# The spends of the requests being handled that wait for their response to be finished.
# Django closes the response it sends after the last byte, whatever response that is: a
# middleware outside this one may have replaced the one the view answered
# (``ConditionalGetMiddleware``'s 304), and the replaced one is never closed. So a spend
# does not wait on its response:
#
# * under the WSGI handler (and Django's test clients), the response is closed, and
#   ``request_finished`` sent, in the request's own context (thread): the spend waits in
#   a list of that context (made at ``request_started``), charged at ``request_finished``
#   (failed when the request is released first: a layer outside Django dropped the
#   response unclosed, and Django will not finish it);
# * under the ASGI handler, the view runs in a task of its own, which ends once the
#   response is sent (or the client is gone), and the response is closed outside it: the
#   spend is charged when that task is done (a sync view, run in a worker thread, has
#   no task: its spend is charged when the handler releases the request, after closing
#   the response; at the latest when it is garbage collected).
_waiting: ContextVar[list[_Waiting] | None] = ContextVar("creditguard_waiting", default=None)
_connected = False
_connect_lock = threading.Lock()
_settling: set[asyncio.Task[None]] = set()  # settle tasks started from the event loop


class _Waiting:
    """One spend waiting for its request's end; settled (charged) once."""

    __slots__ = ("done", "spend")

    def __init__(self, spend: Spend) -> None:
        self.spend = spend
        self.done = False

    def settle(self) -> None:
        if not self.done:
            self.done = True
            self.spend.__exit__(None, None, None)

    async def asettle(self) -> None:
        if not self.done:
            self.done = True
            await self.spend.__aexit__(None, None, None)

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.spend.__exit__(type(error), error, error.__traceback__)

    def dropped(self) -> None:
        """The request was released before Django finished it: its response was dropped
        unclosed, so ``request_finished`` will not come."""
        self.fail(ActionFailed(0))

    async def afail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            await self.spend.__aexit__(type(error), error, error.__traceback__)

    def settle_soon(self) -> None:
        """Settle now, or, on an event loop's thread, in a task (nothing blocking)."""
        if self.done:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.settle()
            return
        task = loop.create_task(self.asettle())
        _settling.add(task)
        task.add_done_callback(_settling.discard)


def _connect() -> None:
    """Connect the ``request_started`` / ``request_finished`` receivers, once."""
    global _connected
    if _connected:
        return
    with _connect_lock:
        if not _connected:
            signals = _django("django.core.signals")
            signals.request_started.connect(_started, dispatch_uid="creditguard.django.started")
            signals.request_finished.connect(_finished, dispatch_uid="creditguard.django.finished")
            _connected = True


def _started(**kwargs: Any) -> None:
    """``request_started`` receiver: a new list of waiting spends for this context; a
    spend still waiting in it lost its request's end, and ends as failed."""
    left = _waiting.get()
    _waiting.set([])
    for waiting in left or ():
        if not waiting.done:
            waiting.done = True
            waiting.spend.__exit__(ActionFailed, ActionFailed(0), None)


def _settle_when_finished(
    request: Any, response: Any, spend: Spend, charge_when: Callable[[int], bool]
) -> None:
    """End ``spend`` when Django finishes ``request``, charged; at once, failed, when
    ``charge_when`` does not charge ``response``'s status."""
    status = response.status_code
    if not charge_when(status):
        spend.__exit__(ActionFailed, ActionFailed(status), None)
        return
    _connect()
    waiting = _Waiting(spend)
    found = _waiting.get()
    if found is None:  # no request_started seen in this context (a view called directly)
        found = []
        _waiting.set(found)
    found.append(waiting)
    if getattr(response, "streaming", False) and getattr(response, "file_to_stream", None) is None:
        _watch_stream(response, waiting)
    if hasattr(request, "scope"):  # an ASGIRequest: its view runs in a task of its own
        try:
            task = asyncio.current_task()
        except RuntimeError:  # a sync view, in a worker thread
            task = None
        if task is not None:  # it ends once the response is sent (or the client gone)
            task.add_done_callback(lambda _: waiting.settle_soon())
        else:  # the handler releases the request once the response is closed
            weakref.finalize(request, waiting.settle_soon)
    else:  # a WSGI layer outside Django may drop the response (and the request) unclosed
        weakref.finalize(request, waiting.dropped)


def _watch_stream(response: Any, waiting: _Waiting) -> None:
    """A streamed body that raises part-way ends its spend as failed, with its error.
    (A ``FileResponse``'s file is left as it is: the server may send it itself.)"""
    content = response.streaming_content
    if response.is_async:

        async def awatched() -> AsyncIterator[Any]:
            try:
                async for chunk in content:
                    yield chunk
            except Exception as exc:
                await waiting.afail(exc)
                raise

        response.streaming_content = awatched()
        return

    def watched() -> Iterator[Any]:
        try:
            yield from content
        except Exception as exc:
            waiting.fail(exc)
            raise

    response.streaming_content = watched()


def _finished(**kwargs: Any) -> None:
    """``request_finished`` receiver: this context's request is finished; charge the
    spends waiting for it."""
    found = _waiting.get()
    if not found:
        return
    waiting = found[:]
    found.clear()
    for each in waiting:
        each.settle()


class _Guarding:
    """What the middleware and the decorator share: price, admit, run, settle."""

    __slots__ = ("charge_when", "guard", "on_error", "subject")

    def __init__(
        self,
        guard: GuardSpec | None,
        on_error: Callable[[Any, CreditGuardError], Any] | None,
        charge_when: Callable[[int], bool] | None,
        subject: Callable[[Any], Any] | None = None,
    ) -> None:
        check_guard_spec(guard, optional=True)
        check_hook("on_error", on_error)
        check_hook("charge_when", charge_when)
        check_subject_spec(subject)
        if subject is not None and is_async_callable(subject):
            raise TypeError("a Django subject callable must be synchronous")
        _connect()  # before the first request starts
        self.guard = guard
        self.on_error = on_error
        self.charge_when = charge_when
        self.subject = subject

    def _spend(self, request: Any, amount: int, config: _Config) -> Spend:
        spec = self.guard
        if spec is None:
            spec = config.guard()
        guard = spec if isinstance(spec, CreditGuard) else resolve_guard(spec, request)
        who = subject_of(self.subject or config.subject, request)
        match = getattr(request, "resolver_match", None)
        route = None if match is None else getattr(match, "route", None)
        action = route_action(request.method, None if route is None else "/" + route)
        return Spend(guard, amount, defer=True, subject=who, action=action)

    def run(
        self,
        request: Any,
        amount: int,
        view: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Admit ``request`` for ``amount``, then answer ``view(*args, **kwargs)``."""
        config = _settings()
        charge_when = self.charge_when if self.charge_when is not None else config.charge_when
        try:
            spend = self._spend(request, amount, config)
            spend.__enter__()
        except CreditGuardError as exc:
            on_error = self.on_error if self.on_error is not None else config.on_error
            return _refusal(request, exc, on_error)
        setattr(request, SPEND_ATTRIBUTE, spend)
        try:
            response = view(*args, **kwargs)
        except BaseException:
            spend.__exit__(*sys.exc_info())
            raise
        _settle_when_finished(request, response, spend, charge_when)
        return response

    async def arun(
        self,
        request: Any,
        amount: int,
        view: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """:meth:`run` for an async ``view``."""
        config = _settings()
        charge_when = self.charge_when if self.charge_when is not None else config.charge_when
        try:
            spend = self._spend(request, amount, config)
            await spend.__aenter__()
        except CreditGuardError as exc:
            on_error = self.on_error if self.on_error is not None else config.on_error
            return _refusal(request, exc, on_error)
        setattr(request, SPEND_ATTRIBUTE, spend)
        try:
            response = await view(*args, **kwargs)
        except BaseException:
            await spend.__aexit__(*sys.exc_info())
            raise
        _settle_when_finished(request, response, spend, charge_when)
        return response


class CreditGuardMiddleware:
    """Django middleware pricing every request by the ``CREDITGUARD["COSTS"]`` setting (a
    mapping of route patterns, matched against ``request.method`` and
    ``request.path_info``, or a callable of the request; a dotted path to either works).
    With a mapping, the route Django resolves the path to (``resolver_match.route``) is
    priced by the pattern naming it, when one does, so URL patterns tried in their order
    cannot send a request to a priced view that another pattern prices lower; a path
    holding control characters is answered 400 (a ``re_path`` ending in ``$`` would
    route it when the pattern does not match it).

    The guard comes from the setting (see :func:`guard_from_settings`); ``ON_ERROR``
    (``callable(request, error) -> HttpResponse | None``) replaces the problem JSON
    answer; ``CHARGE_WHEN`` (``callable(status) -> bool``, default ``status < 400``)
    decides whether a response is charged; ``SUBJECT`` (``callable(request) -> str |
    None``) names who a request spends for (the guard's ``allowance`` applies). Free
    requests pass straight through. Works in sync (WSGI) and async (ASGI) stacks without
    a thread hop.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction

        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        self._guarding = _Guarding(None, None, None)
        _settings()  # a bad setting fails at startup, not at the first request

    def _amount(self, request: Any) -> int | None:
        """The request's cost; ``-1`` when its path cannot be priced (answered 400)."""
        costs = _settings().costs
        if costs.routes is not None:
            path = request.path_info
            if undecidable(path):
                return -1
            route = _route_of(request, path)
            if route is None:
                return costs.routes.cost(request.method, path)
            return costs.routes.route_cost(request.method, route, path)
        if costs.func is not None:
            return check_cost(costs.func(request))
        return None

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self.__acall__(request)
        amount = self._amount(request)
        if not amount:
            return self.get_response(request)
        if amount < 0:
            return _answer(BAD_PATH)
        return self._guarding.run(request, amount, self.get_response, (request,), {})

    async def __acall__(self, request: Any) -> Any:
        amount = self._amount(request)
        if not amount:
            return await self.get_response(request)
        if amount < 0:
            return _answer(BAD_PATH)
        return await self._guarding.arun(request, amount, self.get_response, (request,), {})


def requires_credits(
    cost: int | Callable[[Any], int],
    *,
    guard: GuardSpec | None = None,
    on_error: Callable[[Any, CreditGuardError], Any] | None = None,
    charge_when: Callable[[int], bool] | None = None,
    subject: Callable[[Any], str | None] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function view (sync or ``async def``) so each request is admitted for
    ``cost`` credits (an int >= 0, or a callable of the request) before it runs.

    ``guard``: a :class:`~creditguard.CreditGuard` or a callable of the request returning
    one; by default :func:`guard_from_settings`. ``on_error`` and ``charge_when`` default
    to the ``CREDITGUARD`` setting's ``ON_ERROR`` and ``CHARGE_WHEN``. The view finds its
    :class:`~creditguard.Spend` with :func:`current_spend` (``request.creditguard_spend``);
    the spend ends when Django finishes the request (``request_finished``: the response
    it sends, whichever it is, was closed), with no balance read of its own: like a
    decorated call's, it settles at a later read (``balance_after`` is ``None``).
    ``subject`` (a callable of the request returning a str, or ``None``; by default the
    setting's ``SUBJECT``) names who the request spends for: the guard's ``allowance``
    for it applies (402 ``allowance_exceeded``).
    """
    cost_of: Callable[[Any], int] | None = None
    static = 0
    if callable(cost):
        cost_of = cost
    else:
        static = check_cost(cost)
    guarding = _Guarding(guard, on_error, charge_when, subject)

    def decorate(view: Callable[P, R]) -> Callable[P, R]:
        if not callable(view):
            raise TypeError(f"requires_credits decorates a view, got {type(view).__name__}")
        if is_async_callable(view):

            @functools.wraps(view)
            async def async_guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
                request = args[0]
                amount = static if cost_of is None else check_cost(cost_of(request))
                if not amount:
                    return await cast(Callable[P, Any], view)(*args, **kwargs)
                return await guarding.arun(request, amount, view, args, kwargs)

            return cast(Callable[P, R], async_guarded)

        @functools.wraps(view)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            request = args[0]
            amount = static if cost_of is None else check_cost(cost_of(request))
            if not amount:
                return view(*args, **kwargs)
            result: R = guarding.run(request, amount, view, args, kwargs)
            return result

        return guarded

    return decorate
