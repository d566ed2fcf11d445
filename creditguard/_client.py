"""HTTP edge: read the balance with httpx, sync and async, over one shared core.

The request, the response parsing, the error mapping and the retry decisions live in
:class:`_Reader` and :class:`_Attempts` (no I/O). :class:`BalanceClient` and
:class:`AsyncBalanceClient` only add the transport calls and the waiting.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.lowlevel
import cachetools
import httpx

from ._errors import (
    AuthenticationError,
    BalanceUnavailable,
    InvalidResponse,
    RateLimited,
)
from ._models import CreditBalance

__all__ = ["AsyncBalanceClient", "BalanceClient", "RetryPolicy", "parse_retry_after"]

BALANCE_PATH = "/external/credits/balance"
MAX_BODY_BYTES = 64 * 1024
_MAX_RETRY_AFTER = 1e9  # seconds; anything larger is "much too long" all the same
_REDACTED = "Bearer [redacted]"
USER_AGENT = "creditguard (python-httpx)"
_monotonic = time.monotonic
_raw_decode = json.JSONDecoder().raw_decode


def _loads(body: bytes) -> Any:
    """``json.loads`` of a UTF-8 body (RFC 8259), the same answers and errors, half the cost.

    ``json.loads`` sniffs the encoding of bytes and matches whitespace with a regex on both
    ends of the document; a body that starts with the document needs neither. Anything
    else (leading whitespace, trailing data, invalid JSON) is left to ``json.loads``.
    """
    text = body.decode()
    try:
        data, end = _raw_decode(text)
    except ValueError:
        return json.loads(text)
    if end != len(text) and not text[end:].isspace():
        return json.loads(text)  # raises "Extra data"
    return data


@dataclass(frozen=True)
class RetryPolicy:
    """How one balance read retries.

    ``attempts`` bounds the number of requests, ``deadline`` the total seconds spent on
    one read: every retry's timeouts are capped by what is left of it, and a body still
    arriving past it is abandoned, so one read takes at most about ``deadline`` plus one
    read timeout (a stalled body is cut by the read timeout). 5xx answers and
    connection errors back off exponentially with full jitter, starting at ``backoff``
    and capped at ``backoff_max``; a 429 waits what its ``Retry-After`` asks, or fails at
    once with :class:`RateLimited` when that is longer than what is left of the deadline.
    401/403 and malformed bodies are never retried.
    """

    attempts: int = 3
    deadline: float = 5.0
    backoff: float = 0.1
    backoff_max: float = 1.0

    def __post_init__(self) -> None:
        if type(self.attempts) is not int or self.attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("deadline", "backoff", "backoff_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    Returns ``None`` when the header is absent or unparseable; never raises for any input.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return min(float(text), _MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = now or datetime.now(timezone.utc)
    if current.tzinfo is None:
        current = current.replace(tzinfo=timezone.utc)
    try:
        seconds = (when - current).total_seconds()
    except OverflowError:  # pragma: no cover - defensive
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER)


class _Retry(Exception):
    """Internal: this attempt failed in a way that may succeed if tried again."""

    def __init__(
        self,
        error: BalanceUnavailable,
        retry_after: float | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.cause = cause


def _redact(exc: BaseException, sent: httpx.Request) -> None:
    """Give an httpx error the request it was about, without the Authorization header.

    (Transports raise errors without their request; the one sent is shared by later
    reads, so the error gets a scrubbed copy, never the original.)
    """
    if isinstance(exc, httpx.RequestError):
        headers = sent.headers.copy()
        headers["authorization"] = _REDACTED
        exc.request = httpx.Request(sent.method, sent.url, headers=headers)


class _Attempts:
    """Bookkeeping of a read's retries and time budget (no I/O, no waiting), made when
    its first attempt fails: a read that succeeds at once allocates none."""

    __slots__ = ("_policy", "deadline", "made")

    def __init__(self, policy: RetryPolicy, deadline: float) -> None:
        self._policy = policy
        self.deadline = deadline
        self.made = 1

    def remaining(self) -> float:
        return self.deadline - _monotonic()

    def delay(self, retry: _Retry) -> float:
        """Seconds to wait before the next attempt, or raise the final error."""
        left = self.remaining()
        if retry.retry_after is not None:
            if retry.retry_after > left or self.made >= self._policy.attempts:
                raise RateLimited(
                    f"rate limited by the credits service; retry after {retry.retry_after:g}s",
                    retry_after=retry.retry_after,
                ) from retry.cause
            return retry.retry_after
        if self.made >= self._policy.attempts or left <= 0:
            raise retry.error from retry.cause
        exp = min(self._policy.backoff_max, self._policy.backoff * (2 ** (self.made - 1)))
        wait = random.uniform(0, exp)
        if wait >= left:
            raise retry.error from retry.cause
        return wait


def _cap(value: float | None, left: float) -> float:
    return left if value is None else min(value, left)


class Secret:
    """An API key that does not show itself: its repr and str are redacted."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("an API key is not pickled")


