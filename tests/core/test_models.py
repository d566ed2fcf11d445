from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditguard import (
    CreditBalance,
    CreditGuard,
    InsufficientCredits,
    InvalidResponse,
    Precheck,
    StateBackend,
)
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend

DOC_EXAMPLE = {
    "totalAmount": 35050,
    "totalBalance": 30050,
    "subscriptionAmount": 35000,
    "subscriptionBalance": 30000,
    "giftAmount": 50,
    "giftBalance": 50,
    "resetAt": 1714521600000,
}
# The same account on a server of API 0.24 or later: an add-on bucket, in the schema's order.
DOC_EXAMPLE_ADDON = {
    "totalAmount": 36050,
    "totalBalance": 30550,
    "subscriptionAmount": 35000,
    "subscriptionBalance": 30000,
    "addonAmount": 1000,
    "addonBalance": 500,
    "addonExpireAt": 1717200000000,
    "giftAmount": 50,
    "giftBalance": 50,
    "resetAt": 1714521600000,
}
ADDON_FIELDS = ("addonAmount", "addonBalance", "addonExpireAt")


def test_documented_example_parses() -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE)
    assert b.total_balance == 30050
    assert b.subscription_balance == 30000
    assert b.gift_balance == 50
    assert b.reset_at == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert b.reset_at.tzinfo is not None
    assert b.to_api() == DOC_EXAMPLE


def test_reset_at_null_and_extra_fields() -> None:
    data = {**DOC_EXAMPLE, "resetAt": None, "currency": "credits", "nested": {"x": 1}}
    b = CreditBalance.from_api(data)
    assert b.reset_at is None
    assert b.to_api() == {**DOC_EXAMPLE, "resetAt": None}


def test_frozen() -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE)
    with pytest.raises(AttributeError):
        b.total_balance = 1  # type: ignore[misc]


@pytest.mark.parametrize("field", list(DOC_EXAMPLE))
def test_missing_field(field: str) -> None:
    data = {k: v for k, v in DOC_EXAMPLE.items() if k != field}
    with pytest.raises(InvalidResponse, match=field):
        CreditBalance.from_api(data)


COUNT_FIELDS = [k for k in DOC_EXAMPLE_ADDON if k not in ("resetAt", "addonExpireAt")]
NOT_WHOLE = [1.5, 0.1, 30050.000001, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", ["100", True, False, None, [1], {"v": 1}, *NOT_WHOLE])
@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_wrong_type(field: str, bad: Any) -> None:
    with pytest.raises(InvalidResponse, match=field):
        CreditBalance.from_api({**DOC_EXAMPLE_ADDON, field: bad})


@pytest.mark.parametrize("field", [k for k in COUNT_FIELDS if not k.startswith("addon")])
def test_wrong_type_in_the_old_shape(field: str) -> None:
    for bad in ("100", True, None, 1.5, math.nan):
        with pytest.raises(InvalidResponse, match=field):
            CreditBalance.from_api({**DOC_EXAMPLE, field: bad})


@pytest.mark.parametrize("field", ["resetAt", "addonExpireAt"])
@pytest.mark.parametrize(
    "bad", ["1714521600000", True, 1714521600000.5, math.nan, math.inf, -1, -1.0, [1], {}]
)
def test_timestamp_wrong(field: str, bad: Any) -> None:
    with pytest.raises(InvalidResponse, match=field):
        CreditBalance.from_api({**DOC_EXAMPLE_ADDON, field: bad})


@pytest.mark.parametrize("bad", ["1714521600000", True, 1714521600000.5, -1, [1]])
def test_reset_at_wrong(bad: Any) -> None:
    with pytest.raises(InvalidResponse, match="resetAt"):
        CreditBalance.from_api({**DOC_EXAMPLE, "resetAt": bad})


@pytest.mark.parametrize("negative", [-1, -1.0, -(10**30)])
@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_negative(field: str, negative: int | float) -> None:
    with pytest.raises(InvalidResponse, match=f"{field}.*negative"):
        CreditBalance.from_api({**DOC_EXAMPLE_ADDON, field: negative})


@pytest.mark.parametrize("data", [None, [], "x", 1, [DOC_EXAMPLE], b"{}"])
def test_non_object(data: Any) -> None:
    with pytest.raises(InvalidResponse, match="object"):
        CreditBalance.from_api(data)


@pytest.mark.parametrize("field", ["resetAt", "addonExpireAt"])
@pytest.mark.parametrize("huge", [10**30, 1e30, 253_402_300_800_000])
def test_huge_timestamp_is_invalid_not_a_crash(field: str, huge: int | float) -> None:
    with pytest.raises(InvalidResponse, match=f"{field}.*out of range"):
        CreditBalance.from_api({**DOC_EXAMPLE_ADDON, field: huge})


def test_last_representable_timestamp() -> None:
    b = CreditBalance.from_api({**DOC_EXAMPLE, "resetAt": 253_402_300_799_999})
    assert b.reset_at == datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)
    assert b.to_api()["resetAt"] == 253_402_300_799_999


