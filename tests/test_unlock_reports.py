"""The guard understands the answers of Lensmor's visitors, full-access and contact phone
unlocks, as the sandbox serves them, when a guarded function returns one or a spend is
handed one with ``Spend.report()``: what the call charged is known without a balance read
(visitors: ``creditsSpent`` and the whole balance; full access: ``totalCreditsUsed`` and the
short ``balanceAfter``, or the total alone as an older version sends it), an answer without
credit figures (a phone unlock task, a free plan's envelope) settles with a refresh, a
``402`` is :class:`InsufficientCredits`, and ``Precheck`` admits for what Lensmor says the
action costs.

Only the public API: ``CreditGuard(api_key, transport=fake.transport)``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from creditguard import CreditGuard, GuardEvent, InsufficientCredits, Precheck, current_spend
from creditguard.testing import FakeLensmor

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer test-key"}
PHONES = "/external/contacts/unlock-phone"


def client(fake: FakeLensmor) -> httpx.Client:
    return httpx.Client(transport=fake.transport, base_url="https://sandbox.invalid", headers=AUTH)


def aclient(fake: FakeLensmor) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=fake.transport, base_url="https://sandbox.invalid", headers=AUTH
    )


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


# -- visitors unlock: creditsSpent and the whole balance after ---------------------------------


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


# -- full-access unlock: totalCreditsUsed and the short balanceAfter ---------------------------


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


# -- contact phone unlock: an asynchronous task, no credit figures ------------------------------


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


# -- 402: someone else spent what the guard admitted on -----------------------------------------


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


# -- precheck: what Lensmor says the action costs ----------------------------------------------


def test_precheck_admits_for_what_each_unlock_would_charge() -> None:
    fake = FakeLensmor()
    fake.add_event("base-done", unlocked=True)
    fake.add_contact("9", phone_unlocked=True)
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    http = client(fake)
    admitted: list[int] = []

    def cost() -> int:
        spend = current_spend()
        return -1 if spend is None else spend.cost

    @guard.requires_credits(Precheck("unlock_event_visitors", lambda e: {"event_id": e}))
    def unlock_visitors(event_id: str) -> httpx.Response:
        admitted.append(cost())
        return http.post(visitors(event_id)).raise_for_status()

    @guard.requires_credits(Precheck("unlock_event_full_access", lambda e: {"event_id": e}))
    def unlock_all(event_id: str) -> httpx.Response:
        admitted.append(cost())
        return http.post(full_access(event_id)).raise_for_status()

    @guard.requires_credits(Precheck("unlock_contact_phones", lambda ids: {"personnel_ids": ids}))
    def unlock_phones(ids: list[str]) -> httpx.Response:
        admitted.append(cost())
        return http.post(PHONES, json={"personnel_ids": ids}).raise_for_status()

    unlock_visitors("base-done")
    unlock_all("base-done")  # both layers unlocked already: nothing to charge
    unlock_all("fresh")
    unlock_phones(["1", "9", "1", "2"])
    assert admitted == [3000, -1, 5000, 300]
    assert fake.balance.total_balance == 30050 - 3000 - 5000 - 300
    assert guard.balance() == fake.balance


# -- async, on asyncio and trio -----------------------------------------------------------------


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
