"""The paid Lensmor endpoints of the sandbox, with their published shapes and costs.

* ``POST /external/events/{id}/unlock``: 2000 credits; free when already unlocked; 400 when
  the event has no contacts to unlock.
* ``POST /external/contacts/unlock``: 15 credits per chargeable contact, debited when the
  task is accepted (the submission); ``GET /external/contacts/unlock-tasks/{taskId}``
  reports the task, which completes on its ``task_polls``-th poll.
* ``POST /external/exhibitors/search-events`` and ``.../search-by-company-name``: 50
  credits for a non-empty page, 0 for an empty one.
* ``POST /external/actions/precheck``: what a call would cost and whether it may run; never
  charges.

A call that will charge holds the key's credit operation for the sandbox's ``latency`` (and
while paid calls are held, see :meth:`FakeLensmor.hold_paid_calls`); another call that would
charge meanwhile gets ``409 STATE_CONFLICT`` (exhibitor event search: the published ``200``
``USER_CONCURRENCY_LIMIT_EXCEEDED`` envelope). Errors are Lensmor's ``ApiError`` bodies.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._wire import _Answer, _json, api_error

if TYPE_CHECKING:
    from ._fake import FakeLensmor

EVENT_UNLOCK_COST = 2000
CONTACT_EMAIL_COST = 15
SEARCH_COST = 50
MAX_PERSONNEL = 2000
MAX_BODY = 1 << 20
HOLD_CAP = 60.0  # seconds a held paid call waits at most, should a test never release it

PRECHECK_PATH = "/external/actions/precheck"
CONTACTS_UNLOCK_PATH = "/external/contacts/unlock"
SEARCH_EVENTS_PATH = "/external/exhibitors/search-events"
SEARCH_COMPANY_PATH = "/external/exhibitors/search-by-company-name"
_EVENT_UNLOCK = re.compile(r"/external/events/([^/]*)/unlock")
_TASK = re.compile(r"/external/contacts/unlock-tasks/([^/]*)")
_DIGITS = re.compile(r"[0-9]+")
_ATTENDANCE = ("all", "exhibitor", "visitor")
_PRECHECK_STRINGS = {
    "action_type": 100,
    "call_source": 100,
    "locale": 20,
    "trace_id": 200,
    "conversation_id": 200,
    "channel_message_id": 200,
}


class _BadRequest(Exception):
    """The request is not what the endpoint takes: ``400 INVALID_REQUEST``."""


@dataclass
class _Event:
    event_id: str
    name: str | None
    contacts: bool = True
    unlocked: bool = False

    def identity(self) -> dict[str, Any]:
        return {"id": self.event_id, "eventId": self.event_id, "name": self.name}


@dataclass
class _Contact:
    personnel_id: str
    email: str | None
    state: str = "locked"  # locked, unlocking, unlocked


@dataclass
class _Company:
    name: str
    events: int = 1
    exhibitors: int = 1


@dataclass
class _Task:
    task_id: str
    personnel_ids: list[str]
    polls: int = 0
    status: str = "pending"
    items: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Sorted:
    """A contact batch, duplicates removed, sorted by what it would cost."""

    chargeable: list[str]
    skipped: list[str]
    detail: dict[str, list[str]]

    @property
    def cost(self) -> int:
        return CONTACT_EMAIL_COST * len(self.chargeable)


def _string(data: dict[str, Any], name: str, most: int, *, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None and name not in data and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= most:
        raise _BadRequest(f"{name} must be a string of 1 to {most} characters")
    return value


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


class _Pending:
    """A paid call that will charge: it holds the key's credit operation until it is
    finished (charged and answered) or abandoned (its caller went away: nothing charged)."""

    def __init__(self, api: _PaidApi, work: Callable[[], _Answer], headers: dict[str, str]):
        self._api = api
        self._work = work
        self._headers = headers
        self._gate = api.gate
        self._done = False

    def wait(self) -> None:
        latency = self._api.fake.latency
        if latency:
            time.sleep(latency)
        if self._gate is not None:
            self._gate.wait(HOLD_CAP)

    async def await_(self) -> None:
        latency = self._api.fake.latency
        if latency:
            await anyio.sleep(latency)
        gate = self._gate
        if gate is not None and not gate.is_set():
            await anyio.to_thread.run_sync(gate.wait, HOLD_CAP, abandon_on_cancel=True)

    def finish(self) -> _Answer:
        with self._api.fake._lock:
            try:
                answer = self._work()
            finally:
                self._release()
        answer.headers.update(self._headers)
        return answer

    def close(self) -> None:
        if not self._done:
            with self._api.fake._lock:
                self._release()

    def _release(self) -> None:
        self._done = True
        if self._api.busy is self:
            self._api.busy = None


class _PaidApi:
    """The paid endpoints' state (catalogue, tasks, the credit operation in progress) and
    their answers. Everything runs under the fake's lock."""

    def __init__(self, fake: FakeLensmor, *, task_polls: int, open_catalogue: bool) -> None:
        if type(task_polls) is not int or task_polls < 1:
            raise ValueError(f"task_polls must be an int >= 1, got {task_polls!r}")
        self.fake = fake
        self.task_polls = task_polls
        self.open_catalogue = open_catalogue
        self.events: dict[str, _Event] = {}
        self.contacts: dict[str, _Contact] = {}
        self.companies: dict[str, _Company] = {}
        self.tasks: dict[str, _Task] = {}
        self.busy: _Pending | None = None
        self.gate: threading.Event | None = None
        self.started = threading.Condition(fake._lock)
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
        if found is None and self.open_catalogue and _DIGITS.fullmatch(personnel_id):
            found = _Contact(personnel_id, f"contact-{personnel_id}@example.test")
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
            if method == "POST" and not _EVENT_UNLOCK.fullmatch(path):
                data = self._body(body)  # an event unlock takes no body
            result = route(data, trace, headers)
        except _BadRequest as exc:
            return api_error(400, "INVALID_REQUEST", str(exc), trace, headers=headers)
        if isinstance(result, _Answer):
            result.headers.update(headers)
        return result

    def _route(
        self, method: str, path: str
    ) -> Callable[[dict[str, Any], str, dict[str, str]], _Answer | _Pending] | None:
        routes: dict[str, Callable[[dict[str, Any], str, dict[str, str]], _Answer | _Pending]]
        routes = {
            PRECHECK_PATH: self._precheck,
            CONTACTS_UNLOCK_PATH: self._unlock_contacts,
            SEARCH_EVENTS_PATH: self._search_events,
            SEARCH_COMPANY_PATH: self._search_exhibitors,
        }
        if method == "POST" and path in routes:
            return routes[path]
        match = _EVENT_UNLOCK.fullmatch(path)
        if method == "POST" and match:
            event_id = match.group(1)
            return lambda data, trace, headers: self._unlock_event(event_id, trace, headers)
        match = _TASK.fullmatch(path)
        if method == "GET" and match:
            task_id = match.group(1)
            return lambda data, trace, headers: self._task(task_id, trace)
        return None

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

    def _begin(
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

    def _pay(self, cost: int, trace: str) -> _Answer | None:
        """Debit ``cost``, or the ``402`` to answer when the account cannot pay it."""
        credits = self.fake._credits
        if cost > credits.total:
            return api_error(
                402,
                "INSUFFICIENT_CREDITS",
                "Insufficient credits",
                trace,
                details={"requiredCredits": cost, "availableCredits": credits.total},
            )
        credits.spend(cost)
        self.fake.charges += 1
        return None

    # -- event unlock --------------------------------------------------------------

    def _unlock_event(
        self, event_id: str, trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        if not 1 <= len(event_id) <= 100:
            raise _BadRequest("the event id must have 1 to 100 characters")
        event = self.event(event_id, keep=True)
        if event is None:
            return api_error(404, "NOT_FOUND", f"Event {event_id} not found", trace)
        if event.unlocked:
            return self._event_result(event, 0)
        if not event.contacts:
            raise _BadRequest(f"Event {event_id} has no contacts to unlock")

        def work() -> _Answer:
            refused = self._pay(EVENT_UNLOCK_COST, trace)
            if refused is not None:
                return refused
            event.unlocked = True
            return self._event_result(event, EVENT_UNLOCK_COST)

        return self._begin(work, trace, headers)

    def _event_result(self, event: _Event, used: int) -> _Answer:
        fake = self.fake
        after = None if not used else fake._credits.balance_after(fake.balance_shape, fake.floats)
        return _json(
            201,
            {
                "success": True,
                "alreadyUnlocked": not used,
                "creditsUsed": float(used) if fake.floats else used,
                "balanceAfter": after,
                "event": event.identity(),
            },
        )

    # -- contact email unlock ------------------------------------------------------

    def _sort(self, ids: list[str]) -> _Sorted:
        detail: dict[str, list[str]] = {
            "invalid_personnel_ids": [],
            "missing_personnel_ids": [],
            "unlinked_personnel_ids": [],
            "already_unlocked_personnel_ids": [],
            "unlocking_personnel_ids": [],
        }
        chargeable: list[str] = []
        skipped: list[str] = []
        for personnel_id in dict.fromkeys(ids):
            contact = self.contact(personnel_id, keep=False)
            if not _DIGITS.fullmatch(personnel_id):
                reason = "invalid_personnel_ids"
            elif contact is None:
                reason = "missing_personnel_ids"
            elif contact.state == "unlocked":
                reason = "already_unlocked_personnel_ids"
            elif contact.state == "unlocking":
                reason = "unlocking_personnel_ids"
            else:
                chargeable.append(personnel_id)
                continue
            detail[reason].append(personnel_id)
            skipped.append(personnel_id)
        return _Sorted(chargeable, skipped, detail)

    @staticmethod
    def _personnel_ids(value: object) -> list[str]:
        if not isinstance(value, list) or not value:
            raise _BadRequest("personnel_ids must be a non-empty array of strings")
        if not all(isinstance(item, str) for item in value):
            raise _BadRequest("personnel_ids must be a non-empty array of strings")
        return value

    def _unlock_contacts(
        self, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        ids = self._personnel_ids(data.get("personnel_ids"))
        event_id = _string(data, "event_id", 100, required=False)
        if len(ids) > MAX_PERSONNEL:
            return api_error(
                422,
                "LEAD_SELECTION_LIMIT_EXCEEDED",
                f"Selected leads limit exceeded: requested {len(ids)}, limit {MAX_PERSONNEL}",
                trace,
                details={
                    "requestedCount": len(ids),
                    "limit": MAX_PERSONNEL,
                    "selectionMode": "selected",
                },
            )
        if event_id is not None and self.event(event_id, keep=False) is None:
            return api_error(404, "NOT_FOUND", f"Event {event_id} not found", trace)
        batch = self._sort(ids)
        skipped = {"skipped_personnel_ids": batch.skipped, "skipped_detail": batch.detail}
        if not batch.chargeable:
            return _json(201, {"status": "success", **skipped})

        def work() -> _Answer:
            refused = self._pay(batch.cost, trace)
            if refused is not None:
                return refused
            task = _Task(str(next(self._task_ids)), batch.chargeable)
            for personnel_id in task.personnel_ids:
                contact = self.contact(personnel_id, keep=True)
                assert contact is not None
                contact.state = "unlocking"
            self.tasks[task.task_id] = task
            return _json(
                201,
                {"status": "accepted", "task_id": task.task_id, "job_id": task.task_id, **skipped},
            )

        return self._begin(work, trace, headers)

    def _task(self, task_id: str, trace: str) -> _Answer:
        task = self.tasks.get(task_id)
        if task is None:
            return api_error(404, "NOT_FOUND", f"Task {task_id} not found", trace)
        if task.status not in ("completed", "failed"):
            task.polls += 1
            if task.polls >= self.task_polls:
                self._complete(task)
            else:
                task.status = "pending" if task.polls == 1 else "processing"
                task.items = [
                    {"personnelId": pid, "status": task.status, "email": None}
                    for pid in task.personnel_ids
                ]
        return _json(200, {"taskId": task.task_id, "taskStatus": task.status, "items": task.items})

    def _complete(self, task: _Task) -> None:
        task.status = "completed"
        task.items = []
        for personnel_id in task.personnel_ids:
            contact = self.contacts[personnel_id]
            if contact.email is None:
                contact.state = "locked"
                task.items.append(
                    {
                        "personnelId": personnel_id,
                        "status": "failed",
                        "email": None,
                        "errorCode": "EMAIL_NOT_FOUND",
                    }
                )
            else:
                contact.state = "unlocked"
                task.items.append(
                    {"personnelId": personnel_id, "status": "unlocked", "email": contact.email}
                )

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
            return self._pay(SEARCH_COST, trace) or _json(201, page)

        return self._begin(work, trace, headers, busy=busy)

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
        checks = {
            "unlock_event_contacts": self._precheck_event,
            "unlock_contact_emails": self._precheck_contacts,
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

    def _precheck_event(self, params: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
        event_id = params.get("event_id")
        if not isinstance(event_id, str) or not 1 <= len(event_id) <= 100:
            return "invalid_subject", 0, {}
        detail: dict[str, Any] = {"event_id": event_id, "unlock_credits": EVENT_UNLOCK_COST}
        event = self.event(event_id, keep=False)
        if event is None:
            return "not_found", 0, detail
        if event.unlocked:
            return "already_unlocked", 0, detail
        if not event.contacts:
            return "no_contacts_available", 0, detail
        return "ok", EVENT_UNLOCK_COST, detail

    def _precheck_contacts(self, params: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
        try:
            ids = self._personnel_ids(params.get("personnel_ids"))
        except _BadRequest:
            return "invalid_subject", 0, {}
        batch = self._sort(ids)
        detail = {
            "personnel_ids": batch.chargeable,
            "requested_count": len(ids),
            "chargeable_count": len(batch.chargeable),
            "already_unlocked_count": len(batch.detail["already_unlocked_personnel_ids"]),
            "unlocking_count": len(batch.detail["unlocking_personnel_ids"]),
        }
        if len(ids) > MAX_PERSONNEL:
            return "exceed_max_unlock_limit", 0, detail
        if batch.chargeable:
            return "ok", batch.cost, detail
        if detail["unlocking_count"]:
            return "unlock_in_progress", 0, detail
        if detail["already_unlocked_count"]:
            return "already_unlocked", 0, detail
        return "no_contacts_available", 0, detail

    def _precheck_search(self, params: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
        try:
            name, page = self._found_events(params)
        except _BadRequest:
            return "invalid_subject", 0, {}
        detail = {"company_name": name, "result_count": len(page["items"])}
        return "ok", SEARCH_COST if page["items"] else 0, detail
