"""Balance reads: error mapping, retries, Retry-After and rate-limit headers, timeouts; sync
and async."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx

from creditguard import (
    AuthenticationError,
    BalanceUnavailable,
    CreditGuard,
    CreditGuardError,
    InvalidResponse,
    RateLimited,
    RetryPolicy,
    parse_retry_after,
)
from creditguard.lensmor.client import rate_limit_wait
from creditguard.testing import FakeLensmor, serve
from tests.helpers import NewBackend

KEY = "sk-live-0123456789abcdef"
BODY = {
    "totalAmount": 100,
    "totalBalance": 80,
    "subscriptionAmount": 90,
    "subscriptionBalance": 70,
    "giftAmount": 10,
    "giftBalance": 10,
    "resetAt": None,
}
FAST = RetryPolicy(attempts=3, deadline=5.0, backoff=0.001, backoff_max=0.002)

pytestmark = pytest.mark.anyio


class Script:
    """A MockTransport answering from a list of responses (or exceptions), counting."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def ok() -> httpx.Response:
    return httpx.Response(200, json=BODY)


def make(script: Script, **kw: object) -> CreditGuard:
    kw.setdefault("retry", FAST)
    return CreditGuard(KEY, transport=script.transport, **kw)  # type: ignore[arg-type]


async def read(guard: CreditGuard, mode: str) -> object:
    if mode == "sync":
        return guard.balance()
    return await guard.abalance()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_request_shape(mode: str) -> None:
    script = Script(ok())
    guard = make(script, base_url="https://api.example.test/")
    balance = await read(guard, mode)
    assert balance.total_balance == 80  # type: ignore[attr-defined]
    (req,) = script.requests
    assert req.method == "GET"
    assert str(req.url) == "https://api.example.test/external/credits/balance"
    assert req.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_errors_fail_at_once(mode: str, status: int) -> None:
    script = Script(httpx.Response(status, json={"message": "no"}))
    guard = make(script)
    with pytest.raises(AuthenticationError) as info:
        await read(guard, mode)
    assert info.value.status_code == status
    assert len(script.requests) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_retried_then_ok(mode: str, status: int) -> None:
    script = Script(httpx.Response(status), httpx.Response(status), ok())
    guard = make(script)
    assert (await read(guard, mode)).total_balance == 80  # type: ignore[attr-defined]
    assert len(script.requests) == 3


async def test_5xx_bounded_attempts(mode: str) -> None:
    script = Script(httpx.Response(503))
    guard = make(script)
    with pytest.raises(BalanceUnavailable) as info:
        await read(guard, mode)
    assert info.value.status_code == 503
    assert type(info.value) is BalanceUnavailable
    assert len(script.requests) == 3


async def test_other_4xx_not_retried(mode: str) -> None:
    script = Script(httpx.Response(404))
    with pytest.raises(BalanceUnavailable, match="404"):
        await read(make(script), mode)
    assert len(script.requests) == 1


async def test_connection_errors_retried(mode: str) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), ok())
    assert (await read(make(script), mode)).total_balance == 80  # type: ignore[attr-defined]
    assert len(script.requests) == 3


async def test_connection_errors_exhausted(mode: str) -> None:
    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(BalanceUnavailable, match="ConnectError") as info:
        await read(make(script), mode)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(script.requests) == 3


async def test_429_retry_after_seconds_honoured(mode: str) -> None:
    script = Script(httpx.Response(429, headers={"Retry-After": "0"}), ok())
    assert (await read(make(script), mode)).total_balance == 80  # type: ignore[attr-defined]
    assert len(script.requests) == 2


async def test_429_retry_after_too_long_fails_at_once(mode: str) -> None:
    script = Script(httpx.Response(429, headers={"Retry-After": "120"}))
    start = time.monotonic()
    with pytest.raises(RateLimited) as info:
        await read(make(script), mode)
    assert time.monotonic() - start < 2
    assert info.value.retry_after == 120
    assert info.value.status_code == 429
    assert len(script.requests) == 1