# -- whole numbers sent as JSON floats -----------------------------------------------------


def test_whole_floats_are_ints() -> None:
    """The published schema types every count as ``number``: 30050.0 is 30050."""
    data = {k: float(v) for k, v in DOC_EXAMPLE_ADDON.items()}
    b = CreditBalance.from_api(data)
    assert b == CreditBalance.from_api(DOC_EXAMPLE_ADDON)
    for value in dataclasses.astuple(b):
        assert type(value) in (int, datetime, bool)
    assert b.total_balance == 30550
    assert type(b.total_balance) is int
    api = b.to_api()
    assert api == DOC_EXAMPLE_ADDON
    assert all(type(v) is int for v in api.values())


@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_one_whole_float_among_ints(field: str) -> None:
    data = {**DOC_EXAMPLE_ADDON, field: float(DOC_EXAMPLE_ADDON[field])}
    b = CreditBalance.from_api(data)
    assert b == CreditBalance.from_api(DOC_EXAMPLE_ADDON)
    assert type(b.to_api()[field]) is int


def test_negative_zero_is_zero() -> None:
    b = CreditBalance.from_api({**DOC_EXAMPLE, "giftAmount": -0.0, "resetAt": -0.0})
    assert b.gift_amount == 0
    assert type(b.gift_amount) is int
    assert b.reset_at == datetime(1970, 1, 1, tzinfo=timezone.utc)


def test_whole_float_timestamps() -> None:
    b = CreditBalance.from_api(
        {**DOC_EXAMPLE_ADDON, "resetAt": 1714521600000.0, "addonExpireAt": 1.7172e12}
    )
    assert b.reset_at == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert b.addon_expire_at == datetime(2024, 6, 1, tzinfo=timezone.utc)


def test_large_whole_float_is_an_exact_int() -> None:
    b = CreditBalance.from_api({**DOC_EXAMPLE, "totalAmount": 2.0**52})
    assert b.total_amount == 2**52


@pytest.mark.parametrize("value", [2**53 - 1, float(2**53 - 1)])
@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_the_largest_count_a_double_holds_exactly(field: str, value: int | float) -> None:
    b = CreditBalance.from_api({**DOC_EXAMPLE_ADDON, field: value})
    assert b.to_api()[field] == 2**53 - 1


@pytest.mark.parametrize(
    "huge",
    [2**53, 2.0**53, 2**60, 2.0**60, 10**30, 1e30, 10**400],
    ids=["2**53", "2.0**53", "2**60", "2.0**60", "10**30", "1e30", "10**400"],
)
@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_a_count_beyond_2_to_the_53_is_out_of_range(field: str, huge: int | float) -> None:
    """Beyond 2**53 - 1 a double (the Redis backend's Lua) is not exact: out of range at
    parse time, whichever backend the guard has."""
    with pytest.raises(InvalidResponse, match=f"{field}.*out of range"):
        CreditBalance.from_api({**DOC_EXAMPLE_ADDON, field: huge})
    with pytest.raises(InvalidResponse, match=f"{field}.*out of range"):
        CreditBalance.from_api({**DOC_EXAMPLE_ADDON, "extra": 1, field: huge})  # slow path


