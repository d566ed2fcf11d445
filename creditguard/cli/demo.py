"""``creditguard demo``: a Lensmor workflow against the offline sandbox.

A precheck, an event unlock settled from Lensmor's own report, a contact email unlock
(an async task, polled until it ends), an exhibitor search, an event that is already
unlocked (free), and a refusal, with the balance after each step. It needs no key and no
network: the sandbox is in process.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

import anyio
import httpx

from creditguard.core.balance import InsufficientCredits
from creditguard.core.models import CreditBalance
from creditguard.guard.guard import CreditGuard, Precheck

__all__ = ["run_demo"]

BASE_URL = "https://sandbox.invalid"
EVENT = Precheck("unlock_event_contacts", lambda event_id: {"event_id": event_id}, at_most=2000)
EMAILS = Precheck("unlock_contact_emails", lambda ids: {"personnel_ids": ids})
READS = "reads so far"  # the balance reads made since the demo started, a running total


def _money(n: int) -> str:
    return f"{n:,}"


def _buckets(balance: CreditBalance) -> str:
    return (
        f"{_money(balance.total_balance)} = {_money(balance.subscription_balance)} sub"
        f" + {_money(balance.gift_balance)} gift"
    )


def _resets(balance: CreditBalance, now: datetime) -> str:
    if balance.reset_at is None:
        return "no subscription credits to reset"
    days = (balance.reset_at - now).days
    return f"subscription credits reset in {days} days"


def _has_trio() -> bool:
    try:
        import trio  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(out: TextIO) -> int:
    """Run the workflow, printing a table to ``out``."""
    from creditguard.testing import FakeLensmor

    now = datetime.now(timezone.utc)
    fake = FakeLensmor(
        subscription_balance=4000,
        gift_balance=50,
        api_key="demo-key",
        reset_at=now + timedelta(days=30, hours=1),
    )
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    guard = CreditGuard(fake.api_key, base_url=BASE_URL, transport=fake.transport)
    http = httpx.Client(transport=fake.transport, base_url=BASE_URL, headers=auth)

    @guard.requires_credits(EVENT)
    def unlock_event(event_id: str) -> httpx.Response:
        return http.post(f"/external/events/{event_id}/unlock").raise_for_status()

    @guard.requires_credits(EMAILS)
    async def unlock_emails(ids: list[str]) -> dict[str, Any]:
        async with httpx.AsyncClient(
            transport=fake.transport, base_url=BASE_URL, headers=auth
        ) as client:
            answer = await client.post("/external/contacts/unlock", json={"personnel_ids": ids})
            task_id = answer.raise_for_status().json()["task_id"]
            while True:  # Lensmor suggests backing off 3, 5, 10, 20 s; the sandbox is quick
                polled = await client.get(f"/external/contacts/unlock-tasks/{task_id}")
                task: dict[str, Any] = polled.raise_for_status().json()
                if task["taskStatus"] in ("completed", "failed"):
                    return task

    async def search(company: str) -> None:
        async with (
            guard.spend(50),
            httpx.AsyncClient(transport=fake.transport, base_url=BASE_URL, headers=auth) as client,
        ):
            answer = await client.post(
                "/external/exhibitors/search-events", json={"company_name": company}
            )
            answer.raise_for_status()

    print(
        "creditguard demo: a Lensmor workflow against an offline sandbox (no key, no network)",
        file=out,
    )
    start = guard.balance()
    print(f"starting balance: {_buckets(start)}; {_resets(start, now)}\n", file=out)
    print(f"  {'step':<48}{'how':<9}{'charged':>8}   {'balance after':<29}{READS}", file=out)
    before = start.total_balance

    def row(step: str, how: str, charged: str | None = None) -> None:
        nonlocal before
        after = guard.balance()  # what the guard reports; the sandbox agrees
        spent = _money(before - after.total_balance) if charged is None else charged
        before = after.total_balance
        print(
            f"  {step:<48}{how:<9}{spent:>8}   {_buckets(after):<29}"
            f"{fake.balance_requests:>{len(READS)}}",
            file=out,
        )

    result = guard.precheck("unlock_event_contacts", {"event_id": "EV-1024"})
    row("precheck: unlock event EV-1024 (would charge)", "sync", f"({_money(result.credits)})")
    unlock_event("EV-1024")
    row("unlock event EV-1024 (settled from its report)", "sync")
    task = anyio.run(unlock_emails, ["101", "102", "103", "104"], backend="asyncio")
    done = sum(1 for item in task["items"] if item["status"] == "unlocked")
    row(f"unlock emails of 4 contacts (task: {done} delivered)", "asyncio")
    backend = "trio" if _has_trio() else "asyncio"  # the row says what actually ran
    anyio.run(search, "Acme", backend=backend)
    row('search exhibitor events of "Acme"', backend)
    unlock_event("EV-1024")
    row("unlock event EV-1024 again (already unlocked)", "sync")
    try:
        unlock_event("EV-2048")
    except InsufficientCredits as exc:
        print(
            f"  {'unlock event EV-2048':<48}{'sync':<9}{'refused':>8}   needs"
            f" {_money(exc.required)}, {_money(exc.available)} available: InsufficientCredits,"
            " the paid call never ran",
            file=out,
        )
    final = guard.balance()
    print(
        f"\nfinal balance: {_buckets(final)}; {_resets(final, now)}"
        "\n(subscription credits go first, then gift; the event unlocks settled from"
        "\n Lensmor's own report, with no balance read)",
        file=out,
    )
    http.close()
    guard.close()
    return 0
