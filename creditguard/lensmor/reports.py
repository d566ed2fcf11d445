"""What Lensmor's paid calls say about the credits they used, and its error bodies.

Pure parsing: no I/O (a response body is used only when it is already in memory) and no
knowledge of the guard. The shapes, as published:

* event unlock (``POST /external/events/{id}/unlock``): ``creditsUsed`` and
  ``balanceAfter``, an object ``{subscriptionBalance, permanentBalance, totalBalance,
  unlimited}`` (more properties allowed), or ``null`` when nothing was charged;
* visitors unlock (``POST /external/events/{id}/visitors/unlock``, API 0.24+):
  ``creditsSpent`` and ``balanceAfter``, a whole balance object (the shape of
  ``GET /external/credits/balance``), or ``null``;
* full-access unlock (``POST /external/events/{id}/full-access/unlock``, API 0.24+):
  ``totalCreditsUsed`` and ``balanceAfter`` as for the event unlock; one older published
  version types ``balanceAfter`` as a bare number, the total balance.

Other answers (exhibitor searches, contact unlock task submissions) carry no credit
figures. Errors come as ``{code, message, errorKey, traceId, details?}``.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Mapping
from typing import Any

import httpx

from creditguard.core.balance import CreditBalance, _count
from creditguard.core.errors import InvalidResponse
from creditguard.core.models import Report

__all__ = [
    "MAX_BODY_BYTES",
    "ApiErrorInfo",
    "Report",
    "describe_api_error",
    "is_insufficient_credits",
    "parse_api_error",
    "parse_report",
    "trace_of",
]

MAX_BODY_BYTES = 1 << 20
"""Bodies larger than this (1 MiB) are not parsed: an answer about credits is small."""

# The fields naming what a call charged, by operation: event, visitors, full-access unlock.
_CHARGED_FIELDS = ("creditsUsed", "creditsSpent", "totalCreditsUsed")
_MAX_TEXT = 500  # longest errorKey, message or traceId kept from an error body
_CAUSES = 8  # how far is_insufficient_credits follows ``raise ... from``
_SAID_MESSAGE = 200  # characters of Lensmor's error message an exception repeats
_SAID_FIELD = 100  # characters of its errorKey and traceId
_REDACTED = "[redacted]"
# Control and format characters (and line or paragraph separators) must not reach a log
# line as they are: each becomes a space.
_UNPRINTABLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


@dataclasses.dataclass(frozen=True, slots=True)
class ApiErrorInfo:
    """A Lensmor error body: ``{code, message, errorKey, traceId, details?}``.

    Every field is ``None`` when absent or of an unexpected type; texts longer than 500
    characters are cut. ``trace_id`` falls back to the ``X-Request-ID`` response header.
    ``status_code`` is the HTTP status, when parsed from a response. ``details`` is the
    optional structured context (API 0.27), as sent; it is left out of ``str()``, which
    carries only the error key, the message and the trace id.
    """

    error_key: str | None
    message: str | None = None
    trace_id: str | None = None
    code: int | str | None = None
    status_code: int | None = None
    details: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        text = self.error_key or "error"
        if self.message:
            text += f": {self.message}"
        if self.trace_id:
            text += f" (trace id {self.trace_id})"
        return text


def _body_of(response: httpx.Response) -> object:
    """The decoded JSON of a response whose body is in memory; ``None`` otherwise (not read
    yet and not in memory, too large, not JSON)."""
    try:
        content = response.content
    except httpx.ResponseNotRead:
        if not isinstance(response.stream, httpx.ByteStream):
            return None  # a body still to come from the network: never read it here
        content = response.read()  # in memory already: reading it is no I/O
    if len(content) > MAX_BODY_BYTES:
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


def parse_report(result: object) -> Report | None:
    """What a paid call's answer says about credits, or ``None`` when it says nothing.

    ``result`` is an ``httpx.Response`` or its decoded JSON (a ``Mapping``). A response is
    parsed only when it is a 2xx whose body is in memory (read already, or built from
    bytes) and is a JSON object of at most :data:`MAX_BODY_BYTES`; a streamed body not read
    yet is never consumed (``None`` then). Anything else (a non-2xx response, a body that is
    not a JSON object, any other type) gives ``None``, and so does an object without any
    credit figure (no ``creditsUsed``, ``creditsSpent``, ``totalCreditsUsed``, nor a
    non-null ``balanceAfter``): exhibitor searches, contact unlock submissions.

    Raises :class:`InvalidResponse` for credit figures of the wrong shape: a count that is
    not a whole number from 0 to 2**53 - 1, a ``balanceAfter`` that is neither null, a number nor
    an object, one without its required fields, or whose buckets do not add up to its
    ``totalBalance`` (``subscriptionBalance + permanentBalance``, plus ``addonBalance``
    when that is among its extra properties; for a whole balance, its three buckets).
    Fields this version does not know are ignored.
    """
    if isinstance(result, httpx.Response):
        if not result.is_success:
            return None
        result = _body_of(result)
    if not isinstance(result, Mapping):
        return None
    charged = None
    for field in _CHARGED_FIELDS:
        if field in result:
            value = _count(result[field], field)
            if charged is not None and value != charged:
                raise InvalidResponse(f"the report's charged credits disagree ({field!r})")
            charged = value
    already = result.get("alreadyUnlocked")
    if already is not None and type(already) is not bool:
        raise InvalidResponse(f"'alreadyUnlocked' must be a boolean, got {type(already).__name__}")
    after = result.get("balanceAfter")
    if after is None:
        if charged is None:
            return None
        return Report(charged, already_unlocked=already)
    if type(after) is int or type(after) is float:  # an older version: the total alone
        return Report(charged, _count(after, "balanceAfter"), already_unlocked=already)
    if not isinstance(after, Mapping):
        raise InvalidResponse(
            f"'balanceAfter' must be an object, a number or null, got {type(after).__name__}"
        )
    if "totalAmount" in after:  # a whole balance (visitors unlock)
        return _whole_balance(charged, after, already)
    return _short_balance(charged, after, already)


def _whole_balance(charged: int | None, after: Mapping[str, Any], already: bool | None) -> Report:
    try:
        balance = CreditBalance.from_api(after)
    except InvalidResponse as exc:
        raise InvalidResponse(f"'balanceAfter': {exc}") from None
    buckets = balance.subscription_balance + balance.addon_balance + balance.gift_balance
    if buckets != balance.total_balance:
        raise InvalidResponse(
            f"'balanceAfter' buckets add up to {buckets}, its totalBalance is "
            f"{balance.total_balance}"
        )
    return Report(
        charged,
        balance.total_balance,
        balance,
        subscription_after=balance.subscription_balance,
        already_unlocked=already,
    )


def _short_balance(charged: int | None, after: Mapping[str, Any], already: bool | None) -> Report:
    figures: list[int] = []
    for field in ("totalBalance", "subscriptionBalance", "permanentBalance"):
        if field not in after:
            raise InvalidResponse(f"'balanceAfter' lacks {field!r}")
        figures.append(_count(after[field], f"balanceAfter.{field}"))
    total, subscription, permanent = figures
    buckets = subscription + permanent
    if "addonBalance" in after:  # an extra property some servers may add
        buckets += _count(after["addonBalance"], "balanceAfter.addonBalance")
    if buckets != total:
        raise InvalidResponse(
            f"'balanceAfter' buckets add up to {buckets}, its totalBalance is {total}"
        )
    unlimited = after.get("unlimited")
    if unlimited is not None and type(unlimited) is not bool:
        raise InvalidResponse(
            f"'balanceAfter.unlimited' must be a boolean, got {type(unlimited).__name__}"
        )
    return Report(
        charged,
        total,
        subscription_after=subscription,
        permanent_after=permanent,
        unlimited=unlimited,
        already_unlocked=already,
    )


def _text(value: object) -> str | None:
    if type(value) is not str or not value:
        return None
    return value[:_MAX_TEXT]


def parse_api_error(response_or_body: object) -> ApiErrorInfo | None:
    """Lensmor's error body, from an ``httpx.Response`` (any status: some errors come
    with a 200), an ``httpx.HTTPStatusError``, or the decoded JSON (a ``Mapping``).

    Returns ``None`` when there is no error body: a body not in memory (never read here),
    not a JSON object, or an object with none of ``errorKey``, ``code`` and ``message``.
    Never raises for what the service sent. Only the response's own ``X-Request-ID``
    header is looked at; the request (and its API key) never is.
    """
    status: int | None = None
    header_trace: str | None = None
    body: object = response_or_body
    if isinstance(body, httpx.HTTPStatusError):
        body = body.response
    if isinstance(body, httpx.Response):
        status = body.status_code
        header_trace = _text(body.headers.get("x-request-id"))
        body = _body_of(body)
    if not isinstance(body, Mapping):
        return None
    code = body.get("code")
    if type(code) is not int:
        code = _text(code)
    error_key = _text(body.get("errorKey"))
    message = _text(body.get("message"))
    if error_key is None and code is None and message is None:
        return None
    return ApiErrorInfo(
        error_key,
        message,
        _text(body.get("traceId")) or header_trace,
        code,
        status,
        body.get("details"),
    )


def _printable(text: str, most: int, secret: str | None) -> str:
    """``text`` fit for an exception message: ``secret`` redacted, unprintable characters
    as spaces, runs of spaces as one, cut to ``most`` characters (``...`` marks a cut)."""
    if secret:
        text = text.replace(secret, _REDACTED)
    if not text.isprintable():
        text = "".join(" " if unicodedata.category(c) in _UNPRINTABLE else c for c in text)
    text = " ".join(text.split())
    if len(text) > most:
        text = text[: most - 3].rstrip() + "..."
    return text


def describe_api_error(
    body: bytes, headers: Mapping[str, str] | None = None, *, secret: str | None = None
) -> str:
    """What Lensmor's error body says, for an exception's message:
    ``"<errorKey>: <message> (trace id <traceId>)"``; ``""`` when ``body`` is not Lensmor's
    error body (a JSON object naming an ``errorKey`` or a ``traceId``; the trace id may also
    come as the ``X-Request-ID`` header in ``headers``).

    The message is cut to 200 characters, the error key and the trace id to 100; control
    characters become spaces. ``secret`` (the API key the request carried), should the
    service echo it anywhere, is replaced by ``[redacted]`` in the whole texts before
    anything is cut, so no part of it is shown. Never raises for what the service sent.
    """
    if len(body) > MAX_BODY_BYTES:
        return ""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(data, dict):
        return ""
    if secret:
        data = {
            name: value.replace(secret, _REDACTED) if type(value) is str else value
            for name, value in data.items()
        }
    info = parse_api_error(data)
    trace = info.trace_id if info is not None else None
    if trace is None and headers is not None:
        trace = _text(headers.get("x-request-id"))
    if info is None or (info.error_key is None and trace is None):
        return ""
    parts = [
        _printable(text, most, secret)
        for text, most in ((info.error_key, _SAID_FIELD), (info.message, _SAID_MESSAGE))
        if text
    ]
    said = ": ".join(part for part in parts if part)
    if trace:
        said = f"{said} (trace id {_printable(trace, _SAID_FIELD, secret)})".strip()
    return said


def trace_of(outcome: object, secret: str | None = None) -> str | None:
    """Lensmor's trace id of a paid call: the ``traceId`` of its answer or error body
    (an ``httpx.Response``, an ``httpx.HTTPStatusError`` or the decoded JSON), else the
    response's ``X-Request-ID`` header; ``None`` when it gave none, or when what it gave
    holds ``secret`` (an answer that echoes the key: nothing of it is kept, looked at
    before it is cut to 500 characters, so no piece of the key survives the cut either).
    An exception raised ``from`` such an error counts too. Never raises."""
    found = _raw_trace(outcome)
    if found is None or (secret and secret in found):
        return None
    return found[:_MAX_TEXT]


def _raw_trace(outcome: object) -> str | None:
    """:func:`trace_of`'s text, whole."""
    seen: object = outcome
    for _ in range(_CAUSES):
        if isinstance(seen, httpx.HTTPStatusError):
            seen = seen.response
        if isinstance(seen, httpx.Response):
            header = _whole_text(seen.headers.get("x-request-id"))
            body = _body_of(seen)
            found = _whole_text(body.get("traceId")) if isinstance(body, Mapping) else None
            return found or header
        if isinstance(seen, Mapping):
            return _whole_text(seen.get("traceId"))
        if isinstance(seen, BaseException):
            seen = seen.__cause__
            continue
        return None
    return None


def _whole_text(value: object) -> str | None:
    return value if type(value) is str and value else None


def is_insufficient_credits(exc: BaseException) -> bool:
    """Whether ``exc`` is Lensmor refusing a paid call for want of credits: an
    ``httpx.HTTPStatusError`` with status 402, or whose body's ``errorKey`` is
    ``INSUFFICIENT_CREDITS`` (read only when the body is in memory). An exception raised
    ``from`` such an error (``raise AppError(...) from exc``) counts too. creditguard's own
    :class:`~creditguard.InsufficientCredits` (a refusal before any call) does not.
    """
    seen: BaseException | None = exc
    for _ in range(_CAUSES):
        if seen is None:
            return False
        if isinstance(seen, httpx.HTTPStatusError):
            if seen.response.status_code == 402:
                return True
            info = parse_api_error(seen.response)
            if info is not None and info.error_key == "INSUFFICIENT_CREDITS":
                return True
        seen = seen.__cause__
    return False