# -- the add-on bucket (API 0.24+) ---------------------------------------------------------


def test_addon_shape_parses_and_round_trips() -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE_ADDON)
    assert (b.addon_amount, b.addon_balance) == (1000, 500)
    assert b.addon_expire_at == datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert b.addon_fields is True
    assert b.to_api() == DOC_EXAMPLE_ADDON
    assert list(b.to_api()) == list(DOC_EXAMPLE_ADDON)  # the schema's order


def test_old_shape_has_an_empty_addon_bucket_and_round_trips() -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE)
    assert (b.addon_amount, b.addon_balance, b.addon_expire_at) == (0, 0, None)
    assert b.addon_fields is False
    assert b.to_api() == DOC_EXAMPLE
    assert list(b.to_api()) == list(DOC_EXAMPLE)


def test_empty_addon_bucket_keeps_its_shape() -> None:
    """A 0.24 answer whose add-on bucket is empty gives back its ten fields; it equals
    the same balance read from a 0.22 answer (the same credits)."""
    data = {**DOC_EXAMPLE_ADDON, "addonAmount": 0, "addonBalance": 0, "addonExpireAt": None}
    data["totalAmount"], data["totalBalance"] = 35050, 30050
    b = CreditBalance.from_api(data)
    assert b.to_api() == data
    assert b == CreditBalance.from_api(DOC_EXAMPLE)
    assert hash(b) == hash(CreditBalance.from_api(DOC_EXAMPLE))


@pytest.mark.parametrize("extra", [{}, {"currency": "credits"}, {"a": 1, "b": 2, "c": [3]}])
@pytest.mark.parametrize("base", [DOC_EXAMPLE, DOC_EXAMPLE_ADDON], ids=["0.22", "0.24"])
def test_unknown_fields_are_ignored(base: dict[str, Any], extra: dict[str, Any]) -> None:
    assert CreditBalance.from_api({**base, **extra}).to_api() == base


def test_three_unknown_fields_are_not_mistaken_for_the_addon_shape() -> None:
    data = {**DOC_EXAMPLE, "x": 1, "y": 2, "z": 3}  # ten fields, none of them add-on ones
    b = CreditBalance.from_api(data)
    assert b.addon_fields is False
    assert b.to_api() == DOC_EXAMPLE


@pytest.mark.parametrize("present", [("addonAmount",), ("addonBalance",), ("addonExpireAt",)])
def test_partial_addon_fields_count_as_the_new_shape(present: tuple[str, ...]) -> None:
    """A field the server leaves out counts as 0 (or null): the answer is still usable."""
    data = {**DOC_EXAMPLE, **{k: DOC_EXAMPLE_ADDON[k] for k in present}}
    b = CreditBalance.from_api(data)
    assert b.addon_fields is True
    expected = {**DOC_EXAMPLE, "addonAmount": 0, "addonBalance": 0, "addonExpireAt": None}
    assert b.to_api() == {**expected, **{k: DOC_EXAMPLE_ADDON[k] for k in present}}


@pytest.mark.parametrize("field", [k for k in DOC_EXAMPLE if k != "resetAt"])
def test_missing_field_in_the_addon_shape(field: str) -> None:
    data = {k: v for k, v in DOC_EXAMPLE_ADDON.items() if k != field}
    with pytest.raises(InvalidResponse, match=field):
        CreditBalance.from_api(data)


def test_addon_fields_as_the_only_difference_to_a_bad_old_body() -> None:
    with pytest.raises(InvalidResponse, match="giftBalance"):
        CreditBalance.from_api({**DOC_EXAMPLE_ADDON, "giftBalance": "50"})


def test_positional_construction_still_works() -> None:
    b = CreditBalance(35050, 30050, 35000, 30000, 50, 50)
    assert b.reset_at is None
    assert (b.addon_amount, b.addon_balance, b.addon_expire_at) == (0, 0, None)
    assert b.to_api() == {**DOC_EXAMPLE, "resetAt": None}
    reset = datetime(2024, 5, 1, tzinfo=timezone.utc)
    expire = datetime(2024, 6, 1, tzinfo=timezone.utc)
    c = CreditBalance(36050, 30550, 35000, 30000, 50, 50, reset, 1000, 500, expire)
    assert c == CreditBalance.from_api(DOC_EXAMPLE_ADDON)
    assert c.to_api() == DOC_EXAMPLE_ADDON  # a non-empty add-on bucket is written


