"""Precheck: ask Lensmor what an action would charge, and admit for exactly that.

Against the sandbox in process and over real loopback HTTP (uvicorn), sync, asyncio and
trio.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from creditguard import (
    ActionNotAllowed,
    CreditGuard,
    CreditGuardError,
    InsufficientCredits,
    InvalidResponse,
    Precheck,
    PrecheckResult,
    current_spend,
)
from creditguard.testing import FakeLensmor, serve
from tests.core.test_settling import PHONES, client, full_access, visitors
from tests.helpers import NewBackend

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer test-key"}


@pytest.fixture(params=["in_process", "loopback"])
def setup(
    request: pytest.FixtureRequest, new_backend: NewBackend
) -> Iterator[tuple[FakeLensmor, CreditGuard]]:
    fake = FakeLensmor(subscription_balance=5000, gift_balance=0)
    if request.param == "in_process":
        yield fake, CreditGuard(fake.api_key, transport=fake.transport, backend=new_backend())
        return
    with (
        serve(fake.app) as url,
        CreditGuard(fake.api_key, base_url=url, backend=new_backend()) as guard,
    ):
        yield fake, guard


def unlock_emails(fake: FakeLensmor, ids: list[str]) -> dict[str, Any]:
    """Submit an email unlock and poll its task until it ends (the sandbox's tasks end
    after a fixed number of polls)."""
    http = httpx.Client(transport=fake.transport, base_url="https://s.invalid", headers=AUTH)
    submitted = http.post("/external/contacts/unlock", json={"personnel_ids": ids})
    task: dict[str, Any] = submitted.raise_for_status().json()
    while task.get("task_id") or task.get("taskStatus") in ("pending", "processing"):
        task_id = task.get("task_id") or task["taskId"]
        task = http.get(f"/external/contacts/unlock-tasks/{task_id}").raise_for_status().json()
        if task["taskStatus"] in ("completed", "failed"):
            break
    return task


def test_precheck_says_what_an_action_would_charge(
    setup: tuple[FakeLensmor, CreditGuard],
) -> None:
    fake, guard = setup
    result = guard.precheck("unlock_contact_emails", {"personnel_ids": ["1", "2", "3"]})
    assert isinstance(result, PrecheckResult)
    assert (result.allowed, result.should_charge, result.credits) == (True, True, 45)
    assert result.reason_code == "ok"
    assert result.detail["chargeable_count"] == 3
    assert fake.balance.total_balance == 5000  # a precheck never charges


async def test_aprecheck(setup: tuple[FakeLensmor, CreditGuard]) -> None:
    _, guard = setup
    result = await guard.aprecheck("unlock_event_contacts", {"event_id": "e1"})
    assert (result.allowed, result.credits) == (True, 2000)
    unsupported = await guard.aprecheck("teleport", {})
    assert (unsupported.allowed, unsupported.reason_code) == (False, "unsupported_action")


def test_admits_for_exactly_the_chargeable_contacts(
    setup: tuple[FakeLensmor, CreditGuard],
) -> None:
    fake, guard = setup
    admitted: list[int] = []

    @guard.requires_credits(Precheck("unlock_contact_emails", lambda ids: {"personnel_ids": ids}))
    def unlock(ids: list[str]) -> dict[str, Any]:
        admitted.append(guard_spend())
        return unlock_emails(fake, ids)

    def guard_spend() -> int:
        from creditguard import current_spend

        current = current_spend()
        return -1 if current is None else current.cost

    unlock(["1", "2"])  # 30 credits
    unlock(["1", "2", "3"])  # only "3" is chargeable: 15
    reads = fake.balance_requests
    unlock(["1", "2"])  # nothing chargeable: no reservation, no refresh
    assert admitted == [30, 15, -1]
    assert fake.balance_requests == reads
    assert fake.balance.total_balance == 5000 - 45
    assert guard._account.snapshot()[1:] == (45, 2)  # held until a read includes them
    assert guard.balance().total_balance == 5000 - 45
    assert guard._account.snapshot()[1:] == (0, 0)


def test_refusals_from_the_precheck(setup: tuple[FakeLensmor, CreditGuard]) -> None:
    fake, guard = setup
    ran: list[str] = []

    @guard.requires_credits(Precheck("unlock_event_contacts", lambda e: {"event_id": e}))
    def unlock(event_id: str) -> None:
        ran.append(event_id)

    fake.spend_outside(4000)  # 1000 left: an event unlock (2000) cannot be paid
    with pytest.raises(InsufficientCredits) as info:
        unlock("e1")
    assert (info.value.required, info.value.available) == (2000, 1000)
    with pytest.raises(ActionNotAllowed) as refused, guard.spend(Precheck("teleport", {})):
        pytest.fail("must not run")
    assert refused.value.reason_code == "unsupported_action"
    assert not ran
    assert guard._account.snapshot()[1:] == (0, 0)


@pytest.mark.memory_only  # the Redis backend asks Lensmor every time (no cached look)
def test_at_most_skips_the_precheck_while_the_cache_covers_it(new_backend: NewBackend) -> None:
    fake = FakeLensmor(subscription_balance=5000, gift_balance=0)
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return fake.transport.handle_request(request)

    guard = CreditGuard(
        fake.api_key, transport=httpx.MockTransport(handler), ttl=60, backend=new_backend()
    )
    guard.balance()
    cost = Precheck("unlock_contact_emails", lambda ids: {"personnel_ids": ids}, at_most=150)

    @guard.requires_credits(cost)
    def unlock(ids: list[str]) -> None:
        pass

    unlock(["1"])
    assert "/external/actions/precheck" not in sent  # 5000 covers the worst case, 150
    fake.spend_outside(4900)
    guard.invalidate()
    unlock(["1"])
    assert "/external/actions/precheck" in sent  # 100 does not: ask


def test_a_precheck_answer_missing_fields_is_invalid(new_backend: NewBackend) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ok": True, "allowed": True})

    guard = CreditGuard("k", transport=httpx.MockTransport(handler), backend=new_backend())
    with pytest.raises(InvalidResponse):
        guard.precheck("unlock_event_contacts", {"event_id": "e1"})


def test_precheck_errors_carry_lensmors_error_key_but_never_the_key(
    new_backend: NewBackend,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body: dict[str, Any] = {
            "code": 503,
            "message": "maintenance",
            "errorKey": "SYSTEM_ERROR",
            "traceId": "t-123",
        }
        return httpx.Response(503, json=body)

    guard = CreditGuard(
        "sk-secret-key", transport=httpx.MockTransport(handler), backend=new_backend()
    )
    with pytest.raises(CreditGuardError) as info:
        guard.precheck("unlock_event_contacts", {"event_id": "e1"})
    text = str(info.value)
    assert "SYSTEM_ERROR" in text
    assert "t-123" in text
    assert "sk-secret-key" not in text


def test_precheck_params_must_match_the_decorated_function(new_backend: NewBackend) -> None:
    guard = CreditGuard("k", backend=new_backend())
    with pytest.raises(TypeError, match="cannot take the arguments"):

        @guard.requires_credits(Precheck("unlock_event_contacts", lambda: {}))
        def unlock(event_id: str) -> None: ...


# -- what Lensmor says each unlock costs ---------------------------------------------------


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
