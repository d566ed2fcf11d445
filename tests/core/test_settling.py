"""Settling from the paid call's own report (``creditsUsed`` / ``balanceAfter``).

A call alone in flight settles from what Lensmor's answer says: no balance read after it.
A call that charged nothing releases its reservation without a read. Anything less certain
(other calls in flight, a read in flight, a malformed report) settles with a refresh.

The answers of the event, visitors, full-access and contact phone unlocks as the sandbox
serves them, returned by a guarded function or handed to ``Spend.report()``: visitors
report ``creditsSpent`` and the whole balance, full access ``totalCreditsUsed`` and the
short ``balanceAfter`` (or the total alone, as an older version sends it); an answer
without credit figures (a phone unlock task, a free plan's envelope) settles with a
refresh. A ``402`` from the paid call (or Lensmor's ``INSUFFICIENT_CREDITS`` error body) is
:class:`InsufficientCredits` and drops the cached balance.

What the reports themselves say, parsed, is tested in ``tests/lensmor/test_reports.py``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import pytest

from creditguard import CreditGuard, GuardEvent, InsufficientCredits, current_spend
from creditguard.testing import FakeLensmor
from tests.helpers import NewBackend

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer test-key"}


def client(fake: FakeLensmor) -> httpx.Client:
    return httpx.Client(transport=fake.transport, base_url="https://sandbox.invalid", headers=AUTH)


def aclient(fake: FakeLensmor) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=fake.transport, base_url="https://sandbox.invalid", headers=AUTH
    )


def test_sequential_unlocks_settle_from_the_report_without_reading_again(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=10_000, gift_balance=50)
    events: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, on_event=events.append, backend=new_backend()
    )
    http = client(fake)

    @guard.requires_credits(2000)
    def unlock(event_id: str) -> httpx.Response:
        return http.post(f"/external/events/{event_id}/unlock").raise_for_status()

    for i in range(4):
        unlock(f"ev{i}")
    assert fake.balance.total_balance == 10_050 - 4 * 2000
    assert fake.balance_requests == 1  # the first admission's read, and no other
    assert guard.balance() == fake.balance  # the cache is the reported balance
    spent = [e for e in events if e.kind == "spent"]
    assert [e.charged for e in spent] == [2000] * 4
    assert spent[-1].balance_after is not None
    assert spent[-1].balance_after.total_balance == 2050
    assert guard._account.snapshot()[1:] == (0, 0)
    with pytest.raises(InsufficientCredits) as info, guard.spend(2100):  # on the report
        pytest.fail("2050 left")
    assert info.value.available == 2050
    assert fake.balance_requests == 1


def test_already_unlocked_charges_nothing_and_needs_no_read(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    http = client(fake)
    with guard.spend(2000) as first:
        first.report(http.post("/external/events/e1/unlock").raise_for_status())
    reads = fake.balance_requests
    with guard.spend(2000) as again:
        answer = http.post("/external/events/e1/unlock").raise_for_status()
        assert answer.json()["alreadyUnlocked"] is True
        again.report(answer.json())  # the decoded JSON works as well as the response
    assert (first.charged, again.charged) == (2000, 0)
    assert again.balance_after == first.balance_after
    assert fake.balance_requests == reads
    assert guard._account.snapshot()[1:] == (0, 0)


def test_answers_without_credit_figures_settle_with_a_refresh(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    http = client(fake)

    @guard.requires_credits(50)
    def search(name: str) -> dict[str, Any]:
        path = "/external/exhibitors/search-by-company-name"
        answer = http.post(path, json={"company_name": name})
        result: dict[str, Any] = answer.raise_for_status().json()
        return result

    search("Acme")
    assert fake.balance_requests == 1  # the call returned without waiting for a refresh
    assert guard.balance() == fake.balance  # the refresh: it settles the search
    assert fake.balance_requests == 2


def test_a_malformed_report_is_ignored_and_the_result_returned(
    caplog: pytest.LogCaptureFixture,
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())

    @guard.requires_credits(10)
    def unlock() -> dict[str, Any]:
        fake.charge(10)
        return {"creditsUsed": -5, "balanceAfter": None}

    with caplog.at_level(logging.WARNING, logger="creditguard"):
        assert unlock() == {"creditsUsed": -5, "balanceAfter": None}
    assert "malformed credits report" in caplog.text
    assert guard.balance() == fake.balance  # settled by a refresh instead
    assert guard._account.snapshot()[1:] == (0, 0)


def test_a_charge_above_the_declared_cost_is_logged(
    caplog: pytest.LogCaptureFixture, new_backend: NewBackend
) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    http = client(fake)
    with caplog.at_level(logging.WARNING, logger="creditguard"), guard.spend(100) as spend:
        spend.report(http.post("/external/events/e1/unlock").raise_for_status())
    assert spend.charged == 2000
    assert "declared 100 credits and was charged 2000" in caplog.text
    assert guard.balance() == fake.balance


def test_spending_by_the_web_app_shows_in_the_reported_balance(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=10_000, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    http = client(fake)
    assert guard.balance().total_balance == 10_000
    fake.spend_outside(500)  # the Lensmor web app, from the same pool
    with guard.spend(2000) as spend:
        spend.report(http.post("/external/events/e1/unlock").raise_for_status())
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == 7500 == fake.balance.total_balance
    assert guard.balance() == fake.balance


def _short(total: int) -> dict[str, object]:
    return {
        "totalBalance": total,
        "subscriptionBalance": total,
        "permanentBalance": 0,
        "unlimited": False,
    }


def _whole(total: int) -> dict[str, object]:
    balance = FakeLensmor(subscription_balance=total, gift_balance=0).balance.to_api()
    return {**balance, "totalAmount": max(total, 1000)}


@pytest.mark.parametrize(
    "report",
    [
        {"creditsSpent": 10, "balanceAfter": _whole(1000)},  # it was 100
        {"creditsUsed": 10, "balanceAfter": _short(100)},  # a charge the total does not show
        {"creditsUsed": 10, "balanceAfter": _short(95)},  # less than the charge
        {"totalCreditsUsed": 10, "balanceAfter": 100},
        {"creditsUsed": 0, "balanceAfter": _short(150)},
        {"balanceAfter": _short(150)},
    ],
)
def test_a_report_that_contradicts_the_balance_before_is_not_cached(
    report: dict[str, object], caplog: pytest.LogCaptureFixture, new_backend: NewBackend
) -> None:
    """The total after a call is at most the total before less the charge. A report
    above that settles with a refresh: 91 credits are refused on the 90 left."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    assert guard.balance().total_balance == 100
    with caplog.at_level(logging.WARNING, logger="creditguard"), guard.spend(10) as spend:
        fake.charge(10)
        spend.report(report)
    assert "contradicts the balance before" in caplog.text
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == 90  # the refresh's
    assert guard.balance().total_balance == 90
    with pytest.raises(InsufficientCredits), guard.spend(91):
        pytest.fail("admitted 91 on the 90 left")
    assert guard._account.snapshot()[1:] == (0, 0)