@pytest.mark.parametrize("data", [DOC_EXAMPLE, DOC_EXAMPLE_ADDON], ids=["0.22", "0.24"])
def test_pickle_keeps_the_shape(data: dict[str, Any]) -> None:
    b = CreditBalance.from_api(data)
    copy = pickle.loads(pickle.dumps(b))  # noqa: S301 - our own bytes
    assert copy == b
    assert copy.to_api() == data
    error = pickle.loads(pickle.dumps(InsufficientCredits(1, 0, b)))  # noqa: S301
    assert error.balance is not None
    assert error.balance.to_api() == data


def test_subclass_gets_its_own_type() -> None:
    class Mine(CreditBalance):
        __slots__ = ()

    for data in (DOC_EXAMPLE, DOC_EXAMPLE_ADDON, {**DOC_EXAMPLE, "giftBalance": 50.0}):
        b = Mine.from_api(data)
        assert type(b) is Mine
        assert b.to_api() == CreditBalance.from_api(data).to_api()


def test_a_mapping_that_is_not_a_dict() -> None:
    from types import MappingProxyType

    for data in (DOC_EXAMPLE, DOC_EXAMPLE_ADDON):
        assert CreditBalance.from_api(MappingProxyType(data)).to_api() == data


def test_after_spending_subscription_first_then_gift() -> None:  # the 0.22 shape
    b = CreditBalance.from_api(DOC_EXAMPLE)
    a = b.after_spending(29_990)
    assert (a.subscription_balance, a.gift_balance, a.total_balance) == (10, 50, 60)
    c = a.after_spending(30)
    assert (c.subscription_balance, c.gift_balance, c.total_balance) == (0, 30, 30)
    d = c.after_spending(30)
    assert (d.subscription_balance, d.gift_balance, d.total_balance) == (0, 0, 0)
    assert d.total_amount == b.total_amount
    assert d.reset_at == b.reset_at
    assert b.after_spending(0) == b


def test_after_spending_refuses_overdraft() -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE)
    with pytest.raises(InsufficientCredits) as info:
        b.after_spending(30_051)
    assert info.value.required == 30_051
    assert info.value.available == 30_050
    assert info.value.balance == b


def test_after_spending_subscription_then_addon_then_gift() -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE_ADDON)  # 30000 + 500 + 50
    a = b.after_spending(29_990)
    assert (a.subscription_balance, a.addon_balance, a.gift_balance) == (10, 500, 50)
    c = a.after_spending(110)
    assert (c.subscription_balance, c.addon_balance, c.gift_balance) == (0, 400, 50)
    d = c.after_spending(420)
    assert (d.subscription_balance, d.addon_balance, d.gift_balance) == (0, 0, 30)
    e = d.after_spending(30)
    assert (e.subscription_balance, e.addon_balance, e.gift_balance, e.total_balance) == (
        0,
        0,
        0,
        0,
    )
    assert (e.addon_amount, e.addon_expire_at) == (b.addon_amount, b.addon_expire_at)
    assert e.to_api().keys() == DOC_EXAMPLE_ADDON.keys()
    with pytest.raises(InsufficientCredits):
        e.after_spending(1)


def test_after_spending_keeps_the_old_shape() -> None:
    a = CreditBalance.from_api(DOC_EXAMPLE).after_spending(10)
    assert a.to_api().keys() == DOC_EXAMPLE.keys()


def test_after_spending_trusts_the_total_over_smaller_buckets() -> None:
    """Buckets that hold less than the total (a bucket this version does not know):
    what the total covers is never refused, and no bucket goes below 0."""
    data = {**DOC_EXAMPLE_ADDON, "totalBalance": 31_000}  # buckets: 30550, 450 unattributed
    b = CreditBalance.from_api(data)
    a = b.after_spending(30_600)
    assert a.total_balance == 400
    assert (a.subscription_balance, a.addon_balance, a.gift_balance) == (0, 0, 0)
    z = a.after_spending(400)
    assert z.total_balance == 0
    with pytest.raises(InsufficientCredits) as info:
        z.after_spending(1)
    assert info.value.available == 0


