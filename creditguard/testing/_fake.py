"""FakeLensmor: an in-memory stand-in of the Lensmor credits service.

It serves ``GET /external/credits/balance`` exactly as documented (Bearer key, 401 for a
wrong key, the camelCase JSON body) through an httpx transport (sync and async) and through
an ASGI app for real HTTP, plus a sandbox-only ``POST /sandbox/charge?credits=N`` so an app
pointed at the served sandbox can spend. Faults can be scripted for the next requests, in
process (:meth:`FakeLensmor.fail_next`, ``latency``) or over HTTP by a test in another process:

* ``POST /sandbox/fail?fault=503&times=2`` (``fault`` is an HTTP error status or one of
  :data:`FAULTS`; ``retry_after=S`` adds a ``Retry-After`` header), ``DELETE /sandbox/fail``
  forgets the faults not yet served;
* ``POST /sandbox/latency?seconds=0.5`` delays every answer;
* ``GET /sandbox/stats``: balance requests served, charges made and faults still pending.

Every sandbox endpoint takes the same ``Authorization: Bearer <key>`` as the balance.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast
from urllib.parse import parse_qsl

import anyio
import httpx

from .._client import BALANCE_PATH
from .._errors import InsufficientCredits
from .._models import CreditBalance

__all__ = ["FAULTS", "FakeLensmor", "parse_fault"]

CHARGE_PATH = "/sandbox/charge"
FAIL_PATH = "/sandbox/fail"
LATENCY_PATH = "/sandbox/latency"
STATS_PATH = "/sandbox/stats"
Fault = Literal["drop", "stall", "truncated", "not-json", "wrong-types"]
FAULTS: tuple[str, ...] = ("drop", "stall", "truncated", "not-json", "wrong-types")
"""The fault names ``fail_next`` (and ``parse_fault``, ``--fail``) take besides an HTTP
error status."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class _Planned:
    kind: int | str
    times: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Answer:
    """What one request gets: a status, headers and a body, or a fault to act out."""

    status: int
    body: bytes
    headers: dict[str, str]
    fault: str | None = None


_REASONS = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _count(text: str, name: str, *, least: int = 0, most: int = 10**12) -> int:
    """A query parameter or CLI count: ASCII digits only (``int()`` would also take
    ``"٣"``, ``"+3"``, ``" 3"`` and ``"1_000"``), between ``least`` and ``most``."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(most)):
        raise ValueError(f"{name} must be an integer of ASCII digits, got {text[:40]!r}")
    value = int(text)
    if not least <= value <= most:
        raise ValueError(f"{name} must be between {least} and {most}, got {value}")
    return value


_SECONDS = re.compile(r"[0-9]{1,10}(\.[0-9]{0,9})?|\.[0-9]{1,9}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\x20-\x7e]*")


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    """Header names must be tokens, values printable ASCII (no CR, LF or other control
    characters: a value must not end the header and start another)."""
    checked = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if not isinstance(value, str) or len(value) > 1000 or not _FIELD_VALUE.fullmatch(value):
            raise ValueError(
                f"invalid value for header {name}: printable ASCII only, at most 1000"
                f" characters, got {value[:40]!r}"
            )
        checked[name] = value
    return checked


def _check_fault(status: object) -> int | Fault:
    if isinstance(status, str):
        if status not in FAULTS:
            raise ValueError(f"unknown fault {status!r}; expected one of {FAULTS}")
        return cast(Fault, status)
    if type(status) is not int or not 400 <= status <= 599:
        raise ValueError(f"status must be an HTTP error status (400-599), got {status!r}")
    return status


def parse_fault(spec: str) -> tuple[int | Fault, int]:
    """``"503"``, ``"429:3"``, ``"drop"``, ``"stall:2"``... as ``(fault, times)``.

    The fault is an HTTP error status (400-599) or one of :data:`FAULTS`; ``times``
    (default 1) is how many balance requests get it. Raises ``ValueError`` otherwise.
    """
    kind, sep, count = spec.strip().partition(":")
    is_status = kind.isascii() and kind.isdigit()
    fault = _check_fault(int(kind) if is_status and len(kind) <= 10 else kind)
    times = 1
    if sep:
        times = _count(count, "times", least=1)
    return fault, times


def _seconds(text: str) -> float:
    """Seconds as plain ASCII decimal (``float()`` would also take ``"٣"``, ``"1e3"``,
    ``"nan"`` and ``"inf"``), from 0 to 3600."""
    if not _SECONDS.fullmatch(text):
        raise ValueError(f"seconds must be a decimal number, got {text[:40]!r}")
    value = float(text)
    if not 0 <= value <= 3600:
        raise ValueError(f"seconds must be between 0 and 3600, got {text!r}")
    return value


def _params(query: str, allowed: set[str]) -> dict[str, str]:
    """The query's parameters, each given at most once and each one ``allowed``."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, errors="strict"):
        if name not in allowed:
            expected = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"unknown parameter {name[:40]!r} (expected: {expected})")
        if name in params:
            raise ValueError(f"parameter {name!r} given more than once")
        params[name] = value
    return params