def test_a_decorated_call_whose_report_contradicts_is_settled_by_a_refresh(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    answer = {"creditsSpent": 10, "balanceAfter": _whole(1000)}

    @guard.requires_credits(10)
    def unlock() -> dict[str, object]:
        fake.charge(10)
        return answer

    assert unlock() is answer  # the result is never lost
    assert guard.balance().total_balance == 90
    with pytest.raises(InsufficientCredits), guard.spend(91):
        pytest.fail("admitted 91 on the 90 left")


def test_a_total_below_the_charge_is_the_web_app_spending_too(new_backend: NewBackend) -> None:
    """Lower than the balance before less the charge is legitimate (the web app shares
    the pool): it is cached with no read."""
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    assert guard.balance().total_balance == 100
    reads = fake.balance_requests
    with guard.spend(10) as spend:
        fake.charge(10)
        fake.spend_outside(5)
        spend.report({"creditsUsed": 10, "balanceAfter": _short(85)})
    assert spend.charged == 10
    assert guard.balance().total_balance == 85
    assert fake.balance_requests == reads


def test_report_outside_the_block_is_refused(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    spend = guard.spend(1)
    with pytest.raises(RuntimeError):
        spend.report({"creditsUsed": 1})


def test_concurrent_calls_settle_with_refreshes_and_never_overspend(
    new_backend: NewBackend,
) -> None:
    # Overlapping paid calls of one key get Lensmor's 409 (the sandbox too, when two
    # threads are inside its handler at once): the gate sends them one at a time, while
    # the callers, their admissions and their refreshes still run concurrently.
    fake = FakeLensmor(subscription_balance=20_000, gift_balance=0)
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, max_concurrent=1, backend=new_backend()
    )
    http = client(fake)
    refused = 0
    lock = threading.Lock()

    @guard.requires_credits(2000)
    def unlock(event_id: str) -> httpx.Response:
        return http.post(f"/external/events/{event_id}/unlock").raise_for_status()

    def call(i: int) -> None:
        nonlocal refused
        try:
            unlock(f"ev{i}")
        except InsufficientCredits:
            with lock:
                refused += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(16)))
    assert fake.balance.total_balance == 0
    assert refused == 6
    # Decorated calls return before their refresh: the last ones settle at the next read.
    assert guard.balance() == fake.balance
    assert guard._account.snapshot()[1:] == (0, 0)


