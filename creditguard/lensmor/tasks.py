"""Lensmor's contact unlocks, which are tasks: hold the chargeable contacts' credits,
submit, poll the task with the published back-off, settle the hold when the task ends.

``unlock_contacts`` does it all in one call; ``submit_contact_unlock`` and
``poll_unlock_task`` split it between a web process and a worker (the hold is ended by id,
so with a shared backend any process can finish what another started). Each has an async
twin; the logic is written once, as a generator of steps the guard's drivers run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeGuard, cast

import httpx

from creditguard.core import flows, holds
from creditguard.core.balance import _MAX_COUNT, CreditBalance
from creditguard.core.calls import Guarded, Held
from creditguard.core.checks import _check_seconds
from creditguard.core.drive import adrive, drive
from creditguard.core.engine import Engine
from creditguard.core.errors import (
    AuthenticationError,
    BalanceUnavailable,
    InvalidResponse,
    TaskPending,
    UnknownHold,
)
from creditguard.core.steps import Steps, pause
from creditguard.guard.guard import CreditGuard, engine_of
from creditguard.guard.spend import acost_of, cost_of
from creditguard.lensmor.precheck import Precheck
from creditguard.lensmor.reader import _loads
from creditguard.lensmor.retry import parse_retry_after
from creditguard.lensmor.upstream import lensmor_of

__all__ = [
    "POLL_BACKOFF",
    "ContactUnlock",
    "apoll_unlock_task",
    "asubmit_contact_unlock",
    "aunlock_contacts",
    "poll_unlock_task",
    "submit_contact_unlock",
    "unlock_contacts",
]

logger = logging.getLogger("creditguard")
_monotonic = time.monotonic

POLL_BACKOFF: tuple[float, ...] = (3.0, 5.0, 10.0, 20.0)
"""Lensmor's suggested waits between polls of a task (seconds); the last one repeats."""

_MAX_CONTACTS = 1000
_MAX_TASK_ID = 200  # longest task id taken from an answer or a caller


@dataclasses.dataclass(frozen=True)
class _Kind:
    submit: str
    task: str
    cost: int
    action_type: str
    field: str


_EMAIL = _Kind(
    "/external/contacts/unlock",
    "/external/contacts/unlock-tasks/",
    15,
    "unlock_contact_emails",
    "email",
)
_PHONE = _Kind(
    "/external/contacts/unlock-phone",
    "/external/contacts/unlock-phone-tasks/",
    150,
    "unlock_contact_phones",
    "phone",
)


@dataclasses.dataclass(frozen=True)
class ContactUnlock:
    """Where a contact unlock stands.

    ``status`` is ``"accepted"`` (submitted; the task runs and ``hold_id`` holds its
    credits), ``"completed"`` or ``"failed"`` (the task ended; its hold was settled and
    ``balance_after`` read after it), or ``"success"`` (nothing was chargeable, so no task:
    see ``skipped``). ``items`` are the task's items as Lensmor reports them;
    :attr:`delivered` maps each unlocked contact to its email (or phone number).
    """

    status: str
    task_id: str | None
    hold_id: str | None = None
    phone: bool = False
    skipped: tuple[str, ...] = ()
    items: tuple[Mapping[str, Any], ...] = ()
    balance_after: CreditBalance | None = None

    @property
    def delivered(self) -> dict[str, str]:
        """The contacts delivered: personnel id to email (phone number for phones)."""
        field = "phone" if self.phone else "email"
        found: dict[str, str] = {}
        for item in self.items:
            value = item.get(field)
            if item.get("status") == "unlocked" and isinstance(value, str) and value:
                found[str(item.get("personnelId"))] = value
        return found


def _ids(personnel_ids: Sequence[str]) -> list[str]:
    if isinstance(personnel_ids, str) or not isinstance(personnel_ids, Sequence):
        raise TypeError("personnel_ids must be a sequence of str")
    unique: list[str] = []
    seen: set[str] = set()
    for pid in personnel_ids:
        if not isinstance(pid, str) or not pid:
            raise TypeError("personnel_ids must be non-empty strings")
        if pid not in seen:
            seen.add(pid)
            unique.append(pid)
    if not unique or len(unique) > _MAX_CONTACTS:
        raise ValueError(f"personnel_ids must name 1 to {_MAX_CONTACTS} contacts")
    return unique


