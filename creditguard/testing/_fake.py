"""FakeLensmor: an in-memory stand-in of the Lensmor credits service.

It serves ``GET /external/credits/balance`` exactly as documented (Bearer key, 401 for a
wrong key, the camelCase JSON body) and Lensmor's paid endpoints with their published
shapes and costs (see ``_lensmor.py``, ``_events.py`` and ``_contacts.py``) through an
httpx transport (sync and async, see ``_transport.py``) and through an ASGI app for real
HTTP (see ``_asgi.py``), plus a sandbox-only
``POST /sandbox/charge?credits=N`` so an app pointed at the served sandbox can spend, and
``POST /sandbox/spend-outside?credits=N`` for the web app spending from the same pool.
Faults can be scripted for the next balance requests, in process
(:meth:`FakeLensmor.fail_next`, ``latency``) or over HTTP by a test in another process:

* ``POST /sandbox/fail?fault=503&times=2`` (``fault`` is an HTTP error status or one of
  :data:`FAULTS`; ``retry_after=S`` adds a ``Retry-After`` header), ``DELETE /sandbox/fail``
  forgets the faults not yet served;
* ``POST /sandbox/latency?seconds=0.5`` delays every answer;
* ``GET /sandbox/stats``: balance requests served, charges made and faults still pending.

The fault names, their parsing and the answers they make are in ``_faults.py``.

Every sandbox endpoint takes the same ``Authorization: Bearer <key>`` as the balance.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Literal

from creditguard.core.balance import InsufficientCredits
from creditguard.core.models import CreditBalance
from creditguard.lensmor.reader import BALANCE_PATH
from creditguard.testing._asgi import Receive, Scope, Send, _asgi_app
from creditguard.testing._contacts import EMAIL, PHONE, _Contact
from creditguard.testing._events import _Event
from creditguard.testing._faults import (
    Fault,
    _check_fault,
    _check_headers,
    _count,
    _fault_answer,
    _params,
    _Planned,
    _seconds,
    parse_fault,
)
from creditguard.testing._lensmor import _Company, _PaidApi
from creditguard.testing._paid import _Pending
from creditguard.testing._transport import _FakeTransport
from creditguard.testing._wire import (
    BALANCE_SHAPES,
    BalanceShape,
    Credits,
    RateLimit,
    _Answer,
    _json,
    api_error,
)

__all__ = ["FakeLensmor"]

CHARGE_PATH = "/sandbox/charge"
FAIL_PATH = "/sandbox/fail"
LATENCY_PATH = "/sandbox/latency"
STATS_PATH = "/sandbox/stats"
SPEND_OUTSIDE_PATH = "/sandbox/spend-outside"


def _ms(value: datetime | int | None) -> int | None:
    """A time as milliseconds since the epoch (a ``datetime`` or an int of milliseconds)."""
    if value is None:
        return None
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


def _credits_arg(name: str, value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class FakeLensmor:
    """An in-memory Lensmor for demos and tests: the credits balance and the paid endpoints.

    It starts with ``subscription_balance``, ``addon_balance`` and ``gift_balance`` credits
    left, of ``subscription_amount``, ``addon_amount`` and ``gift_amount`` granted (by
    default, the balances), ``reset_at`` as ``resetAt`` and ``addon_expire_at`` as
    ``addonExpireAt`` (a ``datetime``, milliseconds since the epoch, or ``None``). It accepts
    ``api_key`` only (``401`` for any other key). ``latency`` and ``stall_seconds`` are
    attributes that can be changed later; ``balance_requests`` and ``charges`` count what it
    served.

    The balance is sent in ``balance_shape`` ``"0.22"`` (no add-on keys; the default unless
    add-on credits are given) or ``"0.24"`` (with ``addonAmount``, ``addonBalance``,
    ``addonExpireAt``); ``float_numbers=True`` sends its numbers (and those of the paid
    answers the schemas type ``number``) as JSON floats (``30050.0``). Credits are spent
    subscription first, then add-on, then gift.

    The paid endpoints (event unlock, visitors unlock, full-access unlock, contact email
    and phone unlocks and their tasks, the two exhibitor searches, the action precheck)
    charge Lensmor's published costs; see :meth:`add_event`, :meth:`add_contact` and
    :meth:`add_company` for what they find. With ``open_catalogue`` (the default) any event,
    any digit-string contact id and any company exists; without it only those added do. A
    contact unlock task completes on its ``task_polls``-th poll. ``task_debit`` says when a
    task's credits leave the account (Lensmor does not publish it): ``"submission"`` (the
    default) debits the whole chargeable batch when the task is accepted; ``"delivery"``
    checks the batch at submission (a ``402`` as before) but debits each contact when the
    task completes with it delivered (failed ones cost nothing). Without
    ``subscription_active`` the visitors and full-access unlocks answer Lensmor's ``200``
    ``USER_HAS_NO_FEATURE`` envelope (a free plan). ``full_access_balance_after="number"``
    has the full-access unlock report ``balanceAfter`` as the total balance alone, as one
    older published version of the API types it (``"object"``, the default: the 0.27
    object). ``rate_limit`` requests per ``rate_limit_window`` seconds are served to the
    key (``None``: unlimited, and no ``X-RateLimit-*`` headers).

    ``transport`` serves both ``httpx.Client`` and ``httpx.AsyncClient``; ``app`` is an
    ASGI app serving the same API over real HTTP (``creditguard sandbox`` runs it under
    uvicorn). ``latency`` (seconds) delays every answer; a paid call that charges holds the
    key's credit operation meanwhile (another one gets ``409 STATE_CONFLICT``).
    ``fail_next`` scripts faults on the balance: an HTTP status (``429``, ``500``...) with
    optional headers such as ``Retry-After``, or one of ``"drop"`` (the connection closes
    before a body), ``"stall"`` (half a body, then silence), ``"truncated"`` (the connection
    closes mid-body), ``"not-json"`` and ``"wrong-types"`` (a 200 whose body is not the
    documented JSON).
    """

    def __init__(
        self,
        *,
        subscription_balance: int = 30000,
        gift_balance: int = 50,
        subscription_amount: int | None = None,
        gift_amount: int | None = None,
        reset_at: datetime | int | None = None,
        api_key: str = "test-key",
        latency: float = 0.0,
        stall_seconds: float = 30.0,
        addon_balance: int = 0,
        addon_amount: int | None = None,
        addon_expire_at: datetime | int | None = None,
        balance_shape: BalanceShape | None = None,
        float_numbers: bool = False,
        open_catalogue: bool = True,
        task_polls: int = 2,
        rate_limit: int | None = None,
        rate_limit_window: float = 60.0,
        subscription_active: bool = True,
        full_access_balance_after: Literal["object", "number"] = "object",
        task_debit: Literal["submission", "delivery"] = "submission",
    ) -> None:
        addon = _credits_arg("addon_balance", addon_balance)
        addon_amt = addon if addon_amount is None else _credits_arg("addon_amount", addon_amount)
        has_addon = bool(addon or addon_amt) or addon_expire_at is not None
        if balance_shape is None:
            balance_shape = "0.24" if has_addon else "0.22"
        if balance_shape not in BALANCE_SHAPES:
            raise ValueError(
                f"balance_shape must be one of {BALANCE_SHAPES}, got {balance_shape!r}"
            )
        if balance_shape == "0.22" and has_addon:
            raise ValueError("add-on credits need balance_shape='0.24' (0.22 has no add-on keys)")
        self._credits = Credits(
            subscription_amount=(
                subscription_balance if subscription_amount is None else subscription_amount
            ),
            subscription=subscription_balance,
            addon_amount=addon_amt,
            addon=addon,
            addon_expire_ms=_ms(addon_expire_at),
            gift_amount=gift_balance if gift_amount is None else gift_amount,
            gift=gift_balance,
            reset_ms=_ms(reset_at),
        )
        if full_access_balance_after not in ("object", "number"):
            raise ValueError(
                "full_access_balance_after must be 'object' or 'number', got"
                f" {full_access_balance_after!r}"
            )
        self.balance_shape: BalanceShape = balance_shape
        self.full_access_balance_after = full_access_balance_after
        self.floats = bool(float_numbers)
        self.api_key = api_key
        self.latency = latency
        self.stall_seconds = stall_seconds
        self.balance_requests = 0
        self.charges = 0
        self._plan: collections.deque[_Planned] = collections.deque()
        self._lock = threading.Lock()
        self._faults_served = 0
        self._served = threading.Condition(self._lock)
        self._rate_limit = RateLimit(rate_limit, rate_limit_window)
        self._paid = _PaidApi(
            self,
            task_polls=task_polls,
            open_catalogue=open_catalogue,
            subscription_active=bool(subscription_active),
            task_debit=task_debit,
        )
        self.transport = _FakeTransport(self)

    def __repr__(self) -> str:
        return f"<FakeLensmor total_balance={self._credits.total}>"

    # -- server-side state ---------------------------------------------------------

    def _balance_now(self) -> CreditBalance:
        return CreditBalance.from_api(self._credits.body(self.balance_shape, False))

    @property
    def balance(self) -> CreditBalance:
        """The current balance, server-side."""
        with self._lock:
            return self._balance_now()

    def _spend(self, n: int) -> CreditBalance:
        if type(n) is not int:
            raise TypeError(f"credits must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"credits must be >= 0, got {n}")
        if n > self._credits.total:
            raise InsufficientCredits(n, self._credits.total, self._balance_now())
        self._credits.spend(n)
        return self._balance_now()

    def charge(self, n: int) -> CreditBalance:
        """Spend ``n`` credits server-side (subscription first); raise
        :class:`~creditguard.InsufficientCredits` when the account cannot pay."""
        with self._lock:
            balance = self._spend(n)
            self.charges += 1
            return balance

    def top_up(self, n: int) -> CreditBalance:
        """Add ``n`` gift credits, as a purchase or a grant would (the balance and its
        ``total_amount`` rise)."""
        if type(n) is not int or n < 0:
            raise ValueError(f"credits must be an int >= 0, got {n!r}")
        with self._lock:
            self._credits.gift += n
            self._credits.gift_amount += n
            return self._balance_now()

    def spend_outside(self, n: int) -> CreditBalance:
        """Spend ``n`` credits as Lensmor's web app would, from the same pool: the balance
        falls but no API call saw it (``charges`` is unchanged). Raises
        :class:`~creditguard.InsufficientCredits` when the account cannot pay."""
        with self._lock:
            return self._spend(n)

    def add_event(
        self,
        event_id: str,
        *,
        name: str | None = None,
        contacts: bool = True,
        unlocked: bool = False,
        visitors: bool = True,
        visitors_unlocked: bool = False,
    ) -> None:
        """Declare an event for the event, visitors and full-access unlocks (and the
        precheck): ``contacts=False`` has nothing to unlock (400), ``unlocked=True`` is
        free to unlock again. ``visitors=False`` has no registered visitor data (the
        visitors unlock answers 400, the full-access unlock skips that layer);
        ``visitors_unlocked=True`` (which needs ``unlocked=True``) has its visitor layer
        unlocked already. Without :attr:`open_catalogue`, undeclared events are not found
        (404)."""
        if not isinstance(event_id, str) or not 1 <= len(event_id) <= 100:
            raise ValueError("event_id must be a string of 1 to 100 characters")
        if visitors_unlocked and not (unlocked and visitors):
            raise ValueError("visitors_unlocked=True needs unlocked=True and visitors=True")
        with self._lock:
            self._paid.events[event_id] = _Event(
                event_id,
                f"Sandbox event {event_id}" if name is None else name,
                contacts,
                unlocked,
                visitors,
                visitors_unlocked,
            )

    def add_contact(
        self,
        personnel_id: str,
        *,
        email: str | None = "",
        unlocked: bool = False,
        phone: str | None = "",
        phone_unlocked: bool = False,
    ) -> None:
        """Declare a contact for ``POST /external/contacts/unlock`` and
        ``.../unlock-phone``: a digit string, as Lensmor's personnel ids. ``email`` is what
        its email unlock delivers (by default ``contact-<id>@example.test``; ``None``: the
        unlock item fails with ``EMAIL_NOT_FOUND``), ``phone`` what its phone unlock
        delivers (by default ``+1-555-0100 x<id>``; ``None``: ``PHONE_NOT_FOUND``);
        ``unlocked=True`` has its email, ``phone_unlocked=True`` its phone number unlocked
        already, so free."""
        if not isinstance(personnel_id, str) or not personnel_id.isascii():
            raise ValueError("personnel_id must be a string of ASCII digits")
        if not personnel_id.isdigit():
            raise ValueError("personnel_id must be a string of ASCII digits")
        contact = _Contact.sample(personnel_id)
        if email != "":
            contact.email = email
        if phone != "":
            contact.phone = phone
        contact.states[EMAIL.name] = "unlocked" if unlocked else "locked"
        contact.states[PHONE.name] = "unlocked" if phone_unlocked else "locked"
        with self._lock:
            self._paid.contacts[personnel_id] = contact

    def add_company(self, company_name: str, *, events: int = 1, exhibitors: int = 1) -> None:
        """Declare what the exhibitor searches find for ``company_name`` (matched without
        regard to case): ``events`` events, ``exhibitors`` exhibitors; 0 is an empty,
        free result. Without :attr:`open_catalogue`, undeclared names find nothing."""
        events = _credits_arg("events", events)
        exhibitors = _credits_arg("exhibitors", exhibitors)
        with self._lock:
            key = company_name.strip().casefold()
            self._paid.companies[key] = _Company(company_name.strip(), events, exhibitors)

    @property
    def open_catalogue(self) -> bool:
        """Whether undeclared events, contacts and companies exist (see the class)."""
        return self._paid.open_catalogue

    @open_catalogue.setter
    def open_catalogue(self, value: bool) -> None:
        self._paid.open_catalogue = bool(value)

    @property
    def subscription_active(self) -> bool:
        """Whether the account has an active subscription (see the class)."""
        return self._paid.subscription_active

    @subscription_active.setter
    def subscription_active(self, value: bool) -> None:
        self._paid.subscription_active = bool(value)

    @property
    def unlocked_events(self) -> frozenset[str]:
        """The ids of the events whose base access is unlocked so far."""
        with self._lock:
            return frozenset(e.event_id for e in self._paid.events.values() if e.unlocked)

    @property
    def unlocked_visitors(self) -> frozenset[str]:
        """The ids of the events whose visitor access is unlocked so far."""
        with self._lock:
            events = self._paid.events.values()
            return frozenset(e.event_id for e in events if e.visitors_unlocked)

    @property
    def unlocked_contacts(self) -> dict[str, str | None]:
        """The contacts whose email unlock completed, with the email delivered."""
        with self._lock:
            return self._paid.contact_desk.unlocked(EMAIL)

    @property
    def unlocked_phones(self) -> dict[str, str | None]:
        """The contacts whose phone unlock completed, with the phone number delivered."""
        with self._lock:
            return self._paid.contact_desk.unlocked(PHONE)

    @contextlib.contextmanager
    def hold_paid_calls(self) -> Iterator[None]:
        """Inside the block, paid calls that charge start (they hold the key's credit
        operation, so another one gets ``409``) and wait; leaving the block lets them
        finish. With :meth:`wait_for_paid_call`, a test makes two calls overlap without
        relying on timing."""
        gate = threading.Event()
        with self._lock:
            self._paid.gate = gate
        try:
            yield
        finally:
            with self._lock:
                if self._paid.gate is gate:
                    self._paid.gate = None
            gate.set()

    def wait_for_paid_call(self, timeout: float = 5.0) -> bool:
        """Wait until a paid call holds the key's credit operation; ``False`` on timeout."""
        with self._lock:
            return self._paid.started.wait_for(lambda: self._paid.busy is not None, timeout)

    @property
    def paid_call_in_progress(self) -> bool:
        """Whether a paid call holds the key's credit operation right now."""
        with self._lock:
            return self._paid.busy is not None

    def fail_next(
        self,
        status: int | Fault,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` balance requests with ``status`` (or a fault).

        Calls queue up: the faults are served in the order they were scripted.
        """
        kind = _check_fault(status)
        if type(times) is not int or times < 1:
            raise ValueError(f"times must be an int >= 1, got {times!r}")
        checked = _check_headers(dict(headers or {}))
        with self._lock:
            self._plan.append(_Planned(kind, times, checked))

    def clear_faults(self) -> None:
        """Forget every scripted fault not served yet."""
        with self._lock:
            self._plan.clear()

    @property
    def pending_faults(self) -> int:
        """How many balance requests scripted faults will still answer."""
        with self._lock:
            return sum(planned.times for planned in self._plan)

    def wait_faults_served(self, n: int = 1, timeout: float = 10.0) -> None:
        """Block until ``n`` scripted faults have been served in all (a test's way to act
        once a request is stalled, without guessing how long getting there takes).
        Raises ``TimeoutError`` after ``timeout`` seconds."""
        with self._served:
            if not self._served.wait_for(lambda: self._faults_served >= n, timeout):
                raise TimeoutError(f"{self._faults_served} faults served, expected {n}")

    # -- request handling (shared by the transport and the ASGI app) -----------------

    def _authorized(self, authorization: str | None, *, strict: bool = True) -> bool:
        """The key, as ``Bearer <key>`` (the scheme in any case unless ``strict``)."""
        if authorization is None:
            return False
        if strict:
            return authorization == f"Bearer {self.api_key}"
        scheme, _, key = authorization.partition(" ")
        return scheme.lower() == "bearer" and key == self.api_key

    @staticmethod
    def _serves_paid(path: str) -> bool:
        return path.startswith("/external/") and path != BALANCE_PATH

    def _answer(
        self, method: str, path: str, query: str, authorization: str | None, body: bytes = b""
    ) -> _Answer | _Pending:
        if self._serves_paid(path):
            with self._lock:
                return self._paid.answer(method, path, authorization, body)
        if path in (CHARGE_PATH, SPEND_OUTSIDE_PATH):
            return self._charge_answer(method, path, query, authorization)
        if path in (FAIL_PATH, LATENCY_PATH, STATS_PATH):
            if authorization != f"Bearer {self.api_key}":
                return _json(401, {"message": "Unauthorized"})
            return self._control_answer(method, path, query)
        if path != BALANCE_PATH:
            return _json(404, {"message": "Not Found"})
        if method != "GET":
            return _json(405, {"message": "Method Not Allowed"}, {"allow": "GET"})
        with self._lock:
            self.balance_requests += 1
            planned = self._plan[0] if self._plan else None
            if planned is not None:
                planned.times -= 1
                if planned.times == 0:
                    self._plan.popleft()
                self._faults_served += 1
                self._served.notify_all()
            data = self._credits.body(self.balance_shape, self.floats)
        if planned is not None:
            return _fault_answer(planned, data)
        if authorization != f"Bearer {self.api_key}":
            return _json(401, {"message": "Unauthorized"})
        allowed, headers = self._rate_limit.take()
        if not allowed:
            with self._lock:
                trace = self._paid.trace_id()
            return api_error(
                429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", trace, headers=headers
            )
        return _json(200, data, headers)

    def _charge_answer(
        self, method: str, path: str, query: str, authorization: str | None
    ) -> _Answer:
        if method != "POST":
            return _json(405, {"message": "Method Not Allowed"}, {"allow": "POST"})
        if authorization != f"Bearer {self.api_key}":
            return _json(401, {"message": "Unauthorized"})
        try:
            params = _params(query, {"credits"})
            credits = _count(params.get("credits", ""), "credits")
        except ValueError as exc:
            return _json(400, {"message": str(exc)})
        spend = self.charge if path == CHARGE_PATH else self.spend_outside
        try:
            spend(credits)
        except InsufficientCredits as exc:
            return _json(402, {"message": str(exc)})
        with self._lock:
            return _json(200, self._credits.body(self.balance_shape, self.floats))

    def _control_answer(self, method: str, path: str, query: str) -> _Answer:
        """The sandbox's own control endpoints (faults, latency, counters)."""
        try:
            if path == STATS_PATH:
                if method != "GET":
                    return _json(405, {"message": "Method Not Allowed"}, {"allow": "GET"})
                _params(query, set())
            elif path == LATENCY_PATH:
                if method != "POST":
                    return _json(405, {"message": "Method Not Allowed"}, {"allow": "POST"})
                one = _params(query, {"seconds"})
                self.latency = _seconds(one.get("seconds", ""))
            elif method == "DELETE":
                _params(query, set())
                self.clear_faults()
            elif method == "POST":
                one = _params(query, {"fault", "times", "retry_after"})
                fault, _ = parse_fault(one.get("fault", ""))
                times = _count(one.get("times", "1"), "times", least=1)
                headers = {}
                if "retry_after" in one:
                    headers["Retry-After"] = one["retry_after"]
                self.fail_next(fault, times=times, headers=headers)
            else:
                return _json(405, {"message": "Method Not Allowed"}, {"allow": "POST, DELETE"})
        except ValueError as exc:
            return _json(400, {"message": str(exc)})
        with self._lock:
            stats = {
                "balanceRequests": self.balance_requests,
                "charges": self.charges,
                "pendingFaults": sum(planned.times for planned in self._plan),
                "latency": self.latency,
            }
        return _json(200, stats)

    # -- ASGI ----------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The sandbox as a pure ASGI app (HTTP and lifespan)."""
        await _asgi_app(self, scope, receive, send)
