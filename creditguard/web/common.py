"""What every web framework adapter shares, with no framework imported.

Route patterns and their costs, cost and guard resolution, the mapping from guard errors
to HTTP answers (status, headers, JSON body) and the rule that decides whether a finished
response is charged. The adapters (``asgi``, ``wsgi``, ``fastapi``, ``flask``, ``django``,
the modules beside this one) only translate between these and their framework.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from creditguard.core.checks import _check_cost
from creditguard.core.errors import (
    CreditGuardError,
)
from creditguard.core.policy import check_subject
from creditguard.guard.guard import CreditGuard
from creditguard.web.problems import BAD_PATH, PROBLEM_CONTENT_TYPE, Problem, problem_for

__all__ = [
    "BAD_PATH",
    "PROBLEM_CONTENT_TYPE",
    "ActionFailed",
    "Problem",
    "Routes",
    "asubject_of",
    "charged",
    "check_cost",
    "check_subject_spec",
    "default_guard",
    "problem_for",
    "route_action",
    "route_path",
    "subject_of",
    "undecidable",
]

logger = logging.getLogger("creditguard.web")


# What a finished response's status must satisfy to be charged (spent), by default.
ChargeWhen = Callable[[int], bool]


def charged(status: int) -> bool:
    """The default ``charge_when``: a response below 400 means the paid action happened."""
    return status < 400


class ActionFailed(CreditGuardError):
    """The guarded endpoint answered with a status ``charge_when`` does not charge for.

    It is what the adapters exit the spend with in that case, so the guard releases the
    reservation and distrusts its cached balance (``GuardEvent.error`` of the ``"failed"``
    event). ``status`` is the response's status, ``0`` when no response was completed.
    """

    def __init__(self, status: int) -> None:
        self.status = status
        what = f"answered {status}" if status else "did not complete a response"
        super().__init__(f"the guarded endpoint {what}; the spend is not charged")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.status,))


# A cost as the core accepts it (an int, not a bool, of at least 0): the core's own check.
check_cost = _check_cost


def default_guard() -> CreditGuard:
    """The process-wide guard ``creditguard.requires_credits`` uses without ``guard=``,
    built from ``LENSMOR_API_KEY`` / ``LENSMOR_BASE_URL`` at first use."""
    from creditguard.guard.guard import default_guard

    return default_guard()


def is_async_callable(func: object) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - the method itself is inspected
    return not inspect.isfunction(func) and inspect.iscoroutinefunction(call)


# -- route patterns --------------------------------------------------------------------

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_]+))?\}")
_METHOD = re.compile(r"[A-Z]+")

# What each converter of a route template matches: for each, the widest of what Starlette,
# Django and Flask route with a converter of that name, so that every path a framework
# routes to the template is priced by it.
_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_CONVERTERS = {
    None: "[^/]+",
    "str": "[^/]+",
    "string": "[^/]+",
    "int": "[0-9]+",
    "float": "[0-9]+(?:\\.[0-9]+)?",
    "uuid": _UUID,
    "slug": "[-a-zA-Z0-9_]+",
    "path": ".*",
}


def _source(pattern: str, path: str) -> str:
    """The regular expression of a templated path (no capturing groups)."""
    parts: list[str] = []
    last = 0
    for match in _PARAM.finditer(path):
        converter = _CONVERTERS.get(match[2])
        if converter is None:
            raise ValueError(
                f"route pattern {pattern!r}: unknown converter {match[2]!r} (known:"
                f" {', '.join(sorted(c for c in _CONVERTERS if c))})"
            )
        parts.append(re.escape(path[last : match.start()]))
        parts.append(converter)
        last = match.end()
    parts.append(re.escape(path[last:]))
    return "".join(parts)


def unnamed(template: str) -> str:
    """``template`` with its parameters' names left out (``{:int}``; ``{:str}`` for a
    plain ``{name}``): two spellings of one route compare equal."""
    return _PARAM.sub(
        lambda m: "{:" + (m[2] if m[2] not in (None, "string") else "str") + "}", template
    )


_ANGLE = re.compile(r"<(?:([A-Za-z_][A-Za-z0-9_]*):)?([A-Za-z_][A-Za-z0-9_]*)>")


def angle_template(route: str) -> str | None:
    """A Django or Flask route (``events/<str:event_id>/unlock``) in ``{name}`` syntax,
    with a leading ``/``; ``None`` for a regular expression route (``re_path``)."""
    if any(ch in route for ch in "^$()[]\\*+?|"):
        return None
    converted = _ANGLE.sub(lambda m: "{" + m[2] + (":" + m[1] if m[1] else "") + "}", route)
    return converted if converted.startswith("/") else "/" + converted


def undecidable(path: str) -> bool:
    """Whether ``path`` (percent-decoded) holds characters a route parser may read
    differently from ours (control characters: a regex's ``$`` matches before a final
    newline): a middleware pricing by path refuses such a request (400)."""
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path)


def route_path(scope: Mapping[str, Any]) -> str:
    """The path an ASGI app routes on: ``scope["path"]`` less ``scope["root_path"]``
    (the prefix a ``Mount`` or the server's ``--root-path`` put in front), as Starlette
    computes it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    if path[len(root)] == "/":
        return path[len(root) :]
    return path


class Routes:
    """Costs by route pattern: ``{"POST /events/{event_id}/unlock": 10, "/search": 2}``.

    A pattern is an optional HTTP method (upper case) and a path. ``{name}`` (or
    ``{name:str}``) matches one path segment, ``{name:path}`` the rest of the path (maybe
    empty), ``{name:int}``, ``{name:float}``, ``{name:uuid}`` and ``{name:slug}`` what the
    frameworks' converters of those names match; another converter is a ``ValueError``.
    Without a method, a pattern matches every method. A ``GET`` pattern prices ``HEAD``
    too (the frameworks answer HEAD with the GET handler), unless a ``HEAD`` pattern names
    the same path. Literal patterns win over templated ones; templated ones are tried in
    the mapping's order. A request no pattern matches is free.

    Everything is compiled once: literal patterns are a dict lookup by path, then method;
    the templated patterns a method can match are one regular expression (an alternation
    in the mapping's order, so the first pattern that matches wins).
    """

    __slots__ = ("_exact", "_matchers", "_other", "_templates")

    def __init__(self, costs: Mapping[str, int]) -> None:
        # path -> {method or None: cost}
        self._exact: dict[str, dict[str | None, int]] = {}
        templates: list[tuple[str | None, str, int]] = []
        parsed: list[tuple[str, str | None, str, int]] = []
        for pattern, cost in costs.items():
            if not isinstance(pattern, str):
                raise TypeError(f"a route pattern must be a str, got {type(pattern).__name__}")
            method, path = self._split(pattern)
            if "{" in _PARAM.sub("", path) or "}" in _PARAM.sub("", path):
                raise ValueError(f"route pattern {pattern!r}: a malformed {{parameter}}")
            parsed.append((pattern, method, path, check_cost(cost)))
        head = {path for _, method, path, _ in parsed if method == "HEAD"}
        # (method or None, the path with its parameters unnamed) -> cost: what a route a
        # framework resolved costs (:meth:`route_cost`).
        self._templates: dict[tuple[str | None, str], int] = {}
        for pattern, method, path, amount in parsed:
            methods = [method]
            if method == "GET" and path not in head:
                methods.append("HEAD")  # HEAD runs the GET handler
            for each in methods:
                self._templates.setdefault((each, unnamed(path)), amount)
                if _PARAM.search(path):
                    templates.append((each, _source(pattern, path), amount))
                else:
                    self._exact.setdefault(path, {}).setdefault(each, amount)
        # method -> (alternation of the templates it can match, their costs in order); the
        # methods no template names share ``_other`` (the method-less templates).
        self._matchers: dict[str, _Matcher | None] = {}
        for method in {m for m, _, _ in templates if m is not None}:
            self._matchers[method] = _matcher(
                [(src, amount) for m, src, amount in templates if m is None or m == method]
            )
        self._other = _matcher([(src, amount) for m, src, amount in templates if m is None])

    @staticmethod
    def _split(pattern: str) -> tuple[str | None, str]:
        method, sep, path = pattern.strip().partition(" ")
        if not sep:
            method, path = "", method
        path = path.strip()
        if method and not _METHOD.fullmatch(method):
            raise ValueError(f"route pattern {pattern!r}: the method must be upper case")
        if not path.startswith("/"):
            raise ValueError(f"route pattern {pattern!r}: the path must start with '/'")
        return method or None, path

    def cost(self, method: str, path: str) -> int | None:
        """The cost of ``method path``, or ``None`` when no pattern matches (free)."""
        by_method = self._exact.get(path)
        if by_method is not None:
            found = by_method.get(method)
            if found is None:
                found = by_method.get(None)
            if found is not None:
                return found
        matcher = self._matchers.get(method, self._other)
        if matcher is not None:
            match = matcher[0](path)
            if match is not None:
                return matcher[1][match.lastindex or 0]
        return None

    def route_cost(self, method: str, route: str, path: str) -> int | None:
        """The cost of a request the framework routed to ``route`` (its template, in
        ``{name}`` syntax, with any mount prefix): the pattern naming that template (its
        parameters' names aside) when one does, else :meth:`cost` of the ``path``. So a
        route the framework picks over another pattern's match (routes are tried in
        their order) costs what its own pattern says."""
        key = unnamed(route)
        found = self._templates.get((method, key))
        if found is None:
            found = self._templates.get((None, key))
        if found is not None:
            return found
        return self.cost(method, path)

    def __bool__(self) -> bool:
        return bool(self._exact or self._matchers or self._other)


# A compiled alternation's ``fullmatch`` and the cost of each of its groups (by index).
_Matcher = tuple[Callable[[str], "re.Match[str] | None"], tuple[int, ...]]


def _matcher(templates: list[tuple[str, int]]) -> _Matcher | None:
    """One ``fullmatch`` for several templates: ``(a)|(b)|...``; the group that matched
    (``lastindex``) tells which, the first in order winning."""
    if not templates:
        return None
    regex = re.compile("|".join(f"({src})" for src, _ in templates))
    return regex.fullmatch, (0, *(amount for _, amount in templates))


# -- costs and guards of a request ---------------------------------------------------------

CostSpec = Mapping[str, int] | Callable[[Any], Any] | int | None
GuardSpec = CreditGuard | Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class CostOf:
    """A middleware's ``cost`` argument, compiled once: how to price a request."""

    routes: Routes | None
    func: Callable[[Any], Any] | None
    is_async: bool

    @classmethod
    def build(cls, cost: CostSpec) -> CostOf:
        if cost is None:
            return cls(None, None, False)
        if isinstance(cost, Mapping):
            return cls(Routes(cost), None, False)
        if callable(cost):
            return cls(None, cost, is_async_callable(cost))
        raise TypeError(
            "cost must be a mapping of route patterns to ints, a callable of the request,"
            f" or None; got {type(cost).__name__}"
        )


def middleware_cost(guard: object, cost: CostSpec, on_error: object, charge_when: object) -> CostOf:
    """Check a middleware's arguments (the same for ASGI and WSGI) and compile its cost."""
    check_guard_spec(guard)
    check_hook("on_error", on_error)
    check_hook("charge_when", charge_when)
    if isinstance(cost, int):
        raise TypeError("cost must be a mapping of route patterns or a callable, not an int")
    return CostOf.build(cost)


def resolve_guard(guard: GuardSpec, request: object) -> CreditGuard:
    """``guard`` itself, or what the per-request callable returns for ``request``."""
    if isinstance(guard, CreditGuard):
        return guard
    found = guard(request)
    if not isinstance(found, CreditGuard):
        raise TypeError(f"the guard callable must return a CreditGuard, got {type(found).__name__}")
    return found


async def aresolve_guard(guard: GuardSpec, request: object) -> CreditGuard:
    """:func:`resolve_guard` that also accepts an async callable."""
    if isinstance(guard, CreditGuard):
        return guard
    found = guard(request)
    if not isinstance(found, CreditGuard) and inspect.isawaitable(found):
        found = await found
    if not isinstance(found, CreditGuard):
        raise TypeError(f"the guard callable must return a CreditGuard, got {type(found).__name__}")
    return found


def check_guard_spec(guard: object, *, optional: bool = False) -> None:
    if guard is None and optional:
        return
    if not isinstance(guard, CreditGuard) and not callable(guard):
        raise TypeError(
            "guard must be a CreditGuard or a callable of the request returning one,"
            f" got {type(guard).__name__}"
        )


def check_hook(name: str, hook: object) -> None:
    if hook is not None and not callable(hook):
        raise TypeError(f"{name} must be callable, got {type(hook).__name__}")


SubjectSpec = Callable[[Any], Any] | None
"""Who a request spends for: a callable of the request (sync or async) returning a str,
or ``None`` (no subject: only the account's rules apply)."""


def check_subject_spec(subject: object) -> None:
    if subject is not None and not callable(subject):
        raise TypeError(
            "subject must be a callable of the request returning a str (or None),"
            f" got {type(subject).__name__}"
        )


def route_action(method: object, route: object) -> str | None:
    """What a request's spend is named for the metrics and the ledger: its method and the
    route pattern the framework routed it to (``POST /events/{event_id}/unlock``), never
    its path (ids in paths would be as many names as requests); ``None`` when unknown."""
    if not isinstance(method, str) or not isinstance(route, str) or not route:
        return None
    return f"{method} {route}"


def _subject(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"the subject callable must return a str or None, got {type(value).__name__}"
        )
    return check_subject(value)


def subject_of(func: SubjectSpec, request: object) -> str | None:
    """The request's subject (checked), or ``None``."""
    if func is None:
        return None
    return _subject(func(request))


async def asubject_of(func: SubjectSpec, request: object) -> str | None:
    """:func:`subject_of` that also accepts an async callable."""
    if func is None:
        return None
    value = func(request)
    if value is not None and not isinstance(value, str) and inspect.isawaitable(value):
        value = await value
    return _subject(value)


async def acall_cost(func: Callable[[Any], Any], request: object) -> int:
    """Call a sync or async cost callable and validate what it returns."""
    value = func(request)
    if type(value) is not int and inspect.isawaitable(value):
        value = await value
    return check_cost(value)
