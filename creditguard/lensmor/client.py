"""HTTP edge: read the balance with httpx, sync and async, over one shared core.

The request, the response parsing and the error mapping live in :class:`_Reader`, the
retry decisions in :class:`~._retry._Attempts` (no I/O). :class:`BalanceClient` and
:class:`AsyncBalanceClient` only add the transport calls and the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import threading
import time
import weakref
import zlib
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import cachetools
import httpx

from creditguard.core.errors import (
    ActionNotAllowed,
    AuthenticationError,
    BalanceUnavailable,
    InvalidResponse,
    RateLimited,
)
from creditguard.core.models import CreditBalance, PrecheckResult
from creditguard.lensmor.reports import describe_api_error
from creditguard.lensmor.retry import (
    RetryPolicy,
    _Attempts,
    _cap,
    _Retry,
    parse_retry_after,
    rate_limit_wait,
)

__all__ = [
    "AsyncBalanceClient",
    "BalanceClient",
    "RetryPolicy",
    "parse_retry_after",
    "rate_limit_wait",
]

BALANCE_PATH = "/external/credits/balance"
PRECHECK_PATH = "/external/actions/precheck"
MAX_BODY_BYTES = 64 * 1024
MAX_ERROR_BODY_BYTES = 16 * 1024  # an error answer's body is read for its message up to this
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


def _redact(exc: BaseException, sent: httpx.Request) -> None:
    """Give an httpx error the request it was about, without the Authorization header.

    (Transports raise errors without their request; the one sent is shared by later
    reads, so the error gets a scrubbed copy, never the original.)
    """
    if isinstance(exc, httpx.RequestError):
        headers = sent.headers.copy()
        headers["authorization"] = _REDACTED
        exc.request = httpx.Request(sent.method, sent.url, headers=headers)


def _secret_of(request: httpx.Request | None) -> str | None:
    """The API key ``request`` carries (``Authorization: Bearer <key>``), to redact."""
    if request is None:
        return None
    _, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() or None


def _said(headers: httpx.Headers, body: bytes, request: httpx.Request | None) -> str:
    """What Lensmor's error body in an answer says (see
    :func:`~creditguard.lensmor.reports.describe_api_error`), never the key ``request`` carries."""
    return describe_api_error(body, headers, secret=_secret_of(request))


def _with_said(message: str, said: str) -> str:
    return f"{message}: {said}" if said else message


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


def _display_url(base_url: str) -> str:
    """``base_url`` as errors show it: scheme, host, port and path, never userinfo."""
    url = httpx.URL(base_url)
    port = "" if url.port is None else f":{url.port}"
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}{url.path}".rstrip("/")


def _inflate(body: bytes, coding: str) -> bytes:
    """Decode a body the service compressed although the request asked for ``identity``,
    producing at most ``MAX_BODY_BYTES`` + 1 bytes whatever the ratio (``gzip`` and
    ``deflate`` only); raise :class:`InvalidResponse` for anything else."""
    codings = [c.strip().lower() for c in coding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
        raise InvalidResponse(
            f"balance response has an unsupported Content-Encoding {coding[:40]!r}"
        )
    candidates: tuple[int, ...] = (16 + zlib.MAX_WBITS,)  # gzip
    if codings[0] == "deflate":
        candidates = (zlib.MAX_WBITS, -zlib.MAX_WBITS)  # zlib-wrapped, or raw as some send
    for wbits in candidates:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, MAX_BODY_BYTES + 1)
        except zlib.error:
            continue
        if len(data) > MAX_BODY_BYTES or inflater.unconsumed_tail:
            raise InvalidResponse(f"balance response is larger than {MAX_BODY_BYTES} bytes")
        if inflater.eof:
            return data
    raise InvalidResponse(f"balance response could not be decoded ({codings[0]})")


def _request_of(response: httpx.Response) -> httpx.Request | None:
    try:
        return response.request
    except RuntimeError:  # a response built without one
        return None


def _decoded(body: bytes, response: httpx.Response) -> bytes:
    """An error answer's raw ``body``, decoded when the service compressed it; empty when
    it cannot be."""
    coding = response.headers.get("content-encoding")
    if not coding:
        return body
    try:
        return _inflate(body, coding)
    except InvalidResponse:
        return b""


def _error_body(response: httpx.Response, deadline: float) -> bytes:
    """The body of an answer other than 200, for its error message: at most
    ``MAX_ERROR_BODY_BYTES`` on the wire, read until the read's ``deadline``. Empty when it
    is larger, late or cannot be read: the status alone then says what went wrong."""
    if response.is_stream_consumed:  # built around its content (a mock transport)
        content = response.content
        return content if len(content) <= MAX_ERROR_BODY_BYTES else b""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > MAX_ERROR_BODY_BYTES or _monotonic() >= deadline:
                return b""
            chunks.append(chunk)
    except httpx.HTTPError:
        return b""
    return _decoded(b"".join(chunks), response)


async def _aerror_body(response: httpx.Response, deadline: float) -> bytes:
    """Async :func:`_error_body`."""
    if response.is_stream_consumed:
        content = response.content
        return content if len(content) <= MAX_ERROR_BODY_BYTES else b""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > MAX_ERROR_BODY_BYTES or _monotonic() >= deadline:
                return b""
            chunks.append(chunk)
    except httpx.HTTPError:
        return b""
    return _decoded(b"".join(chunks), response)


class _Reader:
    """What both clients share: the request, the body limit and the response mapping."""

    __slots__ = (
        "_fits",
        "_last",
        "_lock",
        "_requests",
        "api_url",
        "base_url",
        "policy",
        "timeout",
        "url",
    )

    def __init__(self, base_url: str, timeout: httpx.Timeout, policy: RetryPolicy) -> None:
        self.url = httpx.URL(base_url.rstrip("/") + BALANCE_PATH)
        self.api_url = base_url.rstrip("/")
        self.base_url = _display_url(base_url)
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
                # The body limit applies to the bytes on the wire: nothing to inflate.
                "Accept-Encoding": "identity",
                "User-Agent": USER_AGENT,
            },
            extensions={"timeout": self.timeout.as_dict()},
        )

    def precheck_request(
        self, api_key: Secret, action_type: str, params: Mapping[str, Any]
    ) -> httpx.Request:
        """``POST /external/actions/precheck`` for one action (it never charges)."""
        return self.api_request(
            api_key, "POST", PRECHECK_PATH, {"action_type": action_type, "params": dict(params)}
        )

    def api_request(
        self, api_key: Secret, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> httpx.Request:
        """A request to Lensmor's API at ``path`` (JSON ``body``, if any), authorised with
        the key, with the guard's timeouts."""
        headers = {
            "Authorization": f"Bearer {api_key.reveal()}",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(dict(body)).encode()
        return httpx.Request(
            method,
            self.api_url + path,
            headers=headers,
            content=content,
            extensions={"timeout": self.timeout.as_dict()},
        )

    def precheck_answer(self, response: httpx.Response, body: bytes) -> PrecheckResult:
        """The precheck's result, or the error its answer means (Lensmor's ``errorKey``
        and ``traceId`` in the message; never the key)."""
        status = response.status_code
        request = _request_of(response)
        if status == 200:
            try:
                return PrecheckResult.from_api(_loads(body))
            except (ValueError, RecursionError):
                raise InvalidResponse("precheck answer is not valid JSON") from None
            except InvalidResponse as exc:  # an error body inside a 200, say
                said = _said(response.headers, body, request)
                raise InvalidResponse(_with_said(str(exc), said)) from None
        said = _said(response.headers, _decoded(body, response), request)
        if status in (401, 403):
            raise AuthenticationError(
                _with_said(f"the credits service rejected the API key ({status})", said),
                status_code=status,
            )
        if status == 429:
            raise RateLimited(
                _with_said("rate limited by the credits service (429)", said),
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if status == 400:
            raise ActionNotAllowed("invalid_request", {"message": said})
        raise BalanceUnavailable(
            _with_said(f"the precheck at {self.base_url} answered {status}", said),
            status_code=status,
        )

    def send_error(self, exc: httpx.HTTPError, sent: httpx.Request) -> BalanceUnavailable:
        """A transport error of a one-shot request (the precheck), as our error."""
        _redact(exc, sent)
        error = BalanceUnavailable(
            f"could not reach the credits service at {self.base_url} ({type(exc).__name__})"
        )
        error.__cause__ = exc
        return error

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
    def status_error(response: httpx.Response, body: bytes, sent: httpx.Request) -> Exception:
        """What a balance answer other than 200 means: the error to raise, or the
        :class:`_Retry` to weigh (429, 5xx). Its message carries what Lensmor's error body
        (``body``, see :func:`_error_body`) says: its ``errorKey``, message and ``traceId``,
        never the key ``sent`` carries."""
        status = response.status_code
        said = _said(response.headers, body, sent)
        if status in (401, 403):
            return AuthenticationError(
                _with_said(f"the credits service rejected the API key ({status})", said),
                status_code=status,
            )
        if status == 429:
            return _Retry(
                RateLimited(_with_said("rate limited by the credits service (429)", said)),
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        answered = f"the credits service answered {status} {response.reason_phrase}".rstrip()
        error = BalanceUnavailable(_with_said(answered, said), status_code=status)
        if status >= 500:
            return _Retry(error)
        return error

    @staticmethod
    def body_error(size: int) -> Exception:
        """Why a body stopped being read: too large, or past the read's deadline."""
        if size > MAX_BODY_BYTES:
            return InvalidResponse(f"balance response is larger than {MAX_BODY_BYTES} bytes")
        return httpx.ReadTimeout("balance read exceeded its deadline")

    @staticmethod
    def in_memory(response: httpx.Response) -> bytes:
        """The body of a response built around its content (``httpx.Response(content=...)``
        from a mock transport), which httpx has already read and decoded."""
        body = response.content
        if len(body) > MAX_BODY_BYTES:
            raise InvalidResponse(f"balance response is larger than {MAX_BODY_BYTES} bytes")
        return body

    @staticmethod
    def parse(
        body: bytes, coding: str | None = None, sent: httpx.Request | None = None
    ) -> CreditBalance:
        """The balance in ``body`` (the raw bytes, decoded first if the answer has a
        ``Content-Encoding`` although none was asked for). A body that is Lensmor's error
        body (inside a 200) says so in the :class:`InvalidResponse`."""
        if coding is not None:
            body = _inflate(body, coding)
        try:
            data = _loads(body)
        except (ValueError, RecursionError):
            raise InvalidResponse("balance response is not valid JSON") from None
        try:
            return CreditBalance.from_api(data)
        except InvalidResponse as exc:
            said = _said(httpx.Headers(), body, sent)
            if not said:
                raise
            raise InvalidResponse(_with_said(str(exc), said)) from None

    def attempt_error(self, exc: httpx.HTTPError, sent: httpx.Request) -> _Retry:
        """An httpx error of one attempt: a transport error may succeed if tried again (the
        retry to weigh); anything else is not the documented answer (raised at once)."""
        _redact(exc, sent)
        where = self.base_url
        if isinstance(exc, httpx.TimeoutException):
            message = f"the credits service at {where} did not answer in time"
            message += f" ({type(exc).__name__})"
        elif isinstance(exc, httpx.TransportError):
            message = f"could not reach the credits service at {where} ({type(exc).__name__})"
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

    def read(self, request: httpx.Request) -> tuple[CreditBalance, float | None]:
        """Read the balance with ``request`` (from :meth:`_Reader.build`), retrying; with
        it, the seconds until the rate limit resets when the answer says none is left.

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
            coding: str | None = None
            try:
                response = transport.handle_request(sent)
                try:
                    if response.status_code != 200:
                        raise reader.status_error(response, _error_body(response, deadline), sent)
                    if response.is_stream_consumed:
                        chunks.append(reader.in_memory(response))
                    else:
                        # Raw bytes: the limit is on what crossed the wire, not decoded.
                        coding = response.headers.get("content-encoding")
                        for chunk in response.iter_raw():
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
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return reader.parse(body, coding, sent), rate_limit_wait(response.headers)
            if attempts is None:
                attempts = _Attempts(reader.policy, deadline)
            wait = attempts.delay(retry)
            time.sleep(wait)

    def send(self, request: httpx.Request) -> tuple[httpx.Response, bytes]:
        """Send a one-shot request (the precheck); its answer and body (at most
        ``MAX_BODY_BYTES`` on the wire). Not retried."""
        reader = self._reader
        transport = self._get_transport()
        chunks: list[bytes] = []
        size = 0
        try:
            response = transport.handle_request(request)
            try:
                if response.is_stream_consumed:
                    chunks.append(reader.in_memory(response))
                else:
                    for chunk in response.iter_raw():
                        size += len(chunk)
                        if size > MAX_BODY_BYTES:
                            raise reader.body_error(size)
                        chunks.append(chunk)
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise reader.send_error(exc, request) from None
        response.request = request  # what its error message must not show: the key
        return response, b"".join(chunks)

    def close(self) -> None:
        """Close the transport (the guard's own, or the one it was given, as
        ``httpx.Client`` would); a later read opens a new one of its own or reuses the
        given one."""
        with self._lock:
            transport, self._transport = self._transport, self._given
        if transport is not None:
            transport.close()


class _Held:
    """The transport the guard opened for one event loop, until that loop ends."""

    __slots__ = ("transport",)

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport: httpx.AsyncBaseTransport | None = transport


async def _keeper(
    held: _Held, owner: weakref.ref[AsyncBalanceClient], loop: object
) -> AsyncGenerator[None, None]:
    """Closes ``held``'s transport when its loop ends.

    Advanced once inside the loop, this async generator is registered by the loop's
    async-generator hooks, and the loop closes it when it shuts down (``asyncio.run``,
    ``asyncio.Runner``, ``anyio.run`` and ``trio.run`` all finalize the async generators
    still alive): the ``finally`` then runs in that loop, where the transport's
    connections can still be closed.
    """
    try:
        yield
    finally:
        client = owner()
        if client is not None:
            client._forget(loop, held)
        transport, held.transport = held.transport, None
        if transport is not None:
            with contextlib.suppress(Exception):  # a connection already broken
                await transport.aclose()


async def _finish(keeper: AsyncGenerator[None, None]) -> None:
    await keeper.aclose()


def _finish_now(keeper: AsyncGenerator[None, None], held: _Held) -> None:
    """Finish ``keeper`` without its loop (the loop is closed, or its run is over): its
    transport is dropped without awaiting, and its sockets close with it."""
    held.transport = None
    closing = keeper.aclose()
    try:
        closing.send(None)
    except (StopIteration, RuntimeError):
        pass
    else:  # pragma: no cover - the finally awaits nothing once the transport is gone
        closing.close()


def _spawn_trio(keeper: AsyncGenerator[None, None], held: _Held) -> None:
    """In a trio run's thread: finish ``keeper`` in a system task of that run."""
    trio = sys.modules["trio"]
    try:
        trio.lowlevel.spawn_system_task(_finish, keeper)
    except RuntimeError:  # the run is shutting down: too late to await in it
        _finish_now(keeper, held)


def _retire(loop: object, keeper: AsyncGenerator[None, None], held: _Held) -> None:
    """Have ``keeper`` finish (and close its transport) in its own loop, from any thread;
    at once, without awaiting, when that loop is gone."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.create_task, _finish(keeper))
                return
            except RuntimeError:  # closed meanwhile
                pass
    else:  # a trio run, named by its token
        trio = sys.modules.get("trio")
        if trio is not None:
            try:
                loop.run_sync_soon(_spawn_trio, keeper, held)  # type: ignore[attr-defined]
                return
            except trio.RunFinishedError:
                pass
    _finish_now(keeper, held)


_Entry = tuple[AsyncGenerator[None, None], _Held]


class AsyncBalanceClient:
    """Async balance reads over an httpx async transport, one per event loop.

    The guard's own ``httpx.AsyncHTTPTransport`` holds connections of the loop it first
    ran on, so a guard used from ``asyncio.run`` or ``anyio.run`` several times, from
    pytest's per-test loops or from loops in several threads opens one for each loop.
    Each is closed in its loop when that loop shuts down (see :func:`_keeper`), so a
    finished loop leaves no socket open and is not kept alive. A loop closed without
    finalizing its async generators (``loop.close()`` without ``shutdown_asyncgens()``)
    is let go, with its transport, the next time the guard meets a new loop or is closed.
    A transport the guard was given is used from every loop, as given.
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
        # loop (or trio token) -> its transport: one dict lookup per read. The keepers
        # are apart, used only when a loop comes or goes.
        self._transports: dict[object, httpx.AsyncBaseTransport] = {}
        self._keepers: dict[object, _Entry] = {}
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
            transport = self._open(loop)
        return transport

    def _open(self, loop: object) -> httpx.AsyncBaseTransport:
        """A new transport for ``loop`` (the running one), with its keeper."""
        transport = httpx.AsyncHTTPTransport(verify=self._verify, trust_env=False)
        held = _Held(transport)
        keeper = _keeper(held, weakref.ref(self), loop)
        # First step, in the loop's thread: the loop's async-generator hooks register it.
        with contextlib.suppress(StopIteration):
            keeper.asend(None).send(None)
        with self._lock:
            stale = self._take(_is_closed)
            self._transports[loop] = transport
            self._keepers[loop] = (keeper, held)
        for other, (old_keeper, old_held) in stale:
            _retire(other, old_keeper, old_held)
        return transport

    def _take(self, which: Callable[[object], bool]) -> list[tuple[object, _Entry]]:
        """Remove the entries of the loops ``which`` selects (under the lock)."""
        taken = [(loop, entry) for loop, entry in self._keepers.items() if which(loop)]
        for loop, _ in taken:
            del self._keepers[loop]
            self._transports.pop(loop, None)
        return taken

    def _forget(self, loop: object, held: _Held) -> None:
        """Called by a keeper as it finishes: drop its loop's entry, if still its own."""
        with self._lock:
            entry = self._keepers.get(loop)
            if entry is not None and entry[1] is held:
                del self._keepers[loop]
                self._transports.pop(loop, None)

    async def read(self, request: httpx.Request) -> tuple[CreditBalance, float | None]:
        """Read the balance with ``request`` (from :meth:`_Reader.build`), retrying; with
        it, the seconds until the rate limit resets when the answer says none is left.

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
            coding: str | None = None
            try:
                response = await transport.handle_async_request(sent)
                try:
                    if response.status_code != 200:
                        error_body = await _aerror_body(response, deadline)
                        raise reader.status_error(response, error_body, sent)
                    if response.is_stream_consumed:
                        chunks.append(reader.in_memory(response))
                    else:
                        # Raw bytes: the limit is on what crossed the wire, not decoded.
                        coding = response.headers.get("content-encoding")
                        async for chunk in response.aiter_raw():
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
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return reader.parse(body, coding, sent), rate_limit_wait(response.headers)
            if attempts is None:
                attempts = _Attempts(reader.policy, deadline)
            wait = attempts.delay(retry)
            await anyio.sleep(wait)

    async def send(self, request: httpx.Request) -> tuple[httpx.Response, bytes]:
        """Async :meth:`BalanceClient.send`."""
        reader = self._reader
        transport = self._get_transport()
        chunks: list[bytes] = []
        size = 0
        try:
            response = await transport.handle_async_request(request)
            try:
                if response.is_stream_consumed:
                    chunks.append(reader.in_memory(response))
                else:
                    async for chunk in response.aiter_raw():
                        size += len(chunk)
                        if size > MAX_BODY_BYTES:
                            raise reader.body_error(size)
                        chunks.append(chunk)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise reader.send_error(exc, request) from None
        response.request = request  # what its error message must not show: the key
        return response, b"".join(chunks)

    async def aclose(self) -> None:
        """Close the transport of the current loop (or the given one) and have every other
        loop close its own."""
        loop: object = asyncio._get_running_loop() or anyio.lowlevel.current_token().native_token
        with self._lock:
            taken = self._take(lambda _: True)
        mine = None
        for other, (keeper, held) in taken:
            if other is loop:
                mine = keeper
            else:
                _retire(other, keeper, held)
        if mine is not None:
            await _finish(mine)
        elif self._given is not None:
            await self._given.aclose()

    def drop(self) -> None:
        """Let go of every per-loop transport (for sync ``close()``, which cannot await):
        each is closed in its own loop, at once for a loop that is gone."""
        with self._lock:
            taken = self._take(lambda _: True)
        for loop, (keeper, held) in taken:
            _retire(loop, keeper, held)


def _is_closed(loop: object) -> bool:
    return isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed()