async def test_async_unlocks_settle_from_the_report(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=10_000, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    async with aclient(fake) as http:

        @guard.requires_credits(2000)
        async def unlock(event_id: str) -> httpx.Response:
            return (await http.post(f"/external/events/{event_id}/unlock")).raise_for_status()

        for i in range(3):
            await unlock(f"ev{i}")
        async with guard.spend(2000) as spend:
            spend.report(await http.post("/external/events/ev0/unlock"))  # already unlocked
    assert spend.charged == 0
    assert fake.balance_requests == 1
    assert (await guard.abalance()) == fake.balance
    assert fake.balance.total_balance == 4000


async def test_a_read_in_flight_is_not_overtaken_by_a_report(new_backend: NewBackend) -> None:
    """A read that started before the paid call may or may not include its charge: while
    one is in flight the report does not replace the refresh."""
    fake = FakeLensmor(subscription_balance=10_000, gift_balance=0, latency=0.05)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    await guard.abalance()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: guard.abalance(refresh=True))  # a read in flight
        await anyio.wait_all_tasks_blocked()
        async with guard.spend(2000) as spend:
            fake.charge(2000)
            spend.report({"creditsUsed": 2000, "balanceAfter": None})
    assert spend.balance_after == fake.balance  # from a read that started after it
    assert guard._account.snapshot()[1:] == (0, 0)


def test_a_report_made_inside_a_decorated_call_is_not_overwritten_by_its_return(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor()
    fake.add_event("ev-1")
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    http = client(fake)

    @guard.requires_credits(2000)
    def unlock() -> str:
        spend = current_spend()
        assert spend is not None
        spend.report(http.post("/external/events/ev-1/unlock"))
        return "done"  # not a report: the one handed over above stands

    assert unlock() == "done"
    assert fake.balance_requests == 1  # settled from the report: no refresh
    assert guard.balance() == fake.balance
    assert fake.balance_requests == 1


# -- a 402 from the paid call itself -------------------------------------------------------


def test_a_402_from_the_paid_call_is_insufficient_credits_with_the_original_as_cause(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    assert guard.balance().total_balance == 100
    fake.charge(80)  # the Lensmor web app spends from the same pool: the guard cannot see it
    client = httpx.Client(transport=fake.transport, base_url="https://sandbox.invalid")
    auth = {"Authorization": f"Bearer {fake.api_key}"}

    @guard.requires_credits(50)
    def unlock() -> None:
        client.post("/sandbox/charge", params={"credits": 50}, headers=auth).raise_for_status()

    with pytest.raises(InsufficientCredits) as info:
        unlock()
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)
    assert info.value.__cause__.response.status_code == 402
    assert info.value.required == 50
    cached, reserved, inflight = guard._account.snapshot()
    assert (cached, reserved, inflight) == (None, 0, 0)  # the stale balance is dropped
    with pytest.raises(InsufficientCredits) as again:  # decided on a fresh read now
        unlock()
    assert again.value.__cause__ is None
    assert again.value.available == 20


async def test_a_402_in_async_code_and_other_errors_pass_through_unchanged(
    new_backend: NewBackend,
) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    await guard.abalance()
    fake.charge(80)
    request = httpx.Request("POST", "https://sandbox.invalid/x")
    with pytest.raises(InsufficientCredits):
        async with guard.spend(50):
            raise httpx.HTTPStatusError(
                "402", request=request, response=httpx.Response(402, request=request)
            )
    with pytest.raises(httpx.HTTPStatusError):  # a 409 is the action's own error
        async with guard.spend(10):
            raise httpx.HTTPStatusError(
                "409", request=request, response=httpx.Response(409, request=request)
            )


def test_lensmors_insufficient_credits_error_body_counts_as_a_402(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60, backend=new_backend())
    request = httpx.Request("POST", "https://sandbox.invalid/external/events/e1/unlock")
    body = {"code": 402, "message": "Insufficient credits", "errorKey": "INSUFFICIENT_CREDITS"}
    refused = httpx.Response(400, json=body, request=request)  # the key, not the status
    with pytest.raises(InsufficientCredits) as info, guard.spend(10):
        raise httpx.HTTPStatusError("refused", request=request, response=refused)
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)