async def test_429_http_date(mode: str) -> None:
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    script = Script(httpx.Response(429, headers={"Retry-After": format_datetime(later, True)}))
    with pytest.raises(RateLimited) as info:
        await read(make(script), mode)
    assert info.value.retry_after is not None
    assert 3500 < info.value.retry_after <= 3600


async def test_429_without_retry_after_backs_off_then_rate_limited(mode: str) -> None:
    script = Script(httpx.Response(429))
    with pytest.raises(RateLimited) as info:
        await read(make(script), mode)
    assert info.value.retry_after is None
    assert len(script.requests) == 3


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b"", b"[]", b'{"totalBalance": "lots"}', b"\xff\xfe", b"null"],
)
async def test_garbage_bodies(mode: str, body: bytes) -> None:
    script = Script(httpx.Response(200, content=body))
    with pytest.raises(InvalidResponse):
        await read(make(script), mode)
    assert len(script.requests) == 1


async def test_undecodable_body_is_invalid_not_retried(mode: str) -> None:
    """A body that fails to decode is not the documented answer: InvalidResponse at
    once, no retry."""
    script = Script(
        httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip at all")
        )
    )
    with pytest.raises(InvalidResponse, match="could not be decoded"):
        await read(make(script), mode)
    assert len(script.requests) == 1


async def test_an_httpx_error_about_the_body_is_invalid_not_retried(mode: str) -> None:
    """An httpx error that is not about the connection is not the documented answer."""
    script = Script(httpx.DecodingError("bad chunk"))
    with pytest.raises(InvalidResponse, match="DecodingError") as info:
        await read(make(script), mode)
    assert isinstance(info.value.__cause__, httpx.DecodingError)
    assert len(script.requests) == 1


# -- compression: the body limit is on the wire ----------------------------------------


def _gzip(size: int, *, wbits: int = 31) -> bytes:
    """``size`` zero bytes, compressed: about a thousand to one."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {
        # What was reported: 200 KB on the wire, 200 MiB inflated.
        "large": _gzip(200 << 20),
        # Under the wire limit, 48 MiB inflated.
        "small": _gzip(48 << 20),
    }


def _peak_during(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def _apeak_during(coro: Callable[[], Awaitable[object]]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        await coro()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_requests_ask_for_no_compression(mode: str) -> None:
    script = Script(ok())
    await read(make(script), mode)
    assert script.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("bomb", ["large", "small"])
async def test_a_gzip_bomb_is_refused_in_bounded_memory(
    mode: str, bomb: str, bombs: dict[str, bytes]
) -> None:
    script = Script(
        httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(bombs[bomb])
        )
    )
    guard = make(script)

    async def attempt() -> None:
        with pytest.raises(InvalidResponse, match="larger than 65536 bytes"):
            await read(guard, mode)

    peak = await _apeak_during(attempt)
    assert peak < 5 << 20, f"{peak / 2**20:.1f} MiB allocated"
    assert len(script.requests) == 1  # not retried


@pytest.mark.parametrize(("coding", "wbits"), [("gzip", 31), ("x-gzip", 31), ("deflate", 15)])
async def test_an_unasked_for_compressed_body_still_reads(
    mode: str, coding: str, wbits: int
) -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = packer.compress(json.dumps(BODY).encode()) + packer.flush()
    script = Script(
        httpx.Response(200, headers={"Content-Encoding": coding}, stream=httpx.ByteStream(body))
    )
    assert (await read(make(script), mode)).total_balance == 80  # type: ignore[attr-defined]


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip", "compress"])
async def test_other_content_encodings_are_refused(mode: str, coding: str) -> None:
    body = httpx.ByteStream(json.dumps(BODY).encode())
    script = Script(httpx.Response(200, headers={"Content-Encoding": coding}, stream=body))
    with pytest.raises(InvalidResponse, match="unsupported Content-Encoding"):
        await read(make(script), mode)


def _bomb_app(body: bytes, seen: list[str]) -> Callable[..., Awaitable[None]]:
    """An ASGI app that answers every request with ``body`` gzip-encoded, whatever the
    request accepts, and records the Accept-Encoding it was sent."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        headers = dict(scope["headers"])
        seen.append(headers.get(b"accept-encoding", b"").decode())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-encoding", b"gzip"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize("bomb", ["large", "small"])
