"""The request/response core both balance clients share: building Lensmor's requests,
reading and decoding answer bodies, mapping answers and transport errors to the guard's
errors, and keeping the API key out of every message (:class:`_Reader`). No I/O of its own:
:mod:`~creditguard.lensmor.client` adds the transport calls and the waiting.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any

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
from creditguard.core.secret import Secret
from creditguard.lensmor.reports import describe_api_error
from creditguard.lensmor.retry import RetryPolicy, _Attempts, _cap, _Retry, parse_retry_after

__all__ = [
    "BALANCE_PATH",
    "MAX_BODY_BYTES",
    "MAX_ERROR_BODY_BYTES",
    "PRECHECK_PATH",
    "USER_AGENT",
    "_Reader",
    "_aerror_body",
    "_error_body",
    "_loads",
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