def test_an_app_error_wrapping_a_402_keeps_its_type(new_backend: NewBackend) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
    request = httpx.Request("POST", "https://sandbox.invalid/x")

    class PaymentNeeded(Exception):
        pass

    def unlock() -> None:
        try:
            raise httpx.HTTPStatusError(
                "402", request=request, response=httpx.Response(402, request=request)
            )
        except httpx.HTTPStatusError as exc:
            raise PaymentNeeded from exc

    with pytest.raises(PaymentNeeded), guard.spend(10):
        unlock()


# -- the unlocks' answers as the sandbox serves them ---------------------------------------


PHONES = "/external/contacts/unlock-phone"


def visitors(event_id: str) -> str:
    return f"/external/events/{event_id}/visitors/unlock"


def full_access(event_id: str) -> str:
    return f"/external/events/{event_id}/full-access/unlock"


def buckets(guard: CreditGuard) -> tuple[int, int, int]:
    balance = guard.balance()
    return balance.total_balance, balance.subscription_balance, balance.gift_balance


def server_buckets(fake: FakeLensmor) -> tuple[int, int, int]:
    balance = fake.balance
    return balance.total_balance, balance.subscription_balance, balance.gift_balance


# -- visitors unlock: creditsSpent and the whole balance after -----------------------------


def test_a_decorated_visitors_unlock_settles_from_its_report() -> None:
    fake = FakeLensmor(subscription_balance=10_000, gift_balance=50)
    for event_id in ("e1", "e2"):
        fake.add_event(event_id, unlocked=True)
    events: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=events.append)
    http = client(fake)

    @guard.requires_credits(3000)
    def unlock(event_id: str) -> httpx.Response:
        return http.post(visitors(event_id)).raise_for_status()

    unlock("e1")
    unlock("e2")
    assert fake.balance_requests == 1  # the first admission's read, and no other
    assert buckets(guard) == server_buckets(fake) == (4050, 4000, 50)
    assert fake.balance_requests == 1  # the cache is the reported balance
    assert [e.charged for e in events if e.kind == "spent"] == [3000, 3000]
    assert fake.unlocked_visitors == {"e1", "e2"}


def test_a_visitors_unlock_reported_inside_a_spend() -> None:
    fake = FakeLensmor(addon_balance=500)  # the whole balance carries the add-on bucket
    fake.add_event("e1", unlocked=True)
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    http = client(fake)
    with guard.spend(3000) as first:
        first.report(http.post(visitors("e1")).raise_for_status())
    reads = fake.balance_requests
    with guard.spend(3000) as again:
        answer = http.post(visitors("e1")).raise_for_status().json()
        assert (answer["alreadyUnlocked"], answer["balanceAfter"]) == (True, None)
        again.report(answer)  # the decoded JSON works as well as the response
    assert (first.charged, again.charged) == (3000, 0)
    assert first.balance_after == fake.balance
    assert first.balance_after is not None
    assert first.balance_after.addon_balance == 500
    assert again.balance_after == first.balance_after
    assert fake.balance_requests == reads == 1


# -- full-access unlock: totalCreditsUsed and the short balanceAfter -----------------------


def test_full_access_unlocks_report_what_each_charged() -> None:
    fake = FakeLensmor(subscription_balance=20_000, gift_balance=50)
    fake.add_event("base-done", unlocked=True)  # only the visitor layer left: 3000
    fake.add_event("no-visitors", visitors=False)  # only the base layer: 2000
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    http = client(fake)
    charged = []
    for event_id in ("fresh", "base-done", "no-visitors", "fresh"):
        with guard.spend(5000) as spend:
            spend.report(http.post(full_access(event_id)).raise_for_status())
        charged.append(spend.charged)
        assert spend.balance_after is not None
        assert spend.balance_after.total_balance == fake.balance.total_balance
    assert charged == [5000, 3000, 2000, 0]
    assert fake.balance_requests == 1
    assert buckets(guard) == server_buckets(fake) == (10_050, 10_000, 50)
    assert fake.balance_requests == 1