async def test_a_gzip_bomb_over_loopback_http(
    mode: str, bomb: str, bombs: dict[str, bytes]
) -> None:
    seen: list[str] = []
    with serve(_bomb_app(bombs[bomb], seen)) as url:
        guard = CreditGuard(KEY, base_url=url, retry=FAST)
        try:

            async def attempt() -> None:
                with pytest.raises(InvalidResponse, match="larger than 65536 bytes"):
                    await read(guard, mode)

            peak = await _apeak_during(attempt)
        finally:
            await guard.aclose()
    assert seen == ["identity"]
    assert peak < 5 << 20, f"{peak / 2**20:.1f} MiB allocated"


async def test_oversized_body(mode: str) -> None:
    script = Script(httpx.Response(200, content=b" " * (200 * 1024) + json.dumps(BODY).encode()))
    with pytest.raises(InvalidResponse, match="larger"):
        await read(make(script), mode)


async def test_total_time_bounded(mode: str) -> None:
    # Every attempt fails; backoff would exceed the deadline: give up within it.
    script = Script(httpx.ConnectError("refused"))
    policy = RetryPolicy(attempts=50, deadline=0.3, backoff=0.05, backoff_max=0.2)
    start = time.monotonic()
    with pytest.raises(BalanceUnavailable):
        await read(make(script, retry=policy), mode)
    assert time.monotonic() - start < 0.3 + 0.5
    assert 1 < len(script.requests) < 50


async def test_explicit_timeouts_are_passed(mode: str) -> None:
    script = Script(ok())
    guard = make(script, timeout=httpx.Timeout(1.5, connect=0.5))
    await read(guard, mode)
    timeouts = script.requests[0].extensions["timeout"]
    assert timeouts["connect"] == 0.5
    assert timeouts["read"] == 1.5


def test_respx_routes_work_too() -> None:
    with respx.mock(base_url="https://platform.lensmor.com") as router:
        route = router.get("/external/credits/balance").mock(return_value=ok())
        guard = CreditGuard(KEY)
        assert guard.balance().total_balance == 80
        assert route.call_count == 1
        guard.close()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("  7 ", 7.0),
        ("0", 0.0),
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("9" * 400, 1e9),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0


def _leaks(exc: BaseException, needle: str) -> list[str]:
    found = []
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts = [str(e), repr(e), *map(repr, e.args)]
        for attr in ("request", "response"):
            try:
                obj: Callable[[], object] | object = getattr(e, attr)
            except (AttributeError, RuntimeError):
                continue
            if isinstance(obj, httpx.Request):
                texts += [repr(obj), str(obj.headers.raw), *obj.headers.values()]
        found += [t for t in texts if needle in t]
        stack += [e.__cause__, e.__context__]
    return found


@pytest.mark.parametrize(
    "answer",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.Response(401),
        httpx.Response(503),
        httpx.Response(429, headers={"Retry-After": "999"}),
        httpx.Response(200, content=b"nope"),
    ],
)
async def test_key_never_in_errors(mode: str, answer: httpx.Response | Exception) -> None:
    script = Script(answer)
    guard = make(script)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type varies by answer
        await read(guard, mode)
    assert _leaks(info.value, KEY) == []
    assert KEY not in repr(guard)
    assert KEY not in guard.account


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            httpx.ConnectError("refused"),
            "could not reach the credits service at {url} (ConnectError)",
        ),
        (httpx.ReadTimeout("slow"), "the credits service at {url} did not answer in time"),
    ],
)
async def test_transport_errors_name_the_base_url(
    mode: str, error: Exception, message: str
) -> None:
    url = "https://credits.example.test:8443/lensmor"
    script = Script(error)
    with pytest.raises(BalanceUnavailable) as info:
        await read(make(script, base_url=url + "/"), mode)
    assert message.format(url=url) in str(info.value)
    assert KEY not in str(info.value)