def _cost(kind: _Kind, ids: list[str], event_id: str | None) -> Precheck:
    """What to hold: the precheck's answer (already-unlocked contacts are free), or the
    worst case while the cached balance covers it (no precheck then)."""
    params: dict[str, Any] = {"personnel_ids": ids}
    if event_id is not None:
        params["event_id"] = event_id
    return Precheck(kind.action_type, params, at_most=kind.cost * len(ids))


def _body(ids: list[str], event_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"personnel_ids": ids}
    if event_id is not None:
        body["event_id"] = event_id
    return body


def _status_error(response: httpx.Response, body: bytes) -> httpx.HTTPStatusError:
    """The answer as the ``httpx.HTTPStatusError`` ``raise_for_status()`` would raise (its
    body kept, so a ``402`` is recognised; its request carries no key)."""
    request = httpx.Request(response.request.method, response.request.url)
    answer = httpx.Response(
        response.status_code, headers=response.headers, content=body, request=request
    )
    return httpx.HTTPStatusError(
        f"Lensmor answered {response.status_code} at {request.url.path}",
        request=request,
        response=answer,
    )


def _json(body: bytes, what: str, task_id: str | None, hold_id: str | None) -> Mapping[str, Any]:
    try:
        data = _loads(body)
    except (ValueError, RecursionError):
        raise _invalid(f"the {what} answer is not valid JSON", task_id, hold_id) from None
    if not isinstance(data, Mapping):
        raise _invalid(f"the {what} answer is not a JSON object", task_id, hold_id)
    return cast(Mapping[str, Any], data)


def _invalid(message: str, task_id: str | None, hold_id: str | None) -> InvalidResponse:
    """A malformed answer about a task: the hold stays open, so the exception says which
    task and which hold (the caller can poll again, or settle or release the hold)."""
    if task_id is not None:
        message += f" (task {task_id}"
        message += ")" if hold_id is None else f", hold {hold_id})"
    elif hold_id is not None:
        message += f" (hold {hold_id})"
    return InvalidResponse(message, task_id=task_id, hold_id=hold_id)


def _said(value: object) -> str:
    """What the service sent, for an error message: a type, or a short text."""
    if isinstance(value, str):
        return repr(value[:40])
    return type(value).__name__


def _is_task_id(value: object) -> TypeGuard[str]:
    """A task id: a printable string (it reaches messages and log lines) of 1 to 200
    characters."""
    return isinstance(value, str) and 0 < len(value) <= _MAX_TASK_ID and value.isprintable()


def _personnel_id(value: object) -> str | None:
    """A contact's id as Lensmor sends it (a string, or a whole number from 0 to
    2**53 - 1), as a str; ``None`` for anything else."""
    if isinstance(value, str) and value:
        return value
    if type(value) is int and 0 <= value <= _MAX_COUNT:
        return str(value)
    return None


def _submitted(answer: Mapping[str, Any], hold_id: str) -> tuple[str | None, tuple[str, ...]]:
    """The submission's task id (``None``: nothing chargeable, no task) and the contacts
    it skipped; :class:`InvalidResponse` for an answer of the wrong shape."""
    status = answer.get("status")
    raw_task = answer.get("task_id")
    task_id = raw_task if _is_task_id(raw_task) else None
    if not isinstance(status, str):
        raise _invalid(
            f"the unlock answer's 'status' must be a string, got {_said(status)}", task_id, hold_id
        )
    raw_skipped = answer.get("skipped_personnel_ids")
    if raw_skipped is None:
        raw_skipped = []
    if not isinstance(raw_skipped, list):
        raise _invalid(
            f"the unlock answer's 'skipped_personnel_ids' must be a list, got {_said(raw_skipped)}",
            task_id,
            hold_id,
        )
    skipped: list[str] = []
    for value in raw_skipped:
        pid = _personnel_id(value)
        if pid is None:
            raise _invalid(
                f"the unlock answer skips a contact id of the wrong type: {_said(value)}",
                task_id,
                hold_id,
            )
        skipped.append(pid)
    if status == "accepted":
        if task_id is None:
            raise _invalid(
                f"an accepted unlock's 'task_id' must be a non-empty string, got {_said(raw_task)}",
                None,
                hold_id,
            )
        return task_id, tuple(skipped)
    if status == "success":  # nothing chargeable: no task
        return None, tuple(skipped)
    raise _invalid(f"unknown unlock status {_said(status)}", task_id, hold_id)


