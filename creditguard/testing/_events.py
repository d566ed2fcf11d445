"""The sandbox's event unlocks, with their published shapes and costs.

* ``POST /external/events/{id}/unlock``: the base event layer, 2000 credits; free when
  already unlocked; 400 when the event has no contacts to unlock. Answers ``creditsUsed``
  and the short ``balanceAfter`` (``null`` when nothing was charged).
* ``POST /external/events/{id}/visitors/unlock`` (API 0.24+): the registered visitor layer,
  3000 credits, for an event whose base layer is unlocked (``409 STATE_CONFLICT`` before
  that) and which has visitor data (400 without); free when already unlocked. Answers
  ``creditsSpent`` and the whole balance after (``null`` when nothing was charged).
* ``POST /external/events/{id}/full-access/unlock`` (API 0.24+): both layers at once,
  paying only for those still locked (0 to 5000 credits); a visitor layer without data is
  skipped (``visitorSkipped``). Answers ``totalCreditsUsed`` and the short ``balanceAfter``
  (``null`` when nothing was charged), or the total alone as a bare number, as one older
  published version types it (``full_access_balance_after="number"``).

The visitor and full-access unlocks need an active subscription: without one they answer
the published ``200`` ``USER_HAS_NO_FEATURE`` envelope. None of them takes a body.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from creditguard.testing._paid import Sandbox, _Pending, _Route
from creditguard.testing._wire import (
    Check,
    Checker,
    _Answer,
    _BadRequest,
    _json,
    _number,
    api_error,
)

__all__ = ["EVENT_UNLOCK_COST", "VISITOR_UNLOCK_COST", "_Event", "_EventDesk"]

EVENT_UNLOCK_COST = 2000
VISITOR_UNLOCK_COST = 3000

_EVENT_UNLOCK = re.compile(r"/external/events/([^/]*)/unlock")
_VISITORS_UNLOCK = re.compile(r"/external/events/([^/]*)/visitors/unlock")
_FULL_ACCESS_UNLOCK = re.compile(r"/external/events/([^/]*)/full-access/unlock")
_NO_FEATURE = "This feature is not available to free users, please upgrade to continue"


@dataclass
class _Event:
    event_id: str
    name: str | None
    contacts: bool = True  # the base layer has contacts to unlock
    unlocked: bool = False  # the base layer
    visitors: bool = True  # registered visitor data is available
    visitors_unlocked: bool = False

    def identity(self) -> dict[str, Any]:
        return {"id": self.event_id, "eventId": self.event_id, "name": self.name}


@dataclass(frozen=True)
class _Layers:
    """What a full-access unlock of an event would unlock, and so charge."""

    base: bool
    visitors: bool
    skipped: bool

    @classmethod
    def of(cls, event: _Event) -> _Layers:
        return cls(
            base=not event.unlocked,
            visitors=event.visitors and not event.visitors_unlocked,
            skipped=not event.visitors,
        )

    @property
    def cost(self) -> int:
        return EVENT_UNLOCK_COST * self.base + VISITOR_UNLOCK_COST * self.visitors


class _EventApi(Protocol):
    """What the event unlocks use of the paid endpoints (:class:`~._lensmor._PaidApi`)."""

    @property
    def fake(self) -> Sandbox: ...

    @property
    def subscription_active(self) -> bool: ...

    def event(self, event_id: str, *, keep: bool) -> _Event | None: ...

    def begin(
        self,
        work: Callable[[], _Answer],
        trace: str,
        headers: dict[str, str],
        *,
        busy: Callable[[], _Answer] | None = None,
    ) -> _Answer | _Pending: ...

    def pay(self, cost: int, trace: str) -> _Answer | None: ...


class _EventDesk:
    """The event unlocks of one sandbox; everything runs under the fake's lock."""

    def __init__(self, api: _EventApi) -> None:
        self.api = api

    def route(self, method: str, path: str) -> _Route | None:
        if method != "POST":
            return None
        for pattern, unlock in (
            (_EVENT_UNLOCK, self._unlock),
            (_VISITORS_UNLOCK, self._unlock_visitors),
            (_FULL_ACCESS_UNLOCK, self._unlock_full_access),
        ):
            match = pattern.fullmatch(path)
            if match:
                return _Route(functools.partial(unlock, match.group(1)), body=False)
        return None

    def prechecks(self) -> dict[str, Checker]:
        """The precheck's action types these unlocks answer, and their checks."""
        return {
            "unlock_event_contacts": self._precheck_unlock,
            "unlock_event_visitors": self._precheck_visitors,
            "unlock_event_full_access": self._precheck_full_access,
        }

    def _find(self, event_id: str) -> _Event | None:
        if not 1 <= len(event_id) <= 100:
            raise _BadRequest("the event id must have 1 to 100 characters")
        return self.api.event(event_id, keep=True)

    @staticmethod
    def _not_found(event_id: str, trace: str) -> _Answer:
        return api_error(404, "NOT_FOUND", f"Event {event_id} not found", trace)

    @staticmethod
    def _no_feature(trace: str) -> _Answer:
        """The published ``200`` envelope for a caller without an active subscription."""
        body = {"code": 400, "message": _NO_FEATURE, "errorKey": "USER_HAS_NO_FEATURE"}
        return _json(200, {**body, "traceId": trace}, {"x-request-id": trace})

    # -- the base layer ------------------------------------------------------------

    def _unlock(
        self, event_id: str, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        event = self._find(event_id)
        if event is None:
            return self._not_found(event_id, trace)
        if event.unlocked:
            return self._unlock_result(event, 0)
        if not event.contacts:
            raise _BadRequest(f"Event {event_id} has no contacts to unlock")

        def work() -> _Answer:
            refused = self.api.pay(EVENT_UNLOCK_COST, trace)
            if refused is not None:
                return refused
            event.unlocked = True
            return self._unlock_result(event, EVENT_UNLOCK_COST)

        return self.api.begin(work, trace, headers)

    def _unlock_result(self, event: _Event, used: int) -> _Answer:
        fake = self.api.fake
        after = None if not used else fake._credits.balance_after(fake.balance_shape, fake.floats)
        return _json(
            201,
            {
                "success": True,
                "alreadyUnlocked": not used,
                "creditsUsed": _number(used, fake.floats),
                "balanceAfter": after,
                "event": event.identity(),
            },
        )

    # -- the visitor layer ---------------------------------------------------------

    def _unlock_visitors(
        self, event_id: str, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        if not self.api.subscription_active:
            return self._no_feature(trace)
        event = self._find(event_id)
        if event is None:
            return self._not_found(event_id, trace)
        if event.visitors_unlocked:
            return self._visitors_result(event, 0)
        if not event.unlocked:
            return api_error(
                409,
                "STATE_CONFLICT",
                f"Event {event_id} needs its base access unlocked before its visitors",
                trace,
            )
        if not event.visitors:
            raise _BadRequest(f"Event {event_id} has no visitor data to unlock")

        def work() -> _Answer:
            refused = self.api.pay(VISITOR_UNLOCK_COST, trace)
            if refused is not None:
                return refused
            event.visitors_unlocked = True
            return self._visitors_result(event, VISITOR_UNLOCK_COST)

        return self.api.begin(work, trace, headers)

    def _visitors_result(self, event: _Event, spent: int) -> _Answer:
        fake = self.api.fake
        # The visitor unlock is API 0.24+: its balance is the 0.24 shape, add-on keys and all.
        after = None if not spent else fake._credits.body("0.24", fake.floats)
        return _json(
            201,
            {
                "success": True,
                "alreadyUnlocked": not spent,
                "creditsSpent": spent,
                "balanceAfter": after,
                "event": event.identity(),
            },
        )

    # -- both layers ---------------------------------------------------------------

    def _unlock_full_access(
        self, event_id: str, data: dict[str, Any], trace: str, headers: dict[str, str]
    ) -> _Answer | _Pending:
        if not self.api.subscription_active:
            return self._no_feature(trace)
        event = self._find(event_id)
        if event is None:
            return self._not_found(event_id, trace)
        layers = _Layers.of(event)
        if layers.base and not event.contacts:
            raise _BadRequest(f"Event {event_id} has no contacts to unlock")
        if not layers.cost:
            return self._full_access_result(event, layers, 0)

        def work() -> _Answer:
            refused = self.api.pay(layers.cost, trace)
            if refused is not None:
                return refused
            event.unlocked = True
            event.visitors_unlocked = event.visitors_unlocked or layers.visitors
            return self._full_access_result(event, layers, layers.cost)

        return self.api.begin(work, trace, headers)

    def _full_access_result(self, event: _Event, layers: _Layers, used: int) -> _Answer:
        fake = self.api.fake
        after: object = None
        if used and fake.full_access_balance_after == "number":
            after = _number(fake._credits.total, fake.floats)
        elif used:
            after = fake._credits.balance_after(fake.balance_shape, fake.floats)
        return _json(
            201,
            {
                "success": True,
                "alreadyUnlocked": not used,
                "eventUnlocked": bool(used) and layers.base,
                "visitorUnlocked": bool(used) and layers.visitors,
                "visitorSkipped": layers.skipped,
                "totalCreditsUsed": used,
                "balanceAfter": after,
                "event": event.identity(),
            },
        )

    # -- precheck ------------------------------------------------------------------

    def _subject(self, params: dict[str, Any]) -> tuple[str | None, _Event | None]:
        event_id = params.get("event_id")
        if not isinstance(event_id, str) or not 1 <= len(event_id) <= 100:
            return None, None
        return event_id, self.api.event(event_id, keep=False)

    def _precheck_unlock(self, params: dict[str, Any]) -> Check:
        event_id, event = self._subject(params)
        if event_id is None:
            return "invalid_subject", 0, {}
        detail: dict[str, Any] = {"event_id": event_id, "unlock_credits": EVENT_UNLOCK_COST}
        if event is None:
            return "not_found", 0, detail
        if event.unlocked:
            return "already_unlocked", 0, detail
        if not event.contacts:
            return "no_contacts_available", 0, detail
        return "ok", EVENT_UNLOCK_COST, detail

    def _precheck_visitors(self, params: dict[str, Any]) -> Check:
        event_id, event = self._subject(params)
        if event_id is None:
            return "invalid_subject", 0, {}
        detail: dict[str, Any] = {"event_id": event_id, "unlock_credits": VISITOR_UNLOCK_COST}
        if not self.api.subscription_active:
            return "forbidden", 0, detail
        if event is None:
            return "not_found", 0, detail
        if event.visitors_unlocked:
            return "already_unlocked", 0, detail
        if not event.unlocked:
            return "state_conflict", 0, detail
        if not event.visitors:
            return "no_contacts_available", 0, detail
        return "ok", VISITOR_UNLOCK_COST, detail

    def _precheck_full_access(self, params: dict[str, Any]) -> Check:
        event_id, event = self._subject(params)
        if event_id is None:
            return "invalid_subject", 0, {}
        detail: dict[str, Any] = {"event_id": event_id}
        if not self.api.subscription_active:
            return "forbidden", 0, detail
        if event is None:
            return "not_found", 0, detail
        layers = _Layers.of(event)
        detail["event_unlock_credits"] = EVENT_UNLOCK_COST if layers.base else 0
        detail["visitor_unlock_credits"] = VISITOR_UNLOCK_COST if layers.visitors else 0
        detail["visitor_skipped"] = layers.skipped
        if layers.base and not event.contacts:
            return "no_contacts_available", 0, detail
        if not layers.cost:
            return "already_unlocked", 0, detail
        return "ok", layers.cost, detail