# -- Lensmor's error body in the message of the error a failed read raises ---------------------


def api_error(status: int, error_key: str, message: str, **kw: Any) -> httpx.Response:
    """Lensmor's ``ApiError`` answer."""
    body = {"code": status, "message": message, "errorKey": error_key, "traceId": "trace-7f3a"}
    return httpx.Response(status, json=body, **kw)


@pytest.mark.parametrize(
    ("answer", "error", "expected"),
    [
        pytest.param(
            api_error(401, "INVALID_API_KEY", "Invalid API key"),
            AuthenticationError,
            "the credits service rejected the API key (401): INVALID_API_KEY: Invalid API key"
            " (trace id trace-7f3a)",
            id="401",
        ),
        pytest.param(
            api_error(403, "FORBIDDEN", "API access is not enabled"),
            AuthenticationError,
            "the credits service rejected the API key (403): FORBIDDEN: API access is not"
            " enabled (trace id trace-7f3a)",
            id="403",
        ),
        pytest.param(
            api_error(
                429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", headers={"Retry-After": "60"}
            ),
            RateLimited,
            "rate limited by the credits service (429): RATE_LIMIT_EXCEEDED: Rate limit"
            " exceeded (trace id trace-7f3a); retry after 60s",
            id="429-retry-after",
        ),
        pytest.param(
            api_error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded"),
            RateLimited,
            "rate limited by the credits service (429): RATE_LIMIT_EXCEEDED: Rate limit"
            " exceeded (trace id trace-7f3a)",
            id="429",
        ),
        pytest.param(
            api_error(500, "SYSTEM_ERROR", "Internal error"),
            BalanceUnavailable,
            "the credits service answered 500 Internal Server Error: SYSTEM_ERROR: Internal"
            " error (trace id trace-7f3a)",
            id="500",
        ),
        pytest.param(
            api_error(503, "SERVICE_UNAVAILABLE", "Down for maintenance"),
            BalanceUnavailable,
            "the credits service answered 503 Service Unavailable: SERVICE_UNAVAILABLE: Down"
            " for maintenance (trace id trace-7f3a)",
            id="503",
        ),
    ],
)
async def test_errors_carry_lensmors_error_key_message_and_trace_id(
    mode: str, answer: httpx.Response, error: type[Exception], expected: str
) -> None:
    script = Script(answer)
    with pytest.raises(error) as info:
        await read(make(script), mode)
    assert type(info.value) is error
    assert str(info.value) == expected
    assert info.value.status_code == answer.status_code  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503, 502])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html><body>502 Bad Gateway</body></html>", id="html"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"message": "Unauthorized"}', id="not-lensmors"),
        pytest.param(b'["INVALID_API_KEY"]', id="not-an-object"),
    ],
)
async def test_an_error_without_lensmors_body_says_only_its_status(
    mode: str, status: int, body: bytes
) -> None:
    script = Script(httpx.Response(status, content=body))
    with pytest.raises(CreditGuardError) as info:
        await read(make(script), mode)
    reason = httpx.codes.get_reason_phrase(status)
    assert str(info.value) in (
        f"the credits service rejected the API key ({status})",
        "rate limited by the credits service (429)",
        f"the credits service answered {status} {reason}",
    )


