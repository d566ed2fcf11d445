"""Fuzzing the parsers that see what the network sends: whatever comes in, only
``InvalidResponse`` (or a normal result) comes out."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from creditguard import (
    CreditBalance,
    CreditGuard,
    InsufficientCredits,
    InvalidResponse,
    RetryPolicy,
    parse_retry_after,
)
from creditguard.lensmor.reader import _loads, _Reader
from tests.strategies import FUZZ, json_values

FIELDS = (
    "totalAmount",
    "totalBalance",
    "subscriptionAmount",
    "subscriptionBalance",
    "giftAmount",
    "giftBalance",
    "resetAt",
)
ADDON_FIELDS = ("addonAmount", "addonBalance", "addonExpireAt")  # API 0.24+
COUNTS = (*FIELDS[:-1], "addonAmount", "addonBalance")
# Mostly the documented keys, with values of any type: the interesting near misses.
near_miss = st.dictionaries(
    st.sampled_from(FIELDS + ADDON_FIELDS) | st.text(max_size=12),
    json_values | st.integers() | st.floats(),
    max_size=12,
)
_count = st.integers(min_value=0, max_value=2**53 - 1)  # the range a double holds exactly
_timestamp = st.none() | st.integers(min_value=0, max_value=253_402_300_799_999)
valid_022 = st.fixed_dictionaries({**{name: _count for name in FIELDS[:-1]}, "resetAt": _timestamp})
valid_024 = st.fixed_dictionaries(
    {
        **{name: _count for name in FIELDS[:-1]},
        "addonAmount": _count,
        "addonBalance": _count,
        "addonExpireAt": _timestamp,
        "resetAt": _timestamp,
    }
)
valid = valid_022 | valid_024  # the two published shapes
not_whole = st.floats().filter(lambda x: not x.is_integer())  # fractions, NaN, infinities


def _from_api(data: object) -> CreditBalance | None:
    try:
        balance = CreditBalance.from_api(data)
    except InvalidResponse:
        return None
    assert isinstance(balance.total_balance, int)
    assert balance.total_balance >= 0
    return balance


@FUZZ
@given(json_values | near_miss)
def test_from_api_raises_only_invalid_response(data: Any) -> None:
    _from_api(data)


@FUZZ
@given(valid)
def test_from_api_accepts_every_documented_body(data: dict[str, int | None]) -> None:
    balance = CreditBalance.from_api(data)
    assert balance.to_api() == data


@FUZZ
@given(valid, st.data(), json_values | st.floats())
def test_from_api_one_field_wrong(data: dict[str, Any], draw: st.DataObject, value: Any) -> None:
    name = draw.draw(st.sampled_from(sorted(data)))
    data = {**data, name: value}
    balance = _from_api(data)
    if balance is not None:  # then the value was a valid one for that field
        assert balance.to_api() == data


@FUZZ
@given(valid, st.sampled_from(FIELDS + ADDON_FIELDS))
def test_from_api_field_missing(data: dict[str, Any], name: str) -> None:
    if name not in data:
        return
    del data[name]
    if name in ADDON_FIELDS:  # one left out counts as 0 (or null): still the new shape
        api = CreditBalance.from_api(data).to_api()
        assert api == {**data, name: None if name == "addonExpireAt" else 0}
        return
    with pytest.raises(InvalidResponse, match=name):
        CreditBalance.from_api(data)


@FUZZ
@given(valid, st.data())
def test_from_api_accepts_whole_floats(data: dict[str, Any], draw: st.DataObject) -> None:
    """Counts and timestamps sent as JSON floats with no fraction are the ints they stand
    for."""
    sent = {
        k: v if v is None or not draw.draw(st.booleans()) else float(v) for k, v in data.items()
    }
    balance = _from_api(sent)
    expected = {k: None if v is None else int(v) for k, v in sent.items()}
    if balance is None:  # only a timestamp rounded past the last datetime can fail
        assert any(
            (expected.get(k) or 0) > 253_402_300_799_999 for k in ("resetAt", "addonExpireAt")
        )
        return
    api = balance.to_api()
    assert api == expected
    assert all(v is None or type(v) is int for v in api.values())


@FUZZ
@given(valid, st.data(), not_whole)
def test_from_api_refuses_fractions(data: dict[str, Any], draw: st.DataObject, bad: float) -> None:
    name = draw.draw(st.sampled_from(sorted(data)))
    with pytest.raises(InvalidResponse, match=name):
        CreditBalance.from_api({**data, name: bad})


def _buckets(balance: CreditBalance) -> int:
    return balance.subscription_balance + balance.addon_balance + balance.gift_balance


@FUZZ
@given(valid, st.integers(min_value=0, max_value=2**65), st.booleans())
def test_after_spending_never_refuses_what_the_total_covers(
    data: dict[str, Any], n: int, consistent: bool
) -> None:
    """Spending ``n`` credits: refused only beyond ``total_balance``; the total falls by
    exactly ``n``; no bucket goes below 0; buckets that added up to the total still do;
    buckets that did not keep their gap to the total while they hold credits."""
    balance = CreditBalance.from_api(data)
    if consistent:  # as the service's answers are: the buckets add up to the total
        balance = dataclasses.replace(balance, total_balance=_buckets(balance))
    if n > balance.total_balance:
        with pytest.raises(InsufficientCredits) as info:
            balance.after_spending(n)
        assert info.value.available == balance.total_balance
        return
    after = balance.after_spending(n)
    assert after.total_balance == balance.total_balance - n
    assert min(after.subscription_balance, after.addon_balance, after.gift_balance) >= 0
    assert after.subscription_balance == max(0, balance.subscription_balance - n)
    gap = balance.total_balance - _buckets(balance)
    if gap <= 0 or _buckets(after) > 0:
        assert after.total_balance - _buckets(after) == gap
    else:  # the buckets ran dry: what remains of the total is the unattributed credits
        assert after.total_balance <= gap
    assert after.to_api().keys() == balance.to_api().keys()
    for field in ("total_amount", "subscription_amount", "addon_amount", "gift_amount"):
        assert getattr(after, field) == getattr(balance, field)


bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_miss.map(lambda v: json.dumps(v).encode()),
    valid.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=100_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=4000, max_value=6000).map(lambda n: b'{"totalBalance": 1' + b"0" * n),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@FUZZ
@given(bodies)
@example(b"")
@example(b"\xff\xfe\x00")
@example(b'{"totalBalance": NaN}')
@example(b"[" * 200_000)
@example(b'{"resetAt": 1' + b"0" * 30 + b"}")
def test_balance_body_raises_only_invalid_response(body: bytes) -> None:
    """The whole path a response body takes: bytes -> JSON -> CreditBalance."""
    try:
        balance = _Reader.parse(body)
    except InvalidResponse:
        return
    assert isinstance(balance, CreditBalance)


def _outcome(parse: Any, text: str) -> tuple[str, str]:
    try:
        return "ok", json.dumps(parse(text), sort_keys=True)
    except RecursionError:
        return "error", "RecursionError"
    except ValueError:
        return "error", "ValueError"


@FUZZ
@given(
    st.one_of(
        json_values.map(json.dumps),
        st.tuples(st.sampled_from(["", " ", "\n\t", "x", "{}", "]"]), json_values).map(
            lambda p: p[0] + json.dumps(p[1]) + p[0]
        ),
        st.text(max_size=40),
    )
)
@example(" {}")
@example("{} ")
@example("{}x")
@example("{} {}")
@example("\ufeff{}")
@example("")
def test_fast_json_decode_agrees_with_json_loads(text: str) -> None:
    """The reader's JSON decoding answers exactly what ``json.loads`` answers, errors too."""
    assert _outcome(lambda t: _loads(t.encode("utf-8", "surrogatepass")), text) == _outcome(
        json.loads, text
    )


