"""The sandbox's contact unlocks, asynchronous tasks with their published shapes and costs.

* ``POST /external/contacts/unlock``: emails, 15 credits per chargeable contact;
  ``GET /external/contacts/unlock-tasks/{taskId}`` reports the task.
* ``POST /external/contacts/unlock-phone``: phone numbers, 150 credits per chargeable
  contact; ``GET /external/contacts/unlock-phone-tasks/{taskId}`` reports the task.

Both take ``{personnel_ids, event_id?}``: duplicates are removed first, and contacts
already unlocked, being unlocked, missing or invalid (not a digit string) are skipped for
free; a batch with nothing chargeable answers ``status: "success"`` and no task. The whole
chargeable batch is debited when the task is accepted (the submission; a ``402`` then
checks the whole batch), and failed items are not refunded. A task completes on its
``task_polls``-th poll (with ``task_debit="delivery"``, the batch is checked at submission
and each delivered contact debited then, or failed with ``INSUFFICIENT_CREDITS`` when the
credits went meanwhile). The answers carry no credit figures.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from creditguard.testing._paid import Sandbox, _Pending, _Route
from creditguard.testing._wire import (
    Check,
    Checker,
    _Answer,
    _BadRequest,
    _json,
    _string,
    api_error,
)

__all__ = [
    "CONTACT_EMAIL_COST",
    "CONTACT_PHONE_COST",
    "EMAIL",
    "MAX_PERSONNEL",
    "PHONE",
    "_Contact",
    "_ContactDesk",
]

CONTACT_EMAIL_COST = 15
CONTACT_PHONE_COST = 150
MAX_PERSONNEL = 2000
DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class _Kind:
    """One of the contact unlocks: what it delivers (the item's field), its price per
    contact, its paths, and an item's ``errorCode`` when nothing was found."""

    name: str
    cost: int
    submit_path: str
    task_path: re.Pattern[str]
    not_found: str


EMAIL = _Kind(
    "email",
    CONTACT_EMAIL_COST,
    "/external/contacts/unlock",
    re.compile(r"/external/contacts/unlock-tasks/([^/]*)"),
    "EMAIL_NOT_FOUND",
)
PHONE = _Kind(
    "phone",
    CONTACT_PHONE_COST,
    "/external/contacts/unlock-phone",
    re.compile(r"/external/contacts/unlock-phone-tasks/([^/]*)"),
    "PHONE_NOT_FOUND",
)
KINDS = (EMAIL, PHONE)


def _locked() -> dict[str, str]:
    return {kind.name: "locked" for kind in KINDS}


@dataclass
class _Contact:
    """A contact: what each unlock delivers (``None``: it finds nothing) and, per unlock,
    its state: ``locked``, ``unlocking`` or ``unlocked``."""

    personnel_id: str
    email: str | None
    phone: str | None
    states: dict[str, str] = field(default_factory=_locked)

    @classmethod
    def sample(cls, personnel_id: str) -> _Contact:
        """A contact of the open catalogue: both unlocks find something."""
        return cls(
            personnel_id, f"contact-{personnel_id}@example.test", f"+1-555-0100 x{personnel_id}"
        )

    def delivers(self, kind: _Kind) -> str | None:
        return self.email if kind is EMAIL else self.phone


@dataclass
class _Task:
    task_id: str
    kind: _Kind
    personnel_ids: list[str]
    polls: int = 0
    status: str = "pending"
    items: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Sorted:
    """A contact batch, duplicates removed, sorted by what it would cost."""

    kind: _Kind
    chargeable: list[str]
    skipped: list[str]
    detail: dict[str, list[str]]

    @property
    def cost(self) -> int:
        return self.kind.cost * len(self.chargeable)


def _personnel_ids(value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _BadRequest("personnel_ids must be a non-empty array of strings")
    if not all(isinstance(item, str) for item in value):
        raise _BadRequest("personnel_ids must be a non-empty array of strings")
    return value


class _ContactApi(Protocol):
    """What the contact unlocks use of the paid endpoints (:class:`~._lensmor._PaidApi`)."""

    @property
    def fake(self) -> Sandbox: ...

    @property
    def contacts(self) -> dict[str, _Contact]: ...

    @property
    def task_debit(self) -> str: ...

    @property
    def task_polls(self) -> int: ...

    def contact(self, personnel_id: str, *, keep: bool) -> _Contact | None: ...

    def event(self, event_id: str, *, keep: bool) -> object: ...

    def task_id(self) -> str: ...

    def refusal(self, cost: int, trace: str) -> _Answer | None: ...

    def begin(
        self,
        work: Callable[[], _Answer],
        trace: str,
        headers: dict[str, str],
        *,
        busy: Callable[[], _Answer] | None = None,
    ) -> _Answer | _Pending: ...

    def pay(self, cost: int, trace: str) -> _Answer | None: ...


class _ContactDesk:
    """The contact unlocks of one sandbox and their tasks; everything runs under the
    fake's lock."""

    def __init__(self, api: _ContactApi) -> None:
        self.api = api
        self.tasks: dict[str, _Task] = {}

    def route(self, method: str, path: str) -> _Route | None:
        for kind in KINDS:
            if method == "POST" and path == kind.submit_path:
                return _Route(functools.partial(self._unlock, kind))
            match = kind.task_path.fullmatch(path)
            if method == "GET" and match:
                return _Route(functools.partial(self._task, kind, match.group(1)), body=False)
        return None

    def prechecks(self) -> dict[str, Checker]:
        """The precheck's action types these unlocks answer, and their checks."""
        return {
            "unlock_contact_emails": functools.partial(self._precheck, EMAIL),
            "unlock_contact_phones": functools.partial(self._precheck, PHONE),
        }

    def unlocked(self, kind: _Kind) -> dict[str, str | None]:
        """The contacts whose ``kind`` unlock completed, with what it delivered."""
        return {
            c.personnel_id: c.delivers(kind)
            for c in self.api.contacts.values()
            if c.states[kind.name] == "unlocked"
        }

    # -- submission ----------------------------------------------------------------

    def _sort(self, kind: _Kind, ids: list[str]) -> _Sorted:
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
            contact = self.api.contact(personnel_id, keep=False)
            if not DIGITS.fullmatch(personnel_id):
                reason = "invalid_personnel_ids"
            elif contact is None:
                reason = "missing_personnel_ids"
            elif contact.states[kind.name] == "unlocked":
                reason = "already_unlocked_personnel_ids"
            elif contact.states[kind.name] == "unlocking":
                reason = "unlocking_personnel_ids"
            else:
                chargeable.append(personnel_id)
                continue
            detail[reason].append(personnel_id)
            skipped.append(personnel_id)
        return _Sorted(kind, chargeable, skipped, detail)

    def _unlock(
        self, kind: _Kind, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        ids = _personnel_ids(data.get("personnel_ids"))
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
        if event_id is not None and self.api.event(event_id, keep=False) is None:
            return api_error(404, "NOT_FOUND", f"Event {event_id} not found", trace)
        batch = self._sort(kind, ids)
        skipped = {"skipped_personnel_ids": batch.skipped, "skipped_detail": batch.detail}
        if not batch.chargeable:
            return _json(201, {"status": "success", **skipped})

        def work() -> _Answer:
            if self.api.task_debit == "submission":
                refused = self.api.pay(batch.cost, trace)
            else:  # checked now, debited per contact delivered
                refused = self.api.refusal(batch.cost, trace)
            if refused is not None:
                return refused
            task = _Task(self.api.task_id(), kind, batch.chargeable)
            for personnel_id in task.personnel_ids:
                contact = self.api.contact(personnel_id, keep=True)
                assert contact is not None
                contact.states[kind.name] = "unlocking"
            self.tasks[task.task_id] = task
            return _json(
                201,
                {"status": "accepted", "task_id": task.task_id, "job_id": task.task_id, **skipped},
            )

        return self.api.begin(work, trace, headers)

    # -- tasks ---------------------------------------------------------------------

    def _task(
        self, kind: _Kind, task_id: str, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer:
        task = self.tasks.get(task_id)
        if task is None or task.kind is not kind:
            return api_error(404, "NOT_FOUND", f"Task {task_id} not found", trace)
        if task.status not in ("completed", "failed"):
            task.polls += 1
            if task.polls >= self.api.task_polls:
                self._complete(task)
            else:
                task.status = "pending" if task.polls == 1 else "processing"
                task.items = [
                    {"personnelId": pid, "status": task.status, kind.name: None}
                    for pid in task.personnel_ids
                ]
        return _json(200, {"taskId": task.task_id, "taskStatus": task.status, "items": task.items})

    def _complete(self, task: _Task) -> None:
        kind = task.kind
        task.status = "completed"
        task.items = []
        for personnel_id in task.personnel_ids:
            contact = self.api.contacts[personnel_id]
            found = contact.delivers(kind)
            unpaid = (
                found is not None
                and self.api.task_debit == "delivery"
                and kind.cost > self.api.fake._credits.total
            )
            if unpaid:  # the credits went meanwhile: the contact is not delivered
                contact.states[kind.name] = "locked"
                task.items.append(
                    {
                        "personnelId": personnel_id,
                        "status": "failed",
                        kind.name: None,
                        "errorCode": "INSUFFICIENT_CREDITS",
                    }
                )
            elif found is None:
                contact.states[kind.name] = "locked"
                task.items.append(
                    {
                        "personnelId": personnel_id,
                        "status": "failed",
                        kind.name: None,
                        "errorCode": kind.not_found,
                    }
                )
            else:
                contact.states[kind.name] = "unlocked"
                task.items.append(
                    {"personnelId": personnel_id, "status": "unlocked", kind.name: found}
                )
                if self.api.task_debit == "delivery":
                    self.api.pay(kind.cost, "")

    # -- precheck ------------------------------------------------------------------

    def _precheck(self, kind: _Kind, params: dict[str, Any]) -> Check:
        try:
            ids = _personnel_ids(params.get("personnel_ids"))
        except _BadRequest:
            return "invalid_subject", 0, {}
        batch = self._sort(kind, ids)
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
