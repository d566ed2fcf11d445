"""The sandbox's scripted faults and the checks of what its control endpoints and the
CLI take: the fault names, :func:`parse_fault`, the answer a fault makes, and the strict
parsing of counts, seconds, headers and query parameters."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qsl

from creditguard.testing._wire import _Answer, _json

__all__ = ["FAULTS", "Fault", "parse_fault"]

Fault = Literal["drop", "stall", "truncated", "not-json", "wrong-types"]
FAULTS: tuple[str, ...] = ("drop", "stall", "truncated", "not-json", "wrong-types")
"""The fault names ``fail_next`` (and ``parse_fault``, ``--fail``) take besides an HTTP
error status."""


@dataclass
class _Planned:
    kind: int | str
    times: int
    headers: dict[str, str] = field(default_factory=dict)


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


def _fault_answer(planned: _Planned, data: dict[str, Any]) -> _Answer:
    """What a balance request gets when ``planned`` is the fault served to it (``data``
    is the balance body it would have had)."""
    if isinstance(planned.kind, int):
        reason = _REASONS.get(planned.kind, "Error")
        return _json(planned.kind, {"message": reason}, planned.headers)
    body = json.dumps(data).encode()
    if planned.kind == "not-json":
        body = b"<html><body>502 Bad Gateway</body></html>"
    elif planned.kind == "wrong-types":
        data = dict(data)
        data["totalBalance"] = str(data["totalBalance"])
        data["giftBalance"] = None
        body = json.dumps(data).encode()
    headers = {"content-type": "application/json", **planned.headers}
    fault = planned.kind if planned.kind in ("drop", "stall", "truncated") else None
    return _Answer(200, body, headers, fault)