async def test_the_trace_id_may_come_as_the_request_id_header(mode: str) -> None:
    body = {"code": 503, "message": "Maintenance", "errorKey": "SERVICE_UNAVAILABLE"}
    script = Script(httpx.Response(503, json=body, headers={"X-Request-ID": "req-42"}))
    with pytest.raises(BalanceUnavailable) as info:
        await read(make(script), mode)
    assert str(info.value).endswith(": SERVICE_UNAVAILABLE: Maintenance (trace id req-42)")


async def test_lensmors_texts_are_cut_and_control_characters_dropped(mode: str) -> None:
    body = {
        "code": 401,
        "message": "Invalid\r\nAPI key\x1b[31m\u202e\x00 " + "m" * 10_000,
        "errorKey": "K" * 1000,
        "traceId": "t\x07" + "t" * 1000,
    }
    script = Script(httpx.Response(401, json=body))
    with pytest.raises(AuthenticationError) as info:
        await read(make(script), mode)
    text = str(info.value)
    assert text.isprintable()
    assert len(text) < 500
    # Each text cut to its length, "..." included: the error key and the trace id to 100
    # characters, the message to 200.
    key, trace = "K" * 97 + "...", "t " + "t" * 95 + "..."
    message = "Invalid API key [31m " + "m" * 176 + "..."
    prefix = "the credits service rejected the API key (401)"
    assert text == f"{prefix}: {key}: {message} (trace id {trace})"


async def test_a_key_the_service_echoes_is_redacted(mode: str) -> None:
    """Whatever Lensmor's error body or headers repeat of the key (a real key is 84
    characters: ``sk_<16 hex>_<64 hex>``) never reaches the error, not even a part of
    one that a cut would leave behind."""
    key = "sk_0123456789abcdef_" + "a1b2c3d4" * 8
    message = f"{key} " * 5 + "z" * 65 + key + " was revoked"  # the last one crosses char 500
    body = {"code": 401, "message": message, "errorKey": f"BAD_KEY_{key}", "traceId": key}
    answer = httpx.Response(401, json=body, headers={"X-Request-ID": key})
    guard = CreditGuard(key, transport=Script(answer).transport, retry=FAST)
    with pytest.raises(AuthenticationError) as info:
        await read(guard, mode)
    text = str(info.value)
    assert "[redacted]" in text
    assert _leaks(info.value, key) == []
    assert key[:10] not in text
    assert "sk_0123" not in text


async def test_an_error_body_inside_a_200_is_named(mode: str) -> None:
    body = {"code": 429, "message": "Too busy", "errorKey": "BUSY", "traceId": "t-200"}
    script = Script(httpx.Response(200, json=body))
    with pytest.raises(InvalidResponse) as info:
        await read(make(script), mode)
    assert str(info.value).endswith(": BUSY: Too busy (trace id t-200)")