def test_after_spending_trusts_the_total_over_larger_buckets() -> None:
    """Buckets that hold more than the total: the total decides, the gap is kept."""
    data = {**DOC_EXAMPLE_ADDON, "totalBalance": 30_000}  # buckets: 30550
    b = CreditBalance.from_api(data)
    with pytest.raises(InsufficientCredits) as info:
        b.after_spending(30_001)
    assert info.value.available == 30_000
    a = b.after_spending(30_000)
    assert a.total_balance == 0
    assert (a.subscription_balance, a.addon_balance, a.gift_balance) == (0, 500, 50)


def test_after_spending_without_buckets() -> None:
    b = CreditBalance(100, 100, 0, 0, 0, 0)
    a = b.after_spending(100)
    assert a.total_balance == 0
    assert min(a.subscription_balance, a.addon_balance, a.gift_balance) == 0


@pytest.mark.parametrize("n", [-1, 1.0, "1", True, None])
def test_after_spending_bad_input(n: Any) -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE)
    with pytest.raises((TypeError, ValueError)):
        b.after_spending(n)


def _body(
    sa: int, sb: int, aa: int, ab: int, ga: int, gb: int, reset: int | None, expire: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "totalAmount": sa + ga,
        "totalBalance": sb + gb,
        "subscriptionAmount": sa,
        "subscriptionBalance": sb,
        "giftAmount": ga,
        "giftBalance": gb,
        "resetAt": reset,
    }
    if expire is not _OLD_SHAPE:  # API 0.24+: the add-on bucket counts in the totals
        body.update(addonAmount=aa, addonBalance=ab, addonExpireAt=expire)
        body["totalAmount"] += aa
        body["totalBalance"] += ab
    return body


_OLD_SHAPE = object()
counts = st.integers(0, 10**12)
timestamps = st.one_of(st.none(), st.integers(0, 253402300799999))  # up to 9999-12-31
balances = st.builds(
    _body,
    *(counts for _ in range(6)),
    timestamps,
    st.one_of(st.just(_OLD_SHAPE), timestamps),
)


@given(balances)
def test_round_trip(data: dict[str, Any]) -> None:
    assert CreditBalance.from_api(data).to_api() == data


@given(balances, st.data())
def test_whole_floats_parse_as_the_ints(data: dict[str, Any], draw: st.DataObject) -> None:
    """Any field sent as a float (all exact here: every value is below 2**53)."""
    as_floats = {
        k: float(v) if v is not None and draw.draw(st.booleans()) else v for k, v in data.items()
    }
    b = CreditBalance.from_api(as_floats)
    assert b == CreditBalance.from_api(data)
    assert b.to_api() == data


@given(balances, st.integers(0, 3 * 10**12))
def test_spending_conserves_credits(data: dict[str, Any], n: int) -> None:
    b = CreditBalance.from_api(data)
    if n > b.total_balance:
        with pytest.raises(InsufficientCredits):
            b.after_spending(n)
        return
    a = b.after_spending(n)
    assert a.total_balance == b.total_balance - n
    assert a.subscription_balance + a.addon_balance + a.gift_balance == a.total_balance
    assert a.subscription_balance == max(0, b.subscription_balance - n)
    assert a.gift_balance == min(b.gift_balance, a.total_balance)  # gift goes last
    assert min(a.subscription_balance, a.addon_balance, a.gift_balance) >= 0
    assert a.to_api().keys() == data.keys()


# -- out-of-range numbers at the public API, on both backends --------------------------

BEYOND = 2**53  # the first integer past those a double (the Redis backend's Lua) holds exactly


