"""What paid calls report about credits (``creditguard.lensmor.reports``): each published shape,
from a decoded body and from an ``httpx.Response``, and every way a report can be wrong."""

from __future__ import annotations

import json
import math
import string
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from creditguard import CreditBalance, InsufficientCredits, InvalidResponse
from creditguard.lensmor.reports import (
    MAX_BODY_BYTES,
    ApiErrorInfo,
    Report,
    describe_api_error,
    is_insufficient_credits,
    parse_api_error,
    parse_report,
    trace_of,
)
from tests.strategies import FUZZ, json_values

# -- the published answers (Lensmor API 0.22 to 0.27) ------------------------------------

EVENT = {"id": "evt_1", "eventId": "26855", "name": "Expo 2026"}
SHORT_AFTER = {  # the 4-field balanceAfter of event and full-access unlocks
    "subscriptionBalance": 28000,
    "permanentBalance": 50,
    "totalBalance": 28050,
    "unlimited": False,
}
WHOLE_AFTER = {  # a whole balance (API 0.24+ shape), as the visitors unlock reports it
    "totalAmount": 36050,
    "totalBalance": 27550,
    "subscriptionAmount": 35000,
    "subscriptionBalance": 27000,
    "addonAmount": 1000,
    "addonBalance": 500,
    "addonExpireAt": 1717200000000,
    "giftAmount": 50,
    "giftBalance": 50,
    "resetAt": 1714521600000,
}
EVENT_UNLOCK = {
    "success": True,
    "alreadyUnlocked": False,
    "creditsUsed": 2000,
    "balanceAfter": SHORT_AFTER,
    "event": EVENT,
}
EVENT_UNLOCK_ALREADY = {  # from 0.24.3: nothing charged, balanceAfter null
    "success": True,
    "alreadyUnlocked": True,
    "creditsUsed": 0,
    "balanceAfter": None,
    "event": EVENT,
}
EVENT_UNLOCK_ALREADY_022 = {**EVENT_UNLOCK_ALREADY, "balanceAfter": SHORT_AFTER}  # required
VISITORS_UNLOCK = {
    "success": True,
    "alreadyUnlocked": False,
    "creditsSpent": 3000,
    "balanceAfter": WHOLE_AFTER,
    "event": EVENT,
}
VISITORS_UNLOCK_ALREADY = {**VISITORS_UNLOCK, "alreadyUnlocked": True, "creditsSpent": 0}
VISITORS_UNLOCK_ALREADY["balanceAfter"] = None
FULL_ACCESS_UNLOCK = {
    "success": True,
    "alreadyUnlocked": False,
    "eventUnlocked": True,
    "visitorUnlocked": True,
    "visitorSkipped": False,
    "totalCreditsUsed": 5000,
    "balanceAfter": SHORT_AFTER,
    "event": EVENT,
}
FULL_ACCESS_UNLOCK_ALREADY = {
    **FULL_ACCESS_UNLOCK,
    "alreadyUnlocked": True,
    "eventUnlocked": False,
    "visitorUnlocked": False,
    "totalCreditsUsed": 0,
    "balanceAfter": None,
}
FULL_ACCESS_UNLOCK_BARE_TOTAL = {**FULL_ACCESS_UNLOCK, "balanceAfter": 28050}  # older version

# Answers with no credit figure at all.
EXHIBITOR_SEARCH = {
    "items": [{"id": "ex_1", "companyName": "Acme", "creditsUsedByPeers": "n/a"}],
    "total": 1,
    "page": 1,
    "pageSize": 20,
}
CONTACT_UNLOCK_ACCEPTED = {
    "status": "accepted",
    "task_id": "321",
    "job_id": "321",
    "skipped_personnel_ids": ["790"],
    "skipped_detail": {"already_unlocked_personnel_ids": ["790"]},
}
CONTACT_UNLOCK_NOTHING_TO_DO = {"status": "success", "skipped_personnel_ids": ["789"]}
CONTACT_UNLOCK_TASK = {
    "taskId": "321",
    "taskStatus": "completed",
    "items": [{"personnelId": "789", "status": "unlocked", "email": "a@example.com"}],
}