def _ended(
    answer: Mapping[str, Any], field: str, task_id: str, hold_id: str | None
) -> tuple[str | None, tuple[Mapping[str, Any], ...]]:
    """The task's status when it ended (``completed`` or ``failed``; ``None``: still
    running) and its items; :class:`InvalidResponse` for an answer of the wrong shape."""
    status = answer.get("taskStatus")
    if not isinstance(status, str):
        raise _invalid(
            f"the task answer's 'taskStatus' must be a string, got {_said(status)}",
            task_id,
            hold_id,
        )
    if status not in ("completed", "failed"):
        return None, ()
    raw_items = answer.get("items")
    if raw_items is None:
        raw_items = []
    if not isinstance(raw_items, list):
        raise _invalid(
            f"the task answer's 'items' must be a list, got {_said(raw_items)}", task_id, hold_id
        )
    items: list[Mapping[str, Any]] = []
    for item in raw_items:
        problem = _item_problem(item, field)
        if problem is not None:
            raise _invalid(f"a task item {problem}", task_id, hold_id)
        items.append(dict(item))
    return status, tuple(items)


def _item_problem(item: object, field: str) -> str | None:
    """What is wrong with one task item (``None``: nothing)."""
    if not isinstance(item, Mapping):
        return f"must be an object, got {_said(item)}"
    if _personnel_id(item.get("personnelId")) is None:
        return f"lacks its 'personnelId', got {_said(item.get('personnelId'))}"
    if not isinstance(item.get("status"), str):
        return f"lacks its string 'status', got {_said(item.get('status'))}"
    for name in (field, "errorCode"):
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            return f"'{name}' must be a string or null, got {_said(value)}"
    return None


def _submit(
    engine: Engine,
    kind: _Kind,
    ids: list[str],
    event_id: str | None,
    cost: int,
    expires_in: float,
    sync: bool,
) -> Steps[ContactUnlock]:
    kept, turn = yield from holds.take(engine, Guarded(engine, cost), expires_in, sync)
    hold = Held(engine, kept, turn)
    lensmor = lensmor_of(engine)
    request = lensmor.api_request("POST", kind.submit, _body(ids, event_id))
    try:
        response, body = cast("tuple[httpx.Response, bytes]", (yield lensmor.send(request)))
        if response.status_code not in (200, 201):
            raise _status_error(response, body)
    except BaseException as exc:
        # Refused (a 402 as InsufficientCredits), or its outcome is unknown: the hold
        # ends as a failed spend, and the cached balance is distrusted.
        yield from holds.leave(engine, hold, exc, sync)
        raise
    yield from holds.leave(engine, hold, None, sync)  # the paid call is over: next caller's turn
    # Lensmor accepted the submission: whatever its answer looks like, a task may run and
    # charge, so a malformed answer leaves the hold open (its id and the task's, when the
    # answer names one, are on the InvalidResponse).
    task_id, skipped = _submitted(_json(body, "unlock", None, hold.id), hold.id)
    phone = kind is _PHONE
    if task_id is None:
        yield from holds.end(engine, hold, None, True, sync)  # nothing chargeable: no task
        return ContactUnlock("success", None, None, phone, skipped)
    return ContactUnlock("accepted", task_id, hold.id, phone, skipped)


def _waits(backoff: Sequence[float]) -> Iterator[float]:
    yield from backoff
    while True:
        yield backoff[-1]