@settings(FUZZ, max_examples=60)
@given(bodies)
def test_guard_over_http_never_caches_a_bad_body(body: bytes) -> None:
    """Through a real client: a body that parses is the balance; any other is an
    ``InvalidResponse`` and nothing is cached."""
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body))
    guard = CreditGuard("k", transport=transport, retry=RetryPolicy(attempts=1, deadline=2))
    try:
        expected = CreditBalance.from_api(json.loads(body))
    except (ValueError, RecursionError, InvalidResponse):
        expected = None
    if expected is None:
        with pytest.raises(InvalidResponse):
            guard.balance()
        assert guard._account.snapshot()[0] is None
    else:
        assert guard.balance() == expected


# -- Retry-After -------------------------------------------------------------------------

aware_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc)
)
retry_after_values = st.one_of(
    st.text(),
    st.text(alphabet="0123456789 .-+eE", max_size=40),
    st.integers(min_value=0, max_value=10**400).map(str),
    st.integers().map(str),
    st.floats().map(str),
    aware_datetimes.map(lambda d: email.utils.format_datetime(d, usegmt=True)),
    aware_datetimes.map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S")),
    aware_datetimes.map(lambda d: d.isoformat()),
    st.from_regex(
        r"\A[A-Za-z]{3}, \d{1,3} [A-Za-z]{3} -?\d{1,6} \d{1,3}:\d{1,3}:\d{1,3} \S{0,6}\Z"
    ),
)


