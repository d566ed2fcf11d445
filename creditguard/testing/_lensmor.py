"""The paid Lensmor endpoints of the sandbox, with their published shapes and costs: the
dispatch, the key's one credit operation at a time, the exhibitor searches and the
precheck. The unlocks are in ``_events.py`` (event, visitors, full access) and
``_contacts.py`` (contact emails and phone numbers, and their tasks).

* ``POST /external/exhibitors/search-events`` and ``.../search-by-company-name``: 50
  credits for a non-empty page, 0 for an empty one.
* ``POST /external/actions/precheck``: what a call would cost and whether it may run, for
  every paid action the sandbox serves; never charges.

A call that will charge holds the key's credit operation for the sandbox's ``latency`` (and
while paid calls are held, see :meth:`FakeLensmor.hold_paid_calls`); another call that would
charge meanwhile gets ``409 STATE_CONFLICT`` (exhibitor event search: the published ``200``
``USER_CONCURRENCY_LIMIT_EXCEEDED`` envelope). Errors are Lensmor's ``ApiError`` bodies.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from creditguard.testing._contacts import DIGITS, _Contact, _ContactDesk
from creditguard.testing._events import _Event, _EventDesk
from creditguard.testing._paid import Sandbox, _Pending, _Route
from creditguard.testing._wire import (
    Checker,
    _Answer,
    _BadRequest,
    _json,
    _string,
    api_error,
)

SEARCH_COST = 50
MAX_BODY = 1 << 20

PRECHECK_PATH = "/external/actions/precheck"
SEARCH_EVENTS_PATH = "/external/exhibitors/search-events"
SEARCH_COMPANY_PATH = "/external/exhibitors/search-by-company-name"
_ATTENDANCE = ("all", "exhibitor", "visitor")
_PRECHECK_STRINGS = {
    "action_type": 100,
    "call_source": 100,
    "locale": 20,
    "trace_id": 200,
    "conversation_id": 200,
    "channel_message_id": 200,
}


@dataclass
class _Company:
    name: str
    events: int = 1
    exhibitors: int = 1


def _int(data: dict[str, Any], name: str, default: int, least: int, most: int) -> int:
    value = data.get(name, default)
    if type(value) is not int or not least <= value <= most:
        raise _BadRequest(f"{name} must be an integer from {least} to {most}")
    return value


def _page(data: dict[str, Any]) -> tuple[int, int]:
    return _int(data, "page", 1, 1, 10**6), _int(data, "pageSize", 20, 1, 100)


def _paged(items: list[dict[str, Any]], page: int, size: int) -> dict[str, Any]:
    total = len(items)
    pages = -(-total // size)
    return {
        "items": items[(page - 1) * size : page * size],
        "total": total,
        "page": page,
        "pageSize": size,
        "totalPages": pages,
        "hasMore": page < pages,
    }


class _PaidApi:
    """The paid endpoints' state (catalogue, the credit operation in progress) and their
    dispatch; the unlocks are answered by their desks. Everything runs under the fake's
    lock."""

    def __init__(
        self,
        fake: Sandbox,
        *,
        task_polls: int,
        open_catalogue: bool,
        subscription_active: bool,
        task_debit: str = "submission",
    ) -> None:
        if type(task_polls) is not int or task_polls < 1:
            raise ValueError(f"task_polls must be an int >= 1, got {task_polls!r}")
        if task_debit not in ("submission", "delivery"):
            raise ValueError(f"task_debit must be 'submission' or 'delivery', got {task_debit!r}")
        self.fake = fake
        self.task_polls = task_polls
        self.task_debit = task_debit
        self.open_catalogue = open_catalogue
        self.subscription_active = subscription_active
        self.events: dict[str, _Event] = {}
        self.contacts: dict[str, _Contact] = {}
        self.companies: dict[str, _Company] = {}
        self.busy: _Pending | None = None
        self.gate: threading.Event | None = None
        self.started = threading.Condition(fake._lock)
        self.event_desk = _EventDesk(self)
        self.contact_desk = _ContactDesk(self)
        self._task_ids = itertools.count(1001)
        self._trace_ids = itertools.count(1)

    # -- the catalogue -------------------------------------------------------------

    def event(self, event_id: str, *, keep: bool) -> _Event | None:
        found = self.events.get(event_id)
        if found is None and self.open_catalogue:
            found = _Event(event_id, f"Sandbox event {event_id}")
            if keep:
                self.events[event_id] = found
        return found

    def contact(self, personnel_id: str, *, keep: bool) -> _Contact | None:
        found = self.contacts.get(personnel_id)
        if found is None and self.open_catalogue and DIGITS.fullmatch(personnel_id):
            found = _Contact.sample(personnel_id)
            if keep:
                self.contacts[personnel_id] = found
        return found

    def company(self, name: str) -> _Company | None:
        found = self.companies.get(name.strip().casefold())
        if found is None and self.open_catalogue:
            found = _Company(name.strip())
        return found

    # -- dispatch ------------------------------------------------------------------

    def trace_id(self) -> str:
        return f"sandbox-{next(self._trace_ids):08d}"

    def task_id(self) -> str:
        """A new task id (email and phone tasks share the sequence)."""
        return str(next(self._task_ids))

    def answer(
        self, method: str, path: str, authorization: str | None, body: bytes
    ) -> _Answer | _Pending:
        """Answer a request to ``/external/...`` (but the balance); called under the lock."""
        trace = self.trace_id()
        route = self._route(method, path)
        if route is None:
            return api_error(404, "NOT_FOUND", f"Cannot {method} {path}", trace)
        if not self.fake._authorized(authorization, strict=False):
            return api_error(401, "INVALID_API_KEY", "Invalid API key", trace)
        allowed, headers = self.fake._rate_limit.take()
        headers["x-request-id"] = trace
        if not allowed:
            return api_error(
                429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", trace, headers=headers
            )
        try:
            data: dict[str, Any] = {}
            if method == "POST" and route.body:
                data = self._body(body)  # the event unlocks take no body
            result = route.handler(data, trace, headers)
        except _BadRequest as exc:
            return api_error(400, "INVALID_REQUEST", str(exc), trace, headers=headers)
        if isinstance(result, _Answer):
            result.headers.update(headers)
        return result

    def _route(self, method: str, path: str) -> _Route | None:
        if method == "POST":
            own = {
                PRECHECK_PATH: self._precheck,
                SEARCH_EVENTS_PATH: self._search_events,
                SEARCH_COMPANY_PATH: self._search_exhibitors,
            }.get(path)
            if own is not None:
                return _Route(own)
        return self.event_desk.route(method, path) or self.contact_desk.route(method, path)

    @staticmethod
    def _body(body: bytes) -> dict[str, Any]:
        if len(body) > MAX_BODY:
            raise _BadRequest(f"the body is larger than {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest("the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise _BadRequest("the body must be a JSON object")
        return data

    def begin(
        self,
        work: Callable[[], _Answer],
        trace: str,
        headers: dict[str, str],
        *,
        busy: Callable[[], _Answer] | None = None,
    ) -> _Answer | _Pending:
        """Start a call that will charge, unless another credit operation is in progress."""
        if self.busy is not None:
            if busy is not None:
                return busy()
            return api_error(
                409,
                "STATE_CONFLICT",
                "Another credit operation is already in progress for this API key",
                trace,
            )
        pending = _Pending(self, work, headers)
        self.busy = pending
        self.started.notify_all()
        return pending

    def pay(self, cost: int, trace: str) -> _Answer | None:
        """Debit ``cost``, or the ``402`` to answer when the account cannot pay it."""
        refused = self.refusal(cost, trace)
        if refused is None:
            self.fake._credits.spend(cost)
            self.fake.charges += 1
        return refused

    def refusal(self, cost: int, trace: str) -> _Answer | None:
        """The ``402`` to answer when the account cannot pay ``cost`` (else ``None``)."""
        credits = self.fake._credits
        if cost > credits.total:
            return api_error(
                402,
                "INSUFFICIENT_CREDITS",
                "Insufficient credits",
                trace,
                details={"requiredCredits": cost, "availableCredits": credits.total},
            )
        return None

    # -- exhibitor searches --------------------------------------------------------

    def _found_events(self, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        name = _string(data, "company_name", 200)
        assert name is not None
        starred = data.get("sponsor_match_starred")
        if "sponsor_match_starred" in data and (type(starred) is not int or starred not in (0, 1)):
            raise _BadRequest("sponsor_match_starred must be 0 or 1")
        scope = data.get("attendance_scope", "all")
        if scope not in _ATTENDANCE:
            raise _BadRequest("attendance_scope must be one of all, exhibitor, visitor")
        page, size = _page(data)
        company = self.company(name)
        items: list[dict[str, Any]] = []
        for i in range(1, 1 + (0 if company is None else company.events)):
            items.append(
                {
                    "id": f"{9000 + i}",
                    "eventId": f"{9000 + i}",
                    "name": f"{name} event {i}",
                    "dataSource": "Lensmor",
                    "sponsorMatchStarred": 0 if starred is None else starred,
                    "matchedExhibitors": [{"id": "5001", "companyName": name}],
                    "attendance_identity": ["exhibitor"],
                }
            )
        return name, _paged(items if scope != "visitor" else [], page, size)

    def _found_exhibitors(self, data: dict[str, Any]) -> dict[str, Any]:
        name = _string(data, "company_name", 200)
        assert name is not None
        page, size = _page(data)
        company = self.company(name)
        items = [
            {"id": f"{5000 + i}", "companyName": name, "matched_event_ids": ["9001"]}
            for i in range(1, 1 + (0 if company is None else company.exhibitors))
        ]
        return _paged(items, page, size)

    def _search_events(
        self, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        _, page = self._found_events(data)

        def busy() -> _Answer:
            return _json(
                200,
                {
                    "code": 429,
                    "message": "Too many concurrent requests for this endpoint",
                    "errorKey": "USER_CONCURRENCY_LIMIT_EXCEEDED",
                    "data": None,
                    "details": None,
                    "traceId": trace,
                },
                {"x-request-id": trace},
            )

        return self._search(page, trace, headers, busy)

    def _search_exhibitors(
        self, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        return self._search(self._found_exhibitors(data), trace, headers, None)

    def _search(
        self,
        page: dict[str, Any],
        trace: str,
        headers: dict[str, str],
        busy: Callable[[], _Answer] | None,
    ) -> _Answer | _Pending:
        if not page["items"]:
            return _json(201, page)  # an empty result is free

        def work() -> _Answer:
            return self.pay(SEARCH_COST, trace) or _json(201, page)

        return self.begin(work, trace, headers, busy=busy)

    # -- precheck ------------------------------------------------------------------

    def _precheck(self, data: dict[str, Any], trace: str, headers: dict[str, str]) -> _Answer:
        for name in data:
            if name not in _PRECHECK_STRINGS and name != "params":
                raise _BadRequest(f"unknown property {name[:40]!r}")
        for name, most in _PRECHECK_STRINGS.items():
            _string(data, name, most, required=name == "action_type")
        params = data.get("params")
        if not isinstance(params, dict):
            raise _BadRequest("params must be an object")
        action = str(data["action_type"])
        checks: dict[str, Checker] = {
            **self.event_desk.prechecks(),
            **self.contact_desk.prechecks(),
            "search_exhibitor_events": self._precheck_search,
        }
        check = checks.get(action)
        detail: dict[str, Any]
        if check is None:
            reason, credits, detail = "unsupported_action", 0, {}
        else:
            reason, credits, detail = check(params)
        if reason == "ok" and credits > self.fake._credits.total:
            reason = "insufficient_balance"
        elif reason == "ok" and credits and self.busy is not None:
            reason = "state_conflict"
        allowed = reason in ("ok", "already_unlocked")
        return _json(
            200,
            {
                "ok": True,
                "action_type": action,
                "allowed": allowed,
                "should_charge": credits > 0,
                "credits": credits,
                "biz_code": "" if allowed else reason.upper(),
                "reason_code": reason,
                "detail": detail,
            },
        )

    def _precheck_search(self, params: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
        try:
            name, page = self._found_events(params)
        except _BadRequest:
            return "invalid_subject", 0, {}
        detail = {"company_name": name, "result_count": len(page["items"])}
        return "ok", SEARCH_COST if page["items"] else 0, detail