def _poll(
    engine: Engine,
    kind: _Kind,
    task_id: str,
    hold_id: str | None,
    backoff: Sequence[float],
    timeout: float,
    sync: bool,
) -> Steps[ContactUnlock]:
    started = _monotonic()
    deadline = started + timeout
    path = kind.task + urllib.parse.quote(task_id, safe="")
    lensmor = lensmor_of(engine)
    waits = _waits(backoff)
    wait = next(waits)
    while True:
        if _monotonic() + wait > deadline:
            raise TaskPending(task_id, hold_id, _monotonic() - started)
        yield pause(wait)
        wait = next(waits)
        request = lensmor.api_request("GET", path)
        try:
            response, body = cast("tuple[httpx.Response, bytes]", (yield lensmor.send(request)))
        except BalanceUnavailable as exc:  # the service is unreachable: poll again later
            logger.warning(
                "polling task %s on %s failed: %s", task_id, engine.account.fingerprint, exc
            )
            continue
        status = response.status_code
        if status == 200:
            answer = _json(body, "task", task_id, hold_id)
            task_status, items = _ended(answer, kind.field, task_id, hold_id)
            if task_status is not None:
                break
            continue
        if status == 429 or status >= 500:
            after = parse_retry_after(response.headers.get("retry-after"))
            if after is not None and after > wait:
                wait = after
            continue
        if status in (401, 403):
            raise AuthenticationError(f"the task poll was refused ({status})", status_code=status)
        error = _status_error(response, body)
        if hold_id is not None:  # the task is gone: what it charged is unknown
            yield from holds.fail(engine, hold_id, error, sync)
        raise error
    balance: CreditBalance | None = None
    if hold_id is not None:
        try:
            kept = yield from holds.look(engine, hold_id)
            balance = yield from holds.end(engine, Held(engine, kept, None), None, False, sync)
        except UnknownHold:
            logger.warning(
                "the hold of task %s on %s ended before the task did (it expired): reading"
                " the balance instead",
                task_id,
                engine.account.fingerprint,
            )
            balance = yield from flows.read(engine, True, sync)
    return ContactUnlock(
        task_status, task_id, hold_id, kind is _PHONE, items=items, balance_after=balance
    )


def _checks(
    phone: bool, backoff: Sequence[float], max_wait: float | None, default: float
) -> tuple[_Kind, tuple[float, ...], float]:
    waits = tuple(_check_seconds("backoff", b, positive=True) for b in backoff)
    if not waits:
        raise ValueError("backoff must name at least one wait")
    limit = default if max_wait is None else _check_seconds("max_wait", max_wait, positive=True)
    return (_PHONE if phone else _EMAIL), waits, limit


def _submission(
    personnel_ids: Sequence[str], phone: bool, event_id: str | None, expires_in: float
) -> tuple[_Kind, list[str], float, Precheck]:
    """A submission's arguments, checked before any request, and what to hold for it."""
    ids = _ids(personnel_ids)
    kind = _PHONE if phone else _EMAIL
    expires_in = _check_seconds("expires_in", expires_in, positive=True)
    return kind, ids, expires_in, _cost(kind, ids, event_id)


def _task_id(task_id: object) -> str:
    if not _is_task_id(task_id):
        raise TypeError("task_id must be a non-empty str")
    return task_id


def submit_contact_unlock(
    guard: CreditGuard,
    personnel_ids: Sequence[str],
    *,
    phone: bool = False,
    event_id: str | None = None,
    expires_in: float = 600.0,
) -> ContactUnlock:
    """Hold the credits of the chargeable contacts and submit their unlock
    (``POST /external/contacts/unlock``, or ``unlock-phone``); return at once.

    What is held is the precheck's answer (contacts already unlocked are free), or the
    worst case (15, or 150, per contact) while the cached balance covers it. The
    submission runs in its turn at the gate (``max_concurrent``). On ``"accepted"`` the
    hold stays open for ``expires_in`` seconds: end it with :func:`poll_unlock_task` (any
    process, by ``hold_id``). With nothing chargeable the hold is released at once and the
    status is ``"success"``. A ``402`` raises :class:`InsufficientCredits`; any other
    refusal the ``httpx.HTTPStatusError`` it is (the hold is ended and the cached balance
    distrusted). An accepted submission whose answer is of the wrong shape raises
    :class:`InvalidResponse` and leaves the hold open: its ``hold_id`` (and ``task_id``,
    when the answer named a task) say what to poll, settle or release."""
    kind, ids, expires_in, precheck = _submission(personnel_ids, phone, event_id, expires_in)
    engine = engine_of(guard)
    cost = cost_of(engine, precheck, precheck.params_for())
    return drive(engine, _submit(engine, kind, ids, event_id, cost, expires_in, True))


