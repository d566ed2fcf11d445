from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditguard import CreditBalance, InsufficientCredits, InvalidResponse

DOC_EXAMPLE = {
    "totalAmount": 35050,
    "totalBalance": 30050,
    "subscriptionAmount": 35000,
    "subscriptionBalance": 30000,
    "giftAmount": 50,
    "giftBalance": 50,
    "resetAt": 1714521600000,
}


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


@pytest.mark.parametrize("bad", ["100", True, False, 1.0, 1.5, None, [1], {"v": 1}])
@pytest.mark.parametrize("field", [k for k in DOC_EXAMPLE if k != "resetAt"])
def test_wrong_type(field: str, bad: Any) -> None:
    with pytest.raises(InvalidResponse, match=field):
        CreditBalance.from_api({**DOC_EXAMPLE, field: bad})


@pytest.mark.parametrize("bad", ["1714521600000", True, 1.5e12, -1, [1]])
def test_reset_at_wrong(bad: Any) -> None:
    with pytest.raises(InvalidResponse, match="resetAt"):
        CreditBalance.from_api({**DOC_EXAMPLE, "resetAt": bad})


@pytest.mark.parametrize("field", [k for k in DOC_EXAMPLE if k != "resetAt"])
def test_negative(field: str) -> None:
    with pytest.raises(InvalidResponse, match="negative"):
        CreditBalance.from_api({**DOC_EXAMPLE, field: -1})


@pytest.mark.parametrize("data", [None, [], "x", 1, [DOC_EXAMPLE], b"{}"])
def test_non_object(data: Any) -> None:
    with pytest.raises(InvalidResponse, match="object"):
        CreditBalance.from_api(data)


def test_huge_reset_at_is_invalid_not_a_crash() -> None:
    with pytest.raises(InvalidResponse):
        CreditBalance.from_api({**DOC_EXAMPLE, "resetAt": 10**30})


def test_after_spending_subscription_first_then_gift() -> None:
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


@pytest.mark.parametrize("n", [-1, 1.0, "1", True, None])
def test_after_spending_bad_input(n: Any) -> None:
    b = CreditBalance.from_api(DOC_EXAMPLE)
    with pytest.raises((TypeError, ValueError)):
        b.after_spending(n)


balances = st.builds(
    lambda sa, sb, ga, gb, reset: {
        "totalAmount": sa + ga,
        "totalBalance": sb + gb,
        "subscriptionAmount": sa,
        "subscriptionBalance": sb,
        "giftAmount": ga,
        "giftBalance": gb,
        "resetAt": reset,
    },
    *(st.integers(0, 10**12) for _ in range(4)),
    st.one_of(st.none(), st.integers(0, 253402300799999)),  # up to 9999-12-31
)


@given(balances)
def test_round_trip(data: dict[str, Any]) -> None:
    assert CreditBalance.from_api(data).to_api() == data


@given(balances, st.integers(0, 3 * 10**12))
def test_spending_conserves_credits(data: dict[str, Any], n: int) -> None:
    b = CreditBalance.from_api(data)
    if n > b.total_balance:
        with pytest.raises(InsufficientCredits):
            b.after_spending(n)
        return
    a = b.after_spending(n)
    assert a.total_balance == b.total_balance - n
    assert a.subscription_balance + a.gift_balance == a.total_balance
    assert a.subscription_balance == max(0, b.subscription_balance - n)
    assert min(a.subscription_balance, a.gift_balance) >= 0