@FUZZ
@given(st.none() | retry_after_values, st.none() | aware_datetimes)
@example("99999999999999999999999999999999999999", None)
@example("Fri, 31 Dec 9999 23:59:59 GMT", None)
@example("Mon, 01 Jan 0001 00:00:00 GMT", None)
@example("Sun, 06 Nov 1994 08:49:37 +9999", None)
@example("\u0663\u0660", None)  # Arabic-Indic digits: isdigit() but not delta-seconds
def test_parse_retry_after_never_raises(value: str | None, now: datetime | None) -> None:
    seconds = parse_retry_after(value, now=now)
    if seconds is not None:
        assert isinstance(seconds, float)
        assert math.isfinite(seconds)
        assert 0 <= seconds <= 1e9


@FUZZ
@given(st.integers(min_value=0, max_value=10**9))
def test_parse_retry_after_delta_seconds(n: int) -> None:
    assert parse_retry_after(str(n)) == float(n)
    assert parse_retry_after(f"  {n}  ") == float(n)


@FUZZ
@given(st.integers(min_value=0, max_value=10**7))
def test_parse_retry_after_http_date(seconds: int) -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    header = email.utils.format_datetime(now + timedelta(seconds=seconds), usegmt=True)
    assert parse_retry_after(header, now=now) == float(seconds)
    past = email.utils.format_datetime(now - timedelta(seconds=seconds), usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


@FUZZ
@given(
    retry_after_values, st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))
)
def test_parse_retry_after_with_a_naive_now_never_raises(value: str, now: datetime) -> None:
    """``now`` without a timezone (as ``datetime.now()`` gives) is taken as UTC, like a
    header date without one; it must not raise ``TypeError``."""
    seconds = parse_retry_after(value, now=now)
    assert seconds is None or 0 <= seconds <= 1e9


# -- contact unlock task answers -------------------------------------------------------

_IDS = ["1001", "1002", "1003", "1004"]
_SUBMIT_FIELDS = ("status", "task_id", "skipped_personnel_ids", "skipped_detail")
_TASK_FIELDS = ("taskId", "taskStatus", "items")
_ITEM_FIELDS = ("personnelId", "status", "email", "errorCode")


class _Hostile:
    """The sandbox, with its answers at paths starting ``prefix`` replaced by ``change``
    of the genuine answer (bytes are sent as they are)."""

    def __init__(self, prefix: str, change: Any) -> None:
        from creditguard.testing import FakeLensmor

        self.fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
        self.prefix = prefix
        self.change = change
        self.guard = CreditGuard(
            self.fake.api_key, transport=httpx.MockTransport(self.answer), ttl=60
        )

    def answer(self, request: httpx.Request) -> httpx.Response:
        response = self.fake.transport.handle_request(request)
        body = response.read()
        if request.url.path.startswith(self.prefix) and response.is_success:
            changed = self.change(json.loads(body))
            body = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
        return httpx.Response(response.status_code, content=body)

    def held(self) -> int:
        return self.guard._account.snapshot()[1]


def _changes(fields: tuple[str, ...], values: Any) -> Any:
    """Replace some of the answer's fields (or add fields of the same names), or send a
    value of any shape instead of the answer."""
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), values, max_size=4).map(
        lambda fields: lambda answer: {**answer, **fields}
    ) | json_values.map(lambda value: lambda answer: value)


_items = st.lists(
    st.dictionaries(st.sampled_from(_ITEM_FIELDS), json_values, max_size=4) | json_values,
    max_size=3,
)
_submit_changes = _changes(_SUBMIT_FIELDS, json_values | st.lists(json_values, max_size=3))
_task_changes = _changes(
    _TASK_FIELDS,
    json_values | _items | st.sampled_from(["completed", "failed", "pending"]),
)