def _rewriting(
    fake: FakeLensmor, path: str, change: Callable[[Any], Any], times: int = 1
) -> httpx.MockTransport:
    """The sandbox, with its first ``times`` answers at ``path`` changed by ``change``."""
    left = [times]

    def handler(request: httpx.Request) -> httpx.Response:
        response = fake.transport.handle_request(request)
        body = response.read()
        if left[0] and request.url.path == path and response.is_success:
            left[0] -= 1
            body = json.dumps(change(json.loads(body))).encode()
        return httpx.Response(response.status_code, content=body)

    return httpx.MockTransport(handler)


def _guard_with(
    transport: httpx.MockTransport, fake: FakeLensmor, backend: StateBackend
) -> CreditGuard:
    return CreditGuard(fake.api_key, transport=transport, ttl=60, backend=backend)


@pytest.mark.parametrize("field", ["totalBalance", "totalAmount", "giftBalance"])
@pytest.mark.parametrize("huge", [BEYOND, float(BEYOND), 2**64])
def test_a_balance_beyond_2_to_the_53_is_invalid_and_the_read_ends(
    field: str, huge: int | float, new_backend: NewBackend
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    change: Callable[[Any], Any] = lambda answer: {**answer, field: huge}  # noqa: E731
    guard = _guard_with(
        _rewriting(fake, "/external/credits/balance", change, times=2), fake, backend=new_backend()
    )
    with pytest.raises(InvalidResponse, match="out of range"):
        guard.balance()
    with pytest.raises(InvalidResponse, match="out of range"), guard.spend(10):
        pytest.fail("admitted on a balance out of range")
    assert guard._account.snapshot()[1:] == (0, 0)
    assert guard.balance() == fake.balance  # the failed reads ended: the next one is served
    with guard.spend(10):
        fake.charge(10)
    assert guard.balance().total_balance == 90


@pytest.mark.parametrize(
    "answer",
    [
        {"creditsUsed": BEYOND, "balanceAfter": None},
        {"creditsSpent": BEYOND},
        {"totalCreditsUsed": 10, "balanceAfter": float(BEYOND)},
        {
            "creditsSpent": 10,
            "balanceAfter": {
                **FakeLensmor(subscription_balance=90, gift_balance=0).balance.to_api(),
                "totalAmount": 2**60,
            },
        },
    ],
)
def test_a_report_beyond_2_to_the_53_is_ignored_and_the_result_kept(
    answer: dict[str, Any], caplog: pytest.LogCaptureFixture, new_backend: NewBackend
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())

    @guard.requires_credits(10)
    def unlock() -> dict[str, Any]:
        fake.charge(10)
        return answer

    with caplog.at_level(logging.WARNING, logger="creditguard"):
        assert unlock() is answer
    assert "malformed credits report" in caplog.text
    assert guard.balance() == fake.balance  # settled with a refresh
    assert guard.balance().total_balance == 90
    assert guard._account.snapshot()[1:] == (0, 0)


@pytest.mark.parametrize("credits", [BEYOND, float(BEYOND), 10**30])
def test_a_precheck_beyond_2_to_the_53_is_invalid_on_every_backend(
    credits: int | float, new_backend: NewBackend
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    change: Callable[[Any], Any] = lambda answer: {**answer, "credits": credits}  # noqa: E731
    guard = _guard_with(
        _rewriting(fake, "/external/actions/precheck", change, times=2), fake, backend=new_backend()
    )
    params = {"personnel_ids": ["1001"]}
    with pytest.raises(InvalidResponse, match=r"credits.*out of range"):
        guard.precheck("unlock_contact_emails", params)
    with (
        pytest.raises(InvalidResponse, match=r"credits.*out of range"),
        guard.spend(Precheck("unlock_contact_emails", params)),
    ):
        pytest.fail("admitted on a precheck out of range")
    assert guard._account.snapshot()[1:] == (0, 0)
    assert guard.precheck("unlock_contact_emails", params).credits == 15


def test_a_count_too_long_to_print_is_described() -> None:
    with pytest.raises(InvalidResponse, match=r"out of range.*-bit number"):
        CreditBalance.from_api({**DOC_EXAMPLE, "totalBalance": 10**5000})
    with pytest.raises(InvalidResponse, match=r"negative.*-bit negative number"):
        CreditBalance.from_api({**DOC_EXAMPLE, "totalBalance": -(10**5000)})