async def asubmit_contact_unlock(
    guard: CreditGuard,
    personnel_ids: Sequence[str],
    *,
    phone: bool = False,
    event_id: str | None = None,
    expires_in: float = 600.0,
) -> ContactUnlock:
    """Async :func:`submit_contact_unlock`."""
    kind, ids, expires_in, precheck = _submission(personnel_ids, phone, event_id, expires_in)
    engine = engine_of(guard)
    cost = await acost_of(engine, precheck, precheck.params_for())
    return await adrive(engine, _submit(engine, kind, ids, event_id, cost, expires_in, False))


def poll_unlock_task(
    guard: CreditGuard,
    task_id: str,
    *,
    phone: bool = False,
    hold_id: str | None = None,
    backoff: Sequence[float] = POLL_BACKOFF,
    max_wait: float | None = None,
) -> ContactUnlock:
    """Poll the task ``task_id`` (``GET /external/contacts/unlock-tasks/{id}``, or
    ``unlock-phone-tasks``) with Lensmor's back-off until it is ``completed`` or
    ``failed``, then settle the hold ``hold_id`` (when given) with a balance read after it
    ended: ``balance_after`` includes whatever the task charged.

    ``backoff`` are the waits before each poll (the last repeats; a ``Retry-After`` longer
    than the next wait is honoured); ``max_wait`` (600 s by default) bounds the whole wait,
    after which :class:`TaskPending` is raised and the hold is left open (poll again, or
    let it expire). Unreachable service and ``5xx`` answers are polled through. A task
    answer of the wrong shape raises :class:`InvalidResponse` whose ``task_id`` and
    ``hold_id`` are this call's; the hold is left open (poll again, or settle or release
    it by id)."""
    kind, waits, limit = _checks(phone, backoff, max_wait, 600.0)
    task = _task_id(task_id)
    engine = engine_of(guard)
    return drive(engine, _poll(engine, kind, task, hold_id, waits, limit, True))


async def apoll_unlock_task(
    guard: CreditGuard,
    task_id: str,
    *,
    phone: bool = False,
    hold_id: str | None = None,
    backoff: Sequence[float] = POLL_BACKOFF,
    max_wait: float | None = None,
) -> ContactUnlock:
    """Async :func:`poll_unlock_task`."""
    kind, waits, limit = _checks(phone, backoff, max_wait, 600.0)
    task = _task_id(task_id)
    engine = engine_of(guard)
    return await adrive(engine, _poll(engine, kind, task, hold_id, waits, limit, False))


def unlock_contacts(
    guard: CreditGuard,
    personnel_ids: Sequence[str],
    *,
    phone: bool = False,
    event_id: str | None = None,
    expires_in: float = 600.0,
    backoff: Sequence[float] = POLL_BACKOFF,
    max_wait: float | None = None,
) -> ContactUnlock:
    """Unlock contacts' emails (or ``phone`` numbers) and wait for the task:
    :func:`submit_contact_unlock`, then :func:`poll_unlock_task` (``max_wait`` defaults to
    ``expires_in``, the life of the hold)."""
    kind, waits, limit = _checks(phone, backoff, max_wait, expires_in)
    unlock = submit_contact_unlock(
        guard, personnel_ids, phone=phone, event_id=event_id, expires_in=expires_in
    )
    if unlock.task_id is None:
        return unlock
    engine = engine_of(guard)
    steps = _poll(engine, kind, unlock.task_id, unlock.hold_id, waits, limit, True)
    return drive(engine, steps)


async def aunlock_contacts(
    guard: CreditGuard,
    personnel_ids: Sequence[str],
    *,
    phone: bool = False,
    event_id: str | None = None,
    expires_in: float = 600.0,
    backoff: Sequence[float] = POLL_BACKOFF,
    max_wait: float | None = None,
) -> ContactUnlock:
    """Async :func:`unlock_contacts`."""
    kind, waits, limit = _checks(phone, backoff, max_wait, expires_in)
    unlock = await asubmit_contact_unlock(
        guard, personnel_ids, phone=phone, event_id=event_id, expires_in=expires_in
    )
    if unlock.task_id is None:
        return unlock
    engine = engine_of(guard)
    poll = _poll(engine, kind, unlock.task_id, unlock.hold_id, waits, limit, False)
    return await adrive(engine, poll)