@settings(FUZZ, max_examples=150)
@given(_submit_changes)
@example(lambda answer: {**answer, "skipped_personnel_ids": 5})
@example(lambda answer: {**answer, "skipped_personnel_ids": True})
@example(lambda answer: {**answer, "task_id": 5})
@example(lambda answer: b"\xff")
def test_a_hostile_submission_answer_is_invalid_response_and_keeps_the_hold(
    change: Any,
) -> None:
    """Whatever an accepted submission answers: a ContactUnlock, or InvalidResponse with
    the hold still open and named (and the task, when the answer named one)."""
    from creditguard import ContactUnlock, submit_contact_unlock

    hostile = _Hostile("/external/contacts/unlock", change)
    unlock: ContactUnlock | InvalidResponse
    try:
        unlock = submit_contact_unlock(hostile.guard, _IDS)
    except InvalidResponse as exc:
        unlock = exc
    if isinstance(unlock, InvalidResponse):
        assert unlock.hold_id is not None
        assert hostile.guard.hold_by_id(unlock.hold_id).cost == 60
        assert unlock.task_id is None or isinstance(unlock.task_id, str)
        assert hostile.held() == 60
        return
    assert all(isinstance(pid, str) for pid in unlock.skipped)
    if unlock.status == "accepted":
        assert isinstance(unlock.task_id, str)
        assert hostile.held() == 60
    else:
        assert unlock.status == "success"
        assert hostile.held() == 0


@settings(FUZZ, max_examples=150)
@given(_task_changes)
@example(lambda answer: {**answer, "taskStatus": "completed", "items": 5})
@example(lambda answer: {**answer, "taskStatus": "completed", "items": True})
@example(lambda answer: {**answer, "taskStatus": "completed", "items": 1.5})
@example(lambda answer: {**answer, "taskStatus": "completed", "items": [{"email": 5}]})
def test_a_hostile_task_answer_is_invalid_response_and_keeps_the_hold(change: Any) -> None:
    """Whatever a task poll answers: a ContactUnlock whose hold was settled, TaskPending,
    or InvalidResponse naming the task and its hold, which stays open."""
    from creditguard import ContactUnlock, TaskPending, poll_unlock_task, submit_contact_unlock

    hostile = _Hostile("/external/contacts/unlock-tasks/", change)
    submitted = submit_contact_unlock(hostile.guard, _IDS)
    assert submitted.task_id is not None
    assert submitted.hold_id is not None
    done: ContactUnlock | InvalidResponse | TaskPending
    try:
        done = poll_unlock_task(
            hostile.guard,
            submitted.task_id,
            hold_id=submitted.hold_id,
            backoff=(0.001,),
            max_wait=0.005,
        )
    except (InvalidResponse, TaskPending) as exc:
        done = exc
    if not isinstance(done, ContactUnlock):
        assert (done.task_id, done.hold_id) == (submitted.task_id, submitted.hold_id)
        assert hostile.held() == 60
        return
    assert done.status in ("completed", "failed")
    assert isinstance(done.delivered, dict)
    assert hostile.held() == 0


# -- what a paid call's report may leave in the cache ----------------------------------


@settings(FUZZ, max_examples=200)
@given(
    st.none() | st.integers(min_value=0, max_value=200),
    st.none() | st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=100),
)
@example(10, 100, 10)  # a charge the total does not show
@example(10, 1000, 10)  # a total that grew tenfold
def test_a_report_never_caches_more_than_the_balance_before_less_its_charge(
    charged: int | None, total: int | None, actual: int
) -> None:
    """Whatever a paid call reports, the guard caches at most the balance it was admitted
    on less the reported charge; a report above that settles with a read (the truth)."""
    from creditguard.testing import FakeLensmor

    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60)
    assert guard.balance().total_balance == 100
    report: dict[str, Any] = {}
    if charged is not None:
        report["creditsUsed"] = charged
    if total is not None:
        report["balanceAfter"] = {
            "totalBalance": total,
            "subscriptionBalance": total,
            "permanentBalance": 0,
        }
    with guard.spend(100) as spend:
        fake.charge(actual)
        spend.report(report)
    cached = guard.balance().total_balance  # no read: what the spend left in the cache
    real = fake.balance.total_balance
    assert cached == real or cached <= 100 - (charged or 0)
    if total is not None and total > 100 - (charged or 0):
        assert cached == real