def _json(status: int, data: object, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(
        status, json.dumps(data).encode(), {"content-type": "application/json", **(headers or {})}
    )


class FakeLensmor:
    """An in-memory credits service for demos and tests.

    It starts with ``subscription_balance`` and ``gift_balance`` credits left, of
    ``subscription_amount`` and ``gift_amount`` granted (by default, the balances), and
    ``reset_at`` as ``resetAt`` (a ``datetime``, milliseconds since the epoch, or
    ``None``). It accepts ``api_key`` only (``401`` for any other key). ``latency`` and
    ``stall_seconds`` are attributes that can be changed later; ``balance_requests`` and
    ``charges`` count what it served.

    ``transport`` serves both ``httpx.Client`` and ``httpx.AsyncClient``; ``app`` is an
    ASGI app serving the same API over real HTTP (``creditguard sandbox`` runs it under
    uvicorn). ``latency`` (seconds) delays every answer. ``fail_next`` scripts faults:
    an HTTP status (``429``, ``500``...) with optional headers such as ``Retry-After``, or
    one of ``"drop"`` (the connection closes before a body), ``"stall"`` (half a body, then
    silence), ``"truncated"`` (the connection closes mid-body), ``"not-json"`` and
    ``"wrong-types"`` (a 200 whose body is not the documented JSON).
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
    ) -> None:
        sub_amount = subscription_balance if subscription_amount is None else subscription_amount
        gift_amt = gift_balance if gift_amount is None else gift_amount
        reset_ms = reset_at.timestamp() * 1000 if isinstance(reset_at, datetime) else reset_at
        self._balance = CreditBalance.from_api(
            {
                "totalAmount": sub_amount + gift_amt,
                "totalBalance": subscription_balance + gift_balance,
                "subscriptionAmount": sub_amount,
                "subscriptionBalance": subscription_balance,
                "giftAmount": gift_amt,
                "giftBalance": gift_balance,
                "resetAt": None if reset_ms is None else int(reset_ms),
            }
        )
        self.api_key = api_key
        self.latency = latency
        self.stall_seconds = stall_seconds
        self.balance_requests = 0
        self.charges = 0
        self._plan: collections.deque[_Planned] = collections.deque()
        self._lock = threading.Lock()
        self.transport = _FakeTransport(self)

    def __repr__(self) -> str:
        return f"<FakeLensmor total_balance={self._balance.total_balance}>"

    # -- server-side state ---------------------------------------------------------

    @property
    def balance(self) -> CreditBalance:
        """The current balance, server-side."""
        with self._lock:
            return self._balance

    def charge(self, n: int) -> CreditBalance:
        """Spend ``n`` credits server-side (subscription first); raise
        :class:`~creditguard.InsufficientCredits` when the account cannot pay."""
        with self._lock:
            self._balance = self._balance.after_spending(n)
            self.charges += 1
            return self._balance

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

    # -- request handling (shared by the transport and the ASGI app) -----------------

    def _answer(self, method: str, path: str, query: str, authorization: str | None) -> _Answer:
        if path == CHARGE_PATH:
            return self._charge_answer(method, query, authorization)
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
            balance = self._balance
        if planned is not None:
            return self._fault(planned, balance)
        if authorization != f"Bearer {self.api_key}":
            return _json(401, {"message": "Unauthorized"})
        return _json(200, balance.to_api())

    def _charge_answer(self, method: str, query: str, authorization: str | None) -> _Answer:
        if method != "POST":
            return _json(405, {"message": "Method Not Allowed"}, {"allow": "POST"})
        if authorization != f"Bearer {self.api_key}":
            return _json(401, {"message": "Unauthorized"})
        try:
            params = _params(query, {"credits"})
            credits = _count(params.get("credits", ""), "credits")
        except ValueError as exc:
            return _json(400, {"message": str(exc)})
        try:
            balance = self.charge(credits)
        except InsufficientCredits as exc:
            return _json(402, {"message": str(exc)})
        return _json(200, balance.to_api())

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

    @staticmethod
    def _fault(planned: _Planned, balance: CreditBalance) -> _Answer:
        if isinstance(planned.kind, int):
            reason = _REASONS.get(planned.kind, "Error")
            return _json(planned.kind, {"message": reason}, planned.headers)
        body = json.dumps(balance.to_api()).encode()
        if planned.kind == "not-json":
            body = b"<html><body>502 Bad Gateway</body></html>"
        elif planned.kind == "wrong-types":
            data: dict[str, Any] = balance.to_api()
            data["totalBalance"] = str(data["totalBalance"])
            data["giftBalance"] = None
            body = json.dumps(data).encode()
        headers = {"content-type": "application/json", **planned.headers}
        fault = planned.kind if planned.kind in ("drop", "stall", "truncated") else None
        return _Answer(200, body, headers, fault)

    # -- ASGI ----------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The sandbox as a pure ASGI app (HTTP and lifespan)."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization")
        answer = self._answer(
            scope["method"],
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            None if auth is None else auth.decode("latin-1"),
        )
        if self.latency:
            await anyio.sleep(self.latency)
        body = answer.body
        length = len(body)
        raw_headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
        raw_headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": raw_headers})
        if answer.fault == "drop":
            raise _Dropped("sandbox fault: connection dropped before the body")
        if answer.fault in ("stall", "truncated"):
            await send(
                {"type": "http.response.body", "body": body[: length // 2], "more_body": True}
            )
            if answer.fault == "truncated":
                raise _Dropped("sandbox fault: connection dropped mid-body")
            with anyio.move_on_after(self.stall_seconds):
                while (await receive())["type"] != "http.disconnect":
                    pass
            return
        await send({"type": "http.response.body", "body": body})


class _Dropped(Exception):
    """Raised inside the ASGI app so the server closes the connection (a scripted fault)."""


class _FakeTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """The sandbox as an httpx transport for both sync and async clients."""

    def __init__(self, fake: FakeLensmor) -> None:
        self._fake = fake

    def _answer(self, request: httpx.Request) -> _Answer:
        answer = self._fake._answer(
            request.method,
            request.url.path,
            request.url.query.decode("latin-1"),
            request.headers.get("authorization"),
        )
        if answer.fault == "drop":
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        return answer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._fake.latency:
            time.sleep(self._fake.latency)
        answer = self._answer(request)
        return httpx.Response(
            answer.status, headers=answer.headers, stream=_SyncBody(answer, request)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._fake.latency:
            await anyio.sleep(self._fake.latency)
        answer = self._answer(request)
        return httpx.Response(
            answer.status, headers=answer.headers, stream=_AsyncBody(answer, request)
        )


def _body_chunks(answer: _Answer, request: httpx.Request) -> Iterator[bytes]:
    if answer.fault in ("stall", "truncated"):
        yield answer.body[: len(answer.body) // 2]
        if answer.fault == "stall":
            # In process there is no socket to time out on: report what the client's read
            # timeout would have said.
            raise httpx.ReadTimeout("sandbox fault: the body stalled", request=request)
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body", request=request
        )
    yield answer.body


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, answer: _Answer, request: httpx.Request) -> None:
        self._answer = answer
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        return _body_chunks(self._answer, self._request)


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, answer: _Answer, request: httpx.Request) -> None:
        self._answer = answer
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in _body_chunks(self._answer, self._request):
            yield chunk
