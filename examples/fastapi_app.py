"""A FastAPI app whose paid routes are guarded by creditguard, spending sandbox credits.

Start the sandbox (``creditguard sandbox``: key ``test-key`` on port 8787), then, from the
repository root::

    LENSMOR_BASE_URL=http://127.0.0.1:8787 LENSMOR_API_KEY=test-key python examples/fastapi_app.py

and try ``curl -X POST localhost:8000/events/ev-1/unlock`` until the credits run out
(``PORT`` changes the port).
"""

from __future__ import annotations

import os
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI, Request

from creditguard import CreditGuard, Spend
from creditguard.fastapi import RequireCredits

guard = CreditGuard()  # LENSMOR_API_KEY and LENSMOR_BASE_URL from the environment
app = FastAPI(title="creditguard FastAPI example")


async def paid_call(credits: int) -> None:
    """Stands in for a paid Lensmor request: the sandbox spends ``credits``."""
    async with httpx.AsyncClient() as client:
        response = await client.post(
            os.environ["LENSMOR_BASE_URL"] + "/sandbox/charge",
            params={"credits": credits},
            headers={"Authorization": "Bearer " + os.environ["LENSMOR_API_KEY"]},
        )
    response.raise_for_status()


@app.get("/balance")
async def balance() -> dict[str, int]:
    """Free: no credits needed."""
    return {"total_balance": (await guard.abalance()).total_balance}


@app.post("/events/{event_id}/unlock", dependencies=[Depends(RequireCredits(10, guard=guard))])
async def unlock_event(event_id: str) -> dict[str, str]:
    await paid_call(10)
    return {"event": event_id, "status": "unlocked"}


def contacts_cost(request: Request) -> int:
    return 5 * len(request.query_params.getlist("id"))


@app.post("/contacts/unlock")
async def unlock_contacts(
    spend: Annotated[Spend, Depends(RequireCredits(contacts_cost, guard=guard))],
) -> dict[str, int | None]:
    await paid_call(spend.cost)
    before = spend.balance_before.total_balance if spend.balance_before else None
    return {"cost": spend.cost, "balance_before": before}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
