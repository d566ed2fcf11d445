"""Static checks of the decorators' types, run by ``mypy --strict`` in CI (not pytest).

``warn_unused_ignores`` (part of ``--strict``) makes each ``type: ignore`` below an
assertion: if mypy stopped reporting the mismatch, the ignore would be unused and the
check would fail.
"""

from __future__ import annotations

from typing_extensions import assert_type

from creditguard import CreditGuard, requires_credits

guard = CreditGuard("k")


@guard.requires_credits(10)
def search(query: str, limit: int = 10) -> list[str]:
    return [query] * limit


assert_type(search("x", limit=2), list[str])


@guard.requires_credits(lambda event_ids: 5 * len(event_ids))
async def unlock_events(event_ids: list[str]) -> dict[str, int]:
    return {}


async def use() -> None:
    assert_type(await unlock_events(["e1"]), dict[str, int])


# A cost function whose parameters do not match the function it guards.
@guard.requires_credits(lambda event_ids, dry_run: 5)  # type: ignore[arg-type]
def unlock_one(event_id: str) -> None: ...


# The module-level decorator checks the same way.
@requires_credits(lambda ids: 15 * len(ids))
def unlock_contacts(ids: list[str]) -> int:
    return len(ids)


assert_type(unlock_contacts(["c"]), int)


@requires_credits(lambda: 1)  # type: ignore[arg-type]
def needs_an_argument(contact_id: str) -> None: ...