def test_a_full_access_balance_after_as_a_bare_number_settles_too() -> None:
    """One older published version sends the total alone as ``balanceAfter``."""
    fake = FakeLensmor(subscription_balance=10_000, full_access_balance_after="number")
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    http = client(fake)

    def unlock(event_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = http.post(full_access(event_id)).raise_for_status().json()
        return answer

    assert guard.requires_credits(5000)(unlock)("e1")["balanceAfter"] == 5050
    with guard.spend(5000) as spend:
        spend.report(unlock("e1"))  # unlocked already: 0, and balanceAfter null
    assert spend.charged == 0
    assert fake.balance_requests == 1
    assert guard.balance().total_balance == 5050
    assert fake.balance_requests == 1


# -- contact phone unlock: an asynchronous task, no credit figures -------------------------


def test_a_phone_unlock_task_reports_nothing_and_settles_with_a_refresh() -> None:
    fake = FakeLensmor()
    fake.add_contact("3", phone_unlocked=True)
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    http = client(fake)
    with guard.spend(450) as spend:
        answer = http.post(PHONES, json={"personnel_ids": ["1", "2", "3"]})
        assert answer.raise_for_status().json()["status"] == "accepted"
        spend.report(answer)
    assert spend.charged is None  # the submission says nothing about credits
    assert spend.balance_after == fake.balance  # read after the call
    assert fake.balance.total_balance == 30050 - 300
    assert fake.balance_requests == 2

    @guard.requires_credits(150)
    def unlock(ids: list[str]) -> httpx.Response:
        return http.post(PHONES, json={"personnel_ids": ids}).raise_for_status()

    assert unlock(["3"]).json()["status"] == "success"  # nothing chargeable: no task
    assert guard.balance() == fake.balance


def test_a_free_plans_envelope_is_not_a_report() -> None:
    """Without a subscription the visitors unlock answers ``200`` with an error body
    (``code: 400``): nothing charged, nothing reported, the guard refreshes."""
    fake = FakeLensmor(subscription_active=False)
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    http = client(fake)
    with guard.spend(3000) as spend:
        answer = http.post(visitors("e1")).raise_for_status()
        assert answer.json()["errorKey"] == "USER_HAS_NO_FEATURE"
        spend.report(answer)
    assert spend.charged is None
    assert spend.balance_after == fake.balance
    assert fake.balance.total_balance == 30050


# -- a 402 from the unlock: someone else spent what the guard admitted on ------------------


@pytest.mark.parametrize(
    ("cost", "path", "body"),
    [
        pytest.param(3000, visitors("e1"), None, id="visitors"),
        pytest.param(5000, full_access("e2"), None, id="full-access"),
        pytest.param(300, PHONES, {"personnel_ids": ["1", "2"]}, id="phone"),
    ],
)
def test_a_402_from_the_unlock_is_insufficient_credits(
    cost: int, path: str, body: dict[str, Any] | None
) -> None:
    fake = FakeLensmor(subscription_balance=cost, gift_balance=0)
    fake.add_event("e1", unlocked=True)
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60)
    http = client(fake)

    @guard.requires_credits(cost)
    def unlock() -> httpx.Response:
        return http.post(path, json=body).raise_for_status()

    assert guard.balance().total_balance == cost  # cached: the guard will admit
    fake.spend_outside(1)  # the web app spends from the same pool
    with pytest.raises(InsufficientCredits) as caught:
        unlock()
    cause = caught.value.__cause__
    assert isinstance(cause, httpx.HTTPStatusError)
    assert cause.response.status_code == 402
    assert cause.response.json()["errorKey"] == "INSUFFICIENT_CREDITS"
    assert (fake.charges, fake.unlocked_visitors, fake.unlocked_phones) == (0, set(), {})
    reads = fake.balance_requests
    assert guard.balance().total_balance == cost - 1  # the cache was dropped: read anew
    assert fake.balance_requests == reads + 1


# -- the unlocks, async, on asyncio and trio -----------------------------------------------


async def test_async_unlocks_settle_from_their_reports() -> None:
    fake = FakeLensmor(subscription_balance=20_000, gift_balance=50)
    fake.add_event("e1", unlocked=True)
    events: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=events.append)
    async with aclient(fake) as http:

        @guard.requires_credits(3000)
        async def unlock_visitors(event_id: str) -> httpx.Response:
            return (await http.post(visitors(event_id))).raise_for_status()

        @guard.requires_credits(5000)
        async def unlock_all(event_id: str) -> dict[str, Any]:
            answer: dict[str, Any] = (await http.post(full_access(event_id))).json()
            return answer

        await unlock_visitors("e1")
        await unlock_all("e2")
        async with guard.spend(5000) as spend:
            spend.report(await http.post(full_access("e1")))
        assert spend.charged == 0  # e1's base layer was unlocked, and its visitors above
        async with guard.spend(300) as phones:
            phones.report(await http.post(PHONES, json={"personnel_ids": ["1", "2"]}))
    assert [e.charged for e in events if e.kind == "spent"] == [3000, 5000, 0, None]
    assert phones.balance_after == fake.balance
    assert fake.balance.total_balance == 20_050 - 3000 - 5000 - 300
    assert fake.balance_requests == 2  # the first admission, the refresh after the phones
    assert (await guard.abalance()) == fake.balance