INSUFFICIENT = {
    "code": 402,
    "message": "Insufficient credits",
    "errorKey": "INSUFFICIENT_CREDITS",
    "traceId": "trace-402",
}
CONCURRENCY_LIMIT = {  # API 0.27: inside an HTTP 200
    "code": 429,
    "message": "Another search is in progress",
    "errorKey": "USER_CONCURRENCY_LIMIT_EXCEEDED",
    "data": None,
    "details": None,
    "traceId": "trace-409",
}
SECRET = "sk_0123456789abcdef_" + "f" * 64


def _short(charged: int | None, already_unlocked: bool | None = None) -> Report:
    """The report of an answer whose balanceAfter is SHORT_AFTER."""
    return Report(
        charged,
        total_after=28050,
        subscription_after=28000,
        permanent_after=50,
        unlimited=False,
        already_unlocked=already_unlocked,
    )


PUBLISHED = [
    pytest.param(EVENT_UNLOCK, _short(2000, False), id="event"),
    pytest.param(EVENT_UNLOCK_ALREADY, Report(0, already_unlocked=True), id="event-already"),
    pytest.param(
        EVENT_UNLOCK_ALREADY_022,
        _short(0, True),
        id="event-already-0.22",
    ),
    pytest.param(
        VISITORS_UNLOCK,
        Report(
            3000,
            27550,
            CreditBalance.from_api(WHOLE_AFTER),
            subscription_after=27000,
            already_unlocked=False,
        ),
        id="visitors",
    ),
    pytest.param(VISITORS_UNLOCK_ALREADY, Report(0, already_unlocked=True), id="visitors-already"),
    pytest.param(FULL_ACCESS_UNLOCK, _short(5000, False), id="full-access"),
    pytest.param(
        FULL_ACCESS_UNLOCK_ALREADY, Report(0, already_unlocked=True), id="full-access-already"
    ),
    pytest.param(
        FULL_ACCESS_UNLOCK_BARE_TOTAL,
        Report(5000, 28050, already_unlocked=False),
        id="full-access-bare-total",
    ),
]
NO_FIGURES = [
    pytest.param(EXHIBITOR_SEARCH, id="exhibitor-search"),
    pytest.param(CONTACT_UNLOCK_ACCEPTED, id="contact-unlock-accepted"),
    pytest.param(CONTACT_UNLOCK_NOTHING_TO_DO, id="contact-unlock-success"),
    pytest.param(CONTACT_UNLOCK_TASK, id="contact-unlock-task"),
    pytest.param({}, id="empty"),
    pytest.param({"balanceAfter": None, "alreadyUnlocked": True}, id="null-balance-only"),
    pytest.param(INSUFFICIENT, id="error-body"),
]