class _Reader:
    """What both clients share: the request, the body limit and the response mapping."""

    __slots__ = ("_fits", "_last", "_lock", "_requests", "policy", "timeout", "url")

    def __init__(self, base_url: str, timeout: httpx.Timeout, policy: RetryPolicy) -> None:
        self.url = httpx.URL(base_url.rstrip("/") + BALANCE_PATH)
        self.timeout = timeout
        self.policy = policy
        # Requests are built once per account and reused; a bounded cache keeps memory
        # flat when a process serves many keys.
        self._requests: cachetools.LRUCache[str, httpx.Request] = cachetools.LRUCache(1024)
        self._lock = threading.Lock()
        self._last: tuple[str, httpx.Request] | None = None  # one-key processes skip the lock
        # When every phase's timeout fits in the retry deadline, a first attempt can use
        # the configured timeouts as they are (and a request built once per key).
        limits = [t for t in timeout.as_dict().values() if t is not None]
        self._fits = len(limits) == 4 and max(limits) <= policy.deadline

    def request(self, account: str, api_key: Secret) -> httpx.Request:
        """The balance request of ``account``, built on first use and then reused."""
        last = self._last
        if last is not None and last[0] == account:
            return last[1]
        with self._lock:
            request = self._requests.get(account)
            if request is None:
                request = self._requests[account] = self.build(api_key.reveal())
        self._last = (account, request)
        return request

    def build(self, api_key: str) -> httpx.Request:
        """The balance request for one key."""
        return httpx.Request(
            "GET",
            self.url,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            extensions={"timeout": self.timeout.as_dict()},
        )

    def for_attempt(
        self, request: httpx.Request, attempts: _Attempts | None, deadline: float
    ) -> httpx.Request:
        """``request`` itself for a first attempt whose timeouts fit in the deadline, else
        a copy whose timeouts are capped by the time left (counting the attempt)."""
        if attempts is None:
            if self._fits:
                return request
        else:
            attempts.made += 1
        left = max(0.001, deadline - _monotonic())
        configured = self.timeout
        capped = httpx.Timeout(
            connect=_cap(configured.connect, left),
            read=_cap(configured.read, left),
            write=_cap(configured.write, left),
            pool=_cap(configured.pool, left),
        )
        return httpx.Request(
            "GET", request.url, headers=request.headers, extensions={"timeout": capped.as_dict()}
        )

    @staticmethod
    def check_status(response: httpx.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        if status in (401, 403):
            raise AuthenticationError(
                f"the credits service rejected the API key ({status})", status_code=status
            )
        if status == 429:
            raise _Retry(
                RateLimited("rate limited by the credits service (429)"),
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        error = BalanceUnavailable(
            f"the credits service answered {status} {response.reason_phrase}".rstrip(),
            status_code=status,
        )
        if status >= 500:
            raise _Retry(error)
        raise error

    @staticmethod
    def body_error(size: int) -> Exception:
        """Why a body stopped being read: too large, or past the read's deadline."""
        if size > MAX_BODY_BYTES:
            return InvalidResponse(f"balance response is larger than {MAX_BODY_BYTES} bytes")
        return httpx.ReadTimeout("balance read exceeded its deadline")

    @staticmethod
    def parse(body: bytes) -> CreditBalance:
        try:
            data = _loads(body)
        except (ValueError, RecursionError):
            raise InvalidResponse("balance response is not valid JSON") from None
        return CreditBalance.from_api(data)

    @staticmethod
    def attempt_error(exc: httpx.HTTPError, sent: httpx.Request) -> _Retry:
        """An httpx error of one attempt: a transport error may succeed if tried again (the
        retry to weigh); anything else is not the documented answer (raised at once)."""
        _redact(exc, sent)
        if isinstance(exc, httpx.TimeoutException):
            message = f"the credits service did not answer in time ({type(exc).__name__})"
        elif isinstance(exc, httpx.TransportError):
            message = f"could not reach the credits service ({type(exc).__name__})"
        else:  # e.g. a body that fails to decode
            raise InvalidResponse(f"balance read failed ({type(exc).__name__})") from exc
        return _Retry(BalanceUnavailable(message), cause=exc)


class BalanceClient:
    """Sync balance reads over one httpx transport (thread-safe, created on first use).

    The request goes straight to the transport (``httpx.HTTPTransport``, or the one the
    guard was given): a balance read uses none of what ``httpx.Client`` adds around it
    (cookie jar, auth flows, redirects, event hooks), and that layer costs more CPU per
    read than the rest of the read together. No cookie jar also means nothing an answer
    sets can reach the requests of another key.
    """

    def __init__(
        self,
        reader: _Reader,
        *,
        transport: httpx.BaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
        missing: bool = False,
    ) -> None:
        self._reader = reader
        self._given = transport
        self._verify = verify
        self._missing = missing
        self._transport: httpx.BaseTransport | None = transport
        self._lock = threading.Lock()

    def _get_transport(self) -> httpx.BaseTransport:
        transport = self._transport
        if transport is None:
            if self._missing:
                raise TypeError(
                    "the transport given to CreditGuard is async-only; sync calls need one"
                )
            with self._lock:
                if self._transport is None:
                    self._transport = httpx.HTTPTransport(verify=self._verify, trust_env=False)
                transport = self._transport
        return transport

    def read(self, request: httpx.Request) -> CreditBalance:
        """Read the balance with ``request`` (from :meth:`_Reader.build`), retrying.

        One loop, no helper per attempt: a read that succeeds at once makes no call it
        does not need."""
        reader = self._reader
        transport = self._get_transport()
        deadline = _monotonic() + reader.policy.deadline
        attempts: _Attempts | None = None
        while True:
            sent = reader.for_attempt(request, attempts, deadline)
            chunks: list[bytes] = []  # joined once: linear however the body is split
            size = 0
            try:
                response = transport.handle_request(sent)
                try:
                    reader.check_status(response)
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > MAX_BODY_BYTES or _monotonic() >= deadline:
                            raise reader.body_error(size)
                        chunks.append(chunk)
                finally:
                    response.close()
            except _Retry as exc:
                retry = exc
            except httpx.HTTPError as exc:
                retry = reader.attempt_error(exc, sent)
            else:
                return reader.parse(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if attempts is None:
                attempts = _Attempts(reader.policy, deadline)
            wait = attempts.delay(retry)
            time.sleep(wait)

    def close(self) -> None:
        """Close the transport (the guard's own, or the one it was given, as
        ``httpx.Client`` would); a later read opens a new one of its own or reuses the
        given one."""
        with self._lock:
            transport, self._transport = self._transport, self._given
        if transport is not None:
            transport.close()


class AsyncBalanceClient:
    """Async balance reads over an httpx async transport, one per event loop.

    The guard's own ``httpx.AsyncHTTPTransport`` holds connections of the loop it first
    ran on; a guard used from ``anyio.run`` twice, from pytest's per-test loops or from
    loops in several threads gets one for each live loop (dropped with the loop). A
    transport the guard was given is used from every loop, as given.
    """

    def __init__(
        self,
        reader: _Reader,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
        missing: bool = False,
    ) -> None:
        self._reader = reader
        self._given = transport
        self._verify = verify
        self._missing = missing
        self._transports: weakref.WeakKeyDictionary[object, httpx.AsyncBaseTransport] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def _get_transport(self) -> httpx.AsyncBaseTransport:
        given = self._given
        if given is not None:
            return given
        if self._missing:
            raise TypeError("the transport given to CreditGuard is sync-only; async calls need one")
        # asyncio's running loop is a cheap C call; anything else asks anyio.
        loop: object = asyncio._get_running_loop() or anyio.lowlevel.current_token().native_token
        transport = self._transports.get(loop)
        if transport is None:
            transport = httpx.AsyncHTTPTransport(verify=self._verify, trust_env=False)
            with self._lock:
                transport = self._transports.setdefault(loop, transport)
        return transport

    async def read(self, request: httpx.Request) -> CreditBalance:
        """Read the balance with ``request`` (from :meth:`_Reader.build`), retrying.

        One loop, no helper per attempt: a read that succeeds at once makes no call it
        does not need (and no extra await hop)."""
        reader = self._reader
        transport = self._get_transport()
        deadline = _monotonic() + reader.policy.deadline
        attempts: _Attempts | None = None
        while True:
            sent = reader.for_attempt(request, attempts, deadline)
            chunks: list[bytes] = []  # joined once: linear however the body is split
            size = 0
            try:
                response = await transport.handle_async_request(sent)
                try:
                    reader.check_status(response)
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > MAX_BODY_BYTES or _monotonic() >= deadline:
                            raise reader.body_error(size)
                        chunks.append(chunk)
                finally:
                    await response.aclose()
            except _Retry as exc:
                retry = exc
            except httpx.HTTPError as exc:
                retry = reader.attempt_error(exc, sent)
            else:
                return reader.parse(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if attempts is None:
                attempts = _Attempts(reader.policy, deadline)
            wait = attempts.delay(retry)
            await anyio.sleep(wait)

    async def aclose(self) -> None:
        """Close the transport of the current loop (or the given one); drop the others
        (their loops are gone)."""
        loop = anyio.lowlevel.current_token().native_token
        with self._lock:
            transport = self._transports.pop(loop, None)
            self._transports.clear()
        if transport is None:
            transport = self._given
        if transport is not None:
            await transport.aclose()

    def drop(self) -> None:
        """Forget every per-loop transport (for sync ``close()``, which cannot await)."""
        with self._lock:
            self._transports.clear()