def _error_app(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
    """An ASGI app answering every request with ``status``, ``headers`` and ``body``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        length = (b"content-length", str(len(body)).encode())
        await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_an_error_body_streamed_over_loopback_http(mode: str, encoding: str) -> None:
    body = json.dumps(
        {"code": 401, "message": "Invalid API key", "errorKey": "INVALID_API_KEY", "traceId": "t1"}
    ).encode()
    headers = [(b"content-type", b"application/json")]
    if encoding == "gzip":
        body = gzip.compress(body)
        headers.append((b"content-encoding", b"gzip"))
    with serve(_error_app(401, body, headers)) as url:
        guard = CreditGuard(KEY, base_url=url, retry=FAST)
        try:
            with pytest.raises(AuthenticationError) as info:
                await read(guard, mode)
        finally:
            await guard.aclose()
    assert str(info.value).endswith("(401): INVALID_API_KEY: Invalid API key (trace id t1)")


async def test_an_error_body_too_large_is_not_read_for_its_message(mode: str) -> None:
    body = {"code": 503, "message": "x" * 20_000, "errorKey": "BIG", "traceId": "t"}
    content = json.dumps(body).encode()
    with serve(_error_app(503, content, [(b"content-type", b"application/json")])) as url:
        guard = CreditGuard(KEY, base_url=url, retry=RetryPolicy(attempts=1))
        try:
            with pytest.raises(BalanceUnavailable) as info:
                await read(guard, mode)
        finally:
            await guard.aclose()
    assert str(info.value) == "the credits service answered 503 Service Unavailable"


async def test_the_precheck_errors_use_the_same_words(mode: str) -> None:
    """The precheck says what Lensmor's error body says the same way: cut, cleaned, and
    without the key."""
    body = {
        "code": 401,
        "message": f"Invalid API key\n{KEY}",
        "errorKey": "INVALID_API_KEY",
        "traceId": "t-9",
    }
    script = Script(httpx.Response(401, json=body))
    guard = make(script)

    async def precheck() -> object:
        if mode == "sync":
            return guard.precheck("unlock_event_contacts", {"event_id": "1"})
        return await guard.aprecheck("unlock_event_contacts", {"event_id": "1"})

    with pytest.raises(AuthenticationError) as info:
        await precheck()
    assert str(info.value) == (
        "the credits service rejected the API key (401): INVALID_API_KEY: Invalid API key"
        " [redacted] (trace id t-9)"
    )
    assert _leaks(info.value, KEY) == []


# -- rate limits: X-RateLimit-Remaining / X-RateLimit-Reset --------------------------------


def _limited_transport(
    fake: FakeLensmor, reset_in: float, remaining: str = "0"
) -> tuple[httpx.MockTransport, list[int]]:
    """The sandbox's balance, with rate-limit headers saying what is left."""
    sent: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(1)
        body = json.dumps(fake.balance.to_api()).encode()
        return httpx.Response(
            200,
            content=body,
            headers={
                "content-type": "application/json",
                "x-ratelimit-limit": "60",
                "x-ratelimit-remaining": remaining,
                "x-ratelimit-reset": str(int(time.time() + reset_in)),
            },
        )

    return httpx.MockTransport(handler), sent


def test_no_balance_request_while_the_rate_limit_is_used_up(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    transport, sent = _limited_transport(fake, reset_in=120)
    guard = CreditGuard(fake.api_key, transport=transport, ttl=60, backend=new_backend())
    assert guard.balance().total_balance == 30050  # the answer says none are left
    with guard.spend(10):  # the cache still serves within its TTL
        fake.charge(10)
    # ...but the refresh after spending may not call: it fails fast (the action's result
    # stands, the refresh is reported as failed), and so does the next read.
    assert len(sent) == 1
    with pytest.raises(RateLimited) as info:
        guard.balance()
    assert info.value.retry_after is not None
    assert 100 < info.value.retry_after <= 120
    assert len(sent) == 1


async def test_rate_limit_fails_fast_in_async_code_too(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    transport, sent = _limited_transport(fake, reset_in=60)
    guard = CreditGuard(fake.api_key, transport=transport, ttl=0, backend=new_backend())
    await guard.abalance()
    with pytest.raises(RateLimited):
        async with guard.spend(1):
            pytest.fail("must not run: the balance cannot be read")
    assert len(sent) == 1


def test_requests_left_or_no_headers_never_block(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    transport, sent = _limited_transport(fake, reset_in=60, remaining="5")
    guard = CreditGuard(fake.api_key, transport=transport, ttl=0, backend=new_backend())
    for _ in range(3):
        guard.balance()
    assert len(sent) == 3


@pytest.mark.usefixtures("new_backend")
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1030"}, 30.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "900"}, 0.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "99999999"}, 3600.0),
        ({"x-ratelimit-remaining": "1", "x-ratelimit-reset": "1030"}, None),
        ({"x-ratelimit-remaining": "0"}, None),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "soon"}, None),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1e3"}, None),
        ({}, None),
    ],
)
def test_rate_limit_wait(headers: dict[str, str], expected: float | None) -> None:
    assert rate_limit_wait(httpx.Headers(headers), now=1000.0) == expected