def _response(body: object, status: int = 201, **kwargs: Any) -> httpx.Response:
    request = httpx.Request(
        "POST",
        "https://platform.lensmor.com/external/events/26855/unlock",
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    content = json.dumps(body).encode()  # NaN and infinities as Python writes them
    return httpx.Response(status, content=content, headers=headers, request=request, **kwargs)


def _as_dict(body: Any) -> Any:
    return body


def _as_proxy(body: Any) -> Any:
    return MappingProxyType(body)


def _as_response(body: Any) -> Any:
    return _response(body)


def _as_unread_bytes(body: Any) -> Any:  # an in-memory body not read yet: no I/O to read it
    return httpx.Response(201, stream=httpx.ByteStream(json.dumps(body).encode()))


SOURCES = [
    pytest.param(_as_dict, id="dict"),
    pytest.param(_as_proxy, id="mapping"),
    pytest.param(_as_response, id="response"),
    pytest.param(_as_unread_bytes, id="in-memory-stream"),
]


# -- the published shapes ----------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("body", "expected"), PUBLISHED)
def test_published_shapes(
    body: dict[str, Any], expected: Report, source: Callable[[Any], Any]
) -> None:
    assert parse_report(source(body)) == expected


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("body", NO_FIGURES)
def test_no_credit_figures_is_none(body: dict[str, Any], source: Callable[[Any], Any]) -> None:
    assert parse_report(source(body)) is None


def test_the_whole_balance_reported_keeps_its_shape() -> None:
    report = parse_report(VISITORS_UNLOCK)
    assert report is not None
    assert report.balance_after is not None
    assert report.balance_after.to_api() == WHOLE_AFTER
    assert report.balance_after.addon_expire_at == datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert report.permanent_after is None  # not part of a whole balance


def test_whole_floats_are_counts() -> None:
    body = {
        **EVENT_UNLOCK,
        "creditsUsed": 2000.0,
        "balanceAfter": {k: float(v) if k != "unlimited" else v for k, v in SHORT_AFTER.items()},
    }
    report = parse_report(body)
    assert report == _short(2000, False)
    assert report is not None
    assert type(report.charged) is int
    assert type(report.total_after) is int
    bare = parse_report({**FULL_ACCESS_UNLOCK, "balanceAfter": 28050.0})
    assert bare is not None
    assert type(bare.total_after) is int


def test_extra_properties_are_allowed() -> None:
    after = {**SHORT_AFTER, "currency": "credits", "nested": {"x": [1]}}
    body = {**EVENT_UNLOCK, "balanceAfter": after, "requestId": "r-1", "meta": [1, 2]}
    assert parse_report(body) == parse_report(EVENT_UNLOCK)


def test_an_addon_balance_among_the_extra_properties_counts_in_the_buckets() -> None:
    after = {**SHORT_AFTER, "addonBalance": 500, "totalBalance": 28550}
    report = parse_report({**EVENT_UNLOCK, "balanceAfter": after})
    assert report is not None
    assert report.total_after == 28550


def test_unlimited_may_be_absent_or_true() -> None:
    after = {k: v for k, v in SHORT_AFTER.items() if k != "unlimited"}
    report = parse_report({**EVENT_UNLOCK, "balanceAfter": after})
    assert report is not None
    assert report.unlimited is None
    report = parse_report({**EVENT_UNLOCK, "balanceAfter": {**SHORT_AFTER, "unlimited": True}})
    assert report is not None
    assert report.unlimited is True


def test_a_balance_without_a_charge_figure() -> None:
    report = parse_report({"balanceAfter": SHORT_AFTER})
    assert report == _short(None)


def test_the_same_charge_named_twice() -> None:
    report = parse_report({**EVENT_UNLOCK, "creditsSpent": 2000})
    assert report is not None
    assert report.charged == 2000


@pytest.mark.parametrize(
    "result",
    [None, "creditsUsed", 2000, 2000.0, True, [EVENT_UNLOCK], b'{"creditsUsed": 1}', object()],
)
def test_results_that_are_not_an_object_are_none(result: object) -> None:
    assert parse_report(result) is None


# -- responses -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_is_parsed(status: int) -> None:
    assert parse_report(_response(EVENT_UNLOCK, status)) == parse_report(EVENT_UNLOCK)


@pytest.mark.parametrize("status", [301, 400, 402, 409, 429, 500])
def test_a_response_that_is_not_2xx_is_none(status: int) -> None:
    assert parse_report(_response(EVENT_UNLOCK, status)) is None


@pytest.mark.parametrize(
    "content",
    [b"", b"<html>502</html>", b"[1, 2]", b'"creditsUsed"', b"\xff\xfe", b"[" * 100_000],
)
def test_a_body_that_is_not_a_json_object_is_none(content: bytes) -> None:
    assert parse_report(httpx.Response(201, content=content)) is None


def test_a_body_too_large_is_not_parsed() -> None:
    body = {**EVENT_UNLOCK, "padding": "x" * MAX_BODY_BYTES}
    assert parse_report(_response(body)) is None
    assert parse_report(body) is not None  # the decoded object has no size to speak of


class _Stream(httpx.SyncByteStream):
    """A body still to come from the network: it records whether it was read."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.read = False

    def __iter__(self) -> Iterator[bytes]:
        self.read = True
        yield self.content


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, content: bytes) -> None:
        self.content = content
        self.read = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.read = True
        yield self.content


def test_a_streamed_body_is_never_consumed() -> None:
    content = json.dumps(EVENT_UNLOCK).encode()
    stream = _Stream(content)
    response = httpx.Response(201, stream=stream)
    assert parse_report(response) is None
    assert parse_api_error(response) is None
    assert not stream.read
    assert response.read() == content  # the caller can still read it
    assert parse_report(response) == parse_report(EVENT_UNLOCK)  # and now it is in memory


def test_an_async_streamed_body_is_never_consumed() -> None:
    stream = _AsyncStream(json.dumps(EVENT_UNLOCK).encode())
    response = httpx.Response(201, stream=stream)
    assert parse_report(response) is None
    assert not stream.read


def test_through_a_client() -> None:
    content = json.dumps(EVENT_UNLOCK).encode()
    streams: list[_Stream] = []

    def answer(request: httpx.Request) -> httpx.Response:
        streams.append(_Stream(content))  # as a body arriving from the network
        return httpx.Response(201, stream=streams[-1], headers={"X-Request-ID": "r-1"})

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        url = "https://platform.lensmor.com/external/events/26855/unlock"
        assert parse_report(client.post(url)) == parse_report(EVENT_UNLOCK)
        with client.stream("POST", url) as response:
            assert parse_report(response) is None  # not read: left to the caller
            assert not streams[-1].read
            response.read()
            assert parse_report(response) == parse_report(EVENT_UNLOCK)


def test_a_compressed_body_is_parsed_once_decoded() -> None:
    import gzip

    response = httpx.Response(
        201,
        content=gzip.compress(json.dumps(EVENT_UNLOCK).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert parse_report(response) == parse_report(EVENT_UNLOCK)


# -- reports of the wrong shape ------------------------------------------------------------

BAD_COUNTS = [-1, -2000.0, 1.5, 0.1, math.nan, math.inf, -math.inf, "2000", True, None, [], {}]


@pytest.mark.parametrize("source", [_as_dict, _as_response])
@pytest.mark.parametrize("bad", BAD_COUNTS)
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (EVENT_UNLOCK, "creditsUsed"),
        (VISITORS_UNLOCK, "creditsSpent"),
        (FULL_ACCESS_UNLOCK, "totalCreditsUsed"),
    ],
)
def test_bad_charge(
    body: dict[str, Any], field: str, bad: Any, source: Callable[[Any], Any]
) -> None:
    with pytest.raises(InvalidResponse, match=field):
        parse_report(source({**body, field: bad}))


@pytest.mark.parametrize("source", [_as_dict, _as_response])
@pytest.mark.parametrize("bad", BAD_COUNTS[:-2])
@pytest.mark.parametrize("field", ["totalBalance", "subscriptionBalance", "permanentBalance"])
def test_bad_short_balance_figure(field: str, bad: Any, source: Callable[[Any], Any]) -> None:
    after = {**SHORT_AFTER, field: bad}
    with pytest.raises(InvalidResponse, match=f"balanceAfter.*{field}"):
        parse_report(source({**EVENT_UNLOCK, "balanceAfter": after}))


@pytest.mark.parametrize("field", ["totalBalance", "subscriptionBalance", "permanentBalance"])
def test_short_balance_missing_figure(field: str) -> None:
    after = {k: v for k, v in SHORT_AFTER.items() if k != field}
    with pytest.raises(InvalidResponse, match=field):
        parse_report({**FULL_ACCESS_UNLOCK, "balanceAfter": after})


@pytest.mark.parametrize(
    "after",
    [
        {**SHORT_AFTER, "totalBalance": 28051},
        {**SHORT_AFTER, "totalBalance": 28049},
        {**SHORT_AFTER, "permanentBalance": 0},
        {**SHORT_AFTER, "addonBalance": 500},  # counted, so the total is 500 short
    ],
)
@pytest.mark.parametrize("body", [EVENT_UNLOCK, FULL_ACCESS_UNLOCK])
def test_short_balance_buckets_disagree_with_the_total(
    body: dict[str, Any], after: dict[str, Any]
) -> None:
    with pytest.raises(InvalidResponse, match="add up"):
        parse_report({**body, "balanceAfter": after})


def test_whole_balance_buckets_disagree_with_the_total() -> None:
    after = {**WHOLE_AFTER, "totalBalance": WHOLE_AFTER["totalBalance"] + 1}
    with pytest.raises(InvalidResponse, match="add up"):
        parse_report({**VISITORS_UNLOCK, "balanceAfter": after})


@pytest.mark.parametrize(
    ("field", "bad"),
    [("giftBalance", "50"), ("addonBalance", -1), ("resetAt", 1.5), ("totalBalance", None)],
)
def test_whole_balance_of_the_wrong_shape(field: str, bad: Any) -> None:
    after = {**WHOLE_AFTER, field: bad}
    with pytest.raises(InvalidResponse, match=f"balanceAfter.*{field}"):
        parse_report({**VISITORS_UNLOCK, "balanceAfter": after})


@pytest.mark.parametrize("bad", ["28050", True, False, [SHORT_AFTER], -1, 1.5, math.nan])
def test_balance_after_of_the_wrong_type(bad: Any) -> None:
    with pytest.raises(InvalidResponse, match="balanceAfter"):
        parse_report({**EVENT_UNLOCK, "balanceAfter": bad})


def test_unlimited_of_the_wrong_type() -> None:
    with pytest.raises(InvalidResponse, match="unlimited"):
        parse_report({**EVENT_UNLOCK, "balanceAfter": {**SHORT_AFTER, "unlimited": "no"}})


@pytest.mark.parametrize("bad", ["yes", 1, 0, [], {}])
def test_already_unlocked_of_the_wrong_type(bad: Any) -> None:
    with pytest.raises(InvalidResponse, match="alreadyUnlocked"):
        parse_report({**EVENT_UNLOCK, "alreadyUnlocked": bad})


@pytest.mark.parametrize("source", [_as_dict, _as_response])
@pytest.mark.parametrize("huge", [2**53, float(2**53), 2**64])
@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({**EVENT_UNLOCK, "creditsUsed": None}, "creditsUsed"),
        ({**VISITORS_UNLOCK, "creditsSpent": None}, "creditsSpent"),
        ({**FULL_ACCESS_UNLOCK, "totalCreditsUsed": None}, "totalCreditsUsed"),
        ({**FULL_ACCESS_UNLOCK, "balanceAfter": None}, "balanceAfter"),
        ({**EVENT_UNLOCK, "balanceAfter": {**SHORT_AFTER, "totalBalance": None}}, "totalBalance"),
        ({**VISITORS_UNLOCK, "balanceAfter": {**WHOLE_AFTER, "totalAmount": None}}, "totalAmount"),
    ],
)
def test_a_figure_beyond_2_to_the_53_is_out_of_range(
    body: dict[str, Any], where: str, huge: int | float, source: Callable[[Any], Any]
) -> None:
    """Past 2**53 - 1 a double (the Redis backend's Lua) is not exact: refused here, so
    no backend ever sees it."""

    def put(data: Any) -> Any:
        if isinstance(data, dict):
            return {k: huge if v is None and k == where else put(v) for k, v in data.items()}
        return data

    with pytest.raises(InvalidResponse, match=f"{where}.*out of range"):
        parse_report(source(put(body)))


def test_the_largest_figure_a_double_holds_exactly_is_a_figure() -> None:
    report = parse_report({"totalCreditsUsed": 2**53 - 1, "balanceAfter": 0})
    assert report is not None
    assert report.charged == 2**53 - 1


def test_two_charge_figures_that_disagree() -> None:
    with pytest.raises(InvalidResponse, match="disagree"):
        parse_report({**EVENT_UNLOCK, "totalCreditsUsed": 4000})


def test_invalid_response_is_a_balance_unavailable() -> None:
    from creditguard import BalanceUnavailable, CreditGuardError

    with pytest.raises(InvalidResponse) as info:
        parse_report({**EVENT_UNLOCK, "creditsUsed": -5})
    assert isinstance(info.value, BalanceUnavailable)
    assert isinstance(info.value, CreditGuardError)


# -- error bodies ----------------------------------------------------------------------------


def test_error_body_from_a_dict() -> None:
    info = parse_api_error(INSUFFICIENT)
    assert info == ApiErrorInfo(
        "INSUFFICIENT_CREDITS", "Insufficient credits", "trace-402", 402, None
    )
    assert str(info) == "INSUFFICIENT_CREDITS: Insufficient credits (trace id trace-402)"


def test_error_body_from_a_response_and_from_its_error() -> None:
    response = _response(INSUFFICIENT, 402, headers={"X-Request-ID": "header-id"})
    info = parse_api_error(response)
    assert info is not None
    assert (info.status_code, info.code, info.error_key) == (402, 402, "INSUFFICIENT_CREDITS")
    assert info.trace_id == "trace-402"  # the body's trace id first
    error = httpx.HTTPStatusError("402", request=response.request, response=response)
    assert parse_api_error(error) == info


def test_trace_id_from_the_header() -> None:
    body = {k: v for k, v in INSUFFICIENT.items() if k != "traceId"}
    info = parse_api_error(_response(body, 402, headers={"X-Request-ID": "header-id"}))
    assert info is not None
    assert info.trace_id == "header-id"
    assert parse_api_error(body) == ApiErrorInfo(
        "INSUFFICIENT_CREDITS", "Insufficient credits", None, 402
    )


def test_details_are_kept_but_not_printed() -> None:
    body = {**INSUFFICIENT, "errorKey": "INVALID_REQUEST", "details": {"field": "event_id"}}
    info = parse_api_error(body)
    assert info is not None
    assert info.details == {"field": "event_id"}
    assert "event_id" not in str(info)
    assert "event_id" not in repr(info)


def test_an_error_inside_a_200() -> None:
    info = parse_api_error(_response(CONCURRENCY_LIMIT, 200))
    assert info is not None
    assert (info.status_code, info.error_key) == (200, "USER_CONCURRENCY_LIMIT_EXCEEDED")
    assert parse_report(_response(CONCURRENCY_LIMIT, 200)) is None


@pytest.mark.parametrize(
    "body",
    [None, [], "error", 402, {}, {"traceId": "t"}, {"details": {"x": 1}}, EVENT_UNLOCK],
)
def test_not_an_error_body(body: Any) -> None:
    assert parse_api_error(body) is None
    assert parse_api_error(_response(body, 400)) is None


@pytest.mark.parametrize("content", [b"", b"<html>Bad Gateway</html>", b"\x00\xff"])
def test_an_error_response_without_a_json_body(content: bytes) -> None:
    assert parse_api_error(httpx.Response(502, content=content)) is None


def test_error_fields_of_unexpected_types_are_dropped_not_raised() -> None:
    body = {"code": True, "message": ["x"], "errorKey": 7, "traceId": {"id": 1}}
    assert parse_api_error(body) is None
    info = parse_api_error({**body, "errorKey": "STATE_CONFLICT", "code": "E409"})
    assert info == ApiErrorInfo("STATE_CONFLICT", None, None, "E409")
    assert str(info) == "STATE_CONFLICT"


def test_long_texts_are_cut() -> None:
    info = parse_api_error({**INSUFFICIENT, "message": "m" * 10_000, "traceId": "t" * 10_000})
    assert info is not None
    assert info.message == "m" * 500
    assert info.trace_id == "t" * 500


def test_the_api_key_never_appears() -> None:
    """The request (and its Authorization header) rides along with every response and
    HTTPStatusError; nothing built from them carries it."""
    response = _response(INSUFFICIENT, 402, headers={"X-Request-ID": "header-id"})
    assert SECRET in response.request.headers["Authorization"]
    error = httpx.HTTPStatusError("Payment Required", request=response.request, response=response)
    info = parse_api_error(error)
    assert info is not None
    report = parse_report(_response(EVENT_UNLOCK))
    for text in (str(info), repr(info), repr(report)):
        assert SECRET not in text
        assert "Bearer" not in text
    assert str(info) == "INSUFFICIENT_CREDITS: Insufficient credits (trace id trace-402)"


# -- is_insufficient_credits -----------------------------------------------------------------


def _status_error(status: int, body: object = None, **kwargs: Any) -> httpx.HTTPStatusError:
    """The error ``raise_for_status()`` raises: a JSON ``body``, or ``content=``/``stream=``."""
    if kwargs:
        request = httpx.Request("POST", "https://platform.lensmor.com/external/x")
        response = httpx.Response(status, request=request, **kwargs)
    else:
        response = _response(body, status)
    return httpx.HTTPStatusError(str(status), request=response.request, response=response)


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(_status_error(402, INSUFFICIENT), id="402"),
        pytest.param(_status_error(402, None), id="402-no-body"),
        pytest.param(_status_error(402, stream=_Stream(b"{}")), id="402-streamed"),
        pytest.param(_status_error(400, INSUFFICIENT), id="400-with-the-key"),
        pytest.param(_status_error(409, {**INSUFFICIENT, "code": 409}), id="409-with-the-key"),
    ],
)
def test_insufficient_credits(exc: BaseException) -> None:
    assert is_insufficient_credits(exc)


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(_status_error(401, {**INSUFFICIENT, "errorKey": "INVALID_API_KEY"}), id="401"),
        pytest.param(_status_error(409, {**INSUFFICIENT, "errorKey": "STATE_CONFLICT"}), id="409"),
        pytest.param(_status_error(429, CONCURRENCY_LIMIT), id="429"),
        pytest.param(_status_error(500, content=b"oops"), id="500"),
        pytest.param(
            _status_error(400, stream=_Stream(json.dumps(INSUFFICIENT).encode())),
            id="400-streamed",
        ),
        pytest.param(ValueError("402 INSUFFICIENT_CREDITS"), id="other-error"),
        pytest.param(InsufficientCredits(10, 5), id="creditguard-refusal"),
        pytest.param(httpx.ConnectError("down"), id="transport-error"),
        pytest.param(KeyboardInterrupt(), id="base-exception"),
    ],
)
def test_not_insufficient_credits(exc: BaseException) -> None:
    assert not is_insufficient_credits(exc)


class AppError(Exception):
    """An application's own error, raised while handling Lensmor's."""


def _raise_app_error(explicit_cause: bool) -> None:
    try:
        raise _status_error(402, INSUFFICIENT)
    except httpx.HTTPStatusError as exc:
        if explicit_cause:
            raise AppError("could not unlock") from exc
        raise AppError("a bug while handling it") from None


@pytest.mark.parametrize("explicit_cause", [True, False])
def test_an_error_raised_from_a_402_counts(explicit_cause: bool) -> None:
    with pytest.raises(AppError) as info:
        _raise_app_error(explicit_cause)
    assert is_insufficient_credits(info.value) is explicit_cause


def test_a_cycle_of_causes_ends() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_insufficient_credits(a)


# -- fuzzing -------------------------------------------------------------------------------

BALANCE_KEYS = (*SHORT_AFTER, *WHOLE_AFTER)
near_balance = st.dictionaries(
    st.sampled_from(BALANCE_KEYS) | st.text(max_size=8),
    json_values | st.integers(min_value=0, max_value=10**6),
    max_size=12,
)
near_report = st.dictionaries(
    st.sampled_from(
        ("creditsUsed", "creditsSpent", "totalCreditsUsed", "alreadyUnlocked", "balanceAfter")
    )
    | st.text(max_size=8),
    json_values | near_balance | st.integers(min_value=0, max_value=10**6),
    max_size=8,
)
# Published answers with one value anywhere in them replaced.
published = st.sampled_from(
    [EVENT_UNLOCK, EVENT_UNLOCK_ALREADY, VISITORS_UNLOCK, FULL_ACCESS_UNLOCK]
)


@st.composite
def one_value_changed(draw: st.DrawFn) -> dict[str, Any]:
    body = json.loads(json.dumps(draw(published)))
    target = body
    if isinstance(body.get("balanceAfter"), dict) and draw(st.booleans()):
        target = body["balanceAfter"]
    key = draw(st.sampled_from(sorted(target)))
    target[key] = draw(json_values)
    return dict(body)


def _parse(result: object) -> Report | None:
    try:
        report = parse_report(result)
    except InvalidResponse:
        return None
    if report is not None:
        for figure in (report.charged, report.total_after, report.subscription_after):
            assert figure is None or (type(figure) is int and 0 <= figure <= 2**53 - 1)
    return report


@FUZZ
@given(json_values | near_report | one_value_changed())
@example({"balanceAfter": {"totalAmount": 1}})
@example({"creditsUsed": 10**400})
@example({"balanceAfter": []})
def test_parse_report_raises_only_invalid_response(data: Any) -> None:
    _parse(data)
    _parse(MappingProxyType(data) if isinstance(data, dict) else data)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        (json_values | near_report | one_value_changed()).map(lambda v: json.dumps(v).encode()),
    ),
    st.sampled_from([200, 201, 402, 500]),
)
@example(b"[" * 200_000, 201)
@example(b'{"creditsUsed": 1' + b"0" * 5000 + b"}", 201)
def test_parse_report_of_any_response_raises_only_invalid_response(
    content: bytes, status: int
) -> None:
    response = httpx.Response(status, content=content)
    _parse(response)
    info = parse_api_error(response)
    assert info is None or isinstance(str(info), str)
    assert isinstance(
        is_insufficient_credits(_status_error(status, stream=httpx.ByteStream(content))), bool
    )


@FUZZ
@given(json_values | near_report)
def test_parse_api_error_never_raises(data: Any) -> None:
    info = parse_api_error(data)
    if info is not None:
        assert str(info)
        for text in (info.error_key, info.message, info.trace_id):
            assert text is None or (isinstance(text, str) and 0 < len(text) <= 500)


@FUZZ
@given(json_values, st.lists(st.text(max_size=300), min_size=1, max_size=4), st.text(max_size=9))
def test_describe_api_error_is_short_printable_and_never_shows_the_key(
    data: Any, pieces: list[str], header: str
) -> None:
    """Whatever the body (any JSON; or an error body whose texts hold the key, whole, between
    any text), the description is printable, bounded, and shows no part of the key."""
    key = "sk_0123456789abcdef_" + "e" * 64
    text = key.join(pieces)
    short = key.join(piece[:20] for piece in pieces)
    error = {"code": 401, "errorKey": short, "message": text, "traceId": key.join(pieces[::-1])}
    headers = {"x-request-id": header + key}
    for body in (json.dumps(data).encode(), json.dumps(error).encode()):
        said = describe_api_error(body, headers, secret=key)
        assert said == "" or said.isprintable()
        assert len(said) <= 100 + 2 + 200 + len(" (trace id )") + 100
        assert key[:12] not in said


@FUZZ
@given(
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=0, max_value=10**12),
    st.sampled_from(["creditsUsed", "totalCreditsUsed"]),
    st.booleans(),
)
def test_every_consistent_short_report_parses(
    charged: int, subscription: int, permanent: int, field: str, as_float: bool
) -> None:
    number: Callable[[int], int | float] = float if as_float else int
    after = {
        "subscriptionBalance": number(subscription),
        "permanentBalance": number(permanent),
        "totalBalance": number(subscription + permanent),
        "unlimited": False,
    }
    report = parse_report({field: number(charged), "balanceAfter": after})
    assert report == Report(
        charged,
        subscription + permanent,
        subscription_after=subscription,
        permanent_after=permanent,
        unlimited=False,
    )


KEY = "sk_0123456789abcdef_" + "a1b2c3d4" * 8  # a real key's shape: 84 characters
TRACE_TEXT = string.ascii_letters + string.digits + "-_.:/"  # what a header can carry as is


@FUZZ
@given(
    st.text(alphabet=TRACE_TEXT, max_size=600),
    st.text(alphabet=TRACE_TEXT, max_size=40),
    st.sampled_from(["body", "header", "json"]),
)
@example("t" * 495, "", "body")  # the key crosses the 500-character cut
@example("t" * 499, "-tail", "header")
def test_a_trace_id_that_echoes_the_key_is_dropped_whole(
    before: str, after: str, where: str
) -> None:
    """Wherever the key sits in what Lensmor gives as a trace id, even where the cut to
    500 characters would leave only its first characters, none of it is kept."""
    echoed = before + KEY + after
    if where == "body":
        outcome: object = _response({"creditsUsed": 1, "traceId": echoed}, 200)
    elif where == "header":
        outcome = _response({"creditsUsed": 1}, 200, headers={"X-Request-ID": echoed})
    else:
        outcome = {"traceId": echoed}
    assert trace_of(outcome, KEY) is None
    # Without the secret the trace id is kept, cut to 500 characters.
    kept = trace_of(outcome)
    assert kept == echoed[:500]


def test_a_trace_id_without_the_key_is_kept() -> None:
    outcome = _response(
        {"creditsUsed": 1, "traceId": "trace-1"}, 200, headers={"X-Request-ID": "r"}
    )
    assert trace_of(outcome, KEY) == "trace-1"
    assert trace_of(_response({"creditsUsed": 1}, 200, headers={"X-Request-ID": "r"}), KEY) == "r"
    assert trace_of({"traceId": "x" * 900}, KEY) == "x" * 500
