"""A Flask app whose paid views are guarded by creditguard, spending sandbox credits.

Start the sandbox (``creditguard sandbox``: key ``test-key`` on port 8787), then, from the
repository root::

    LENSMOR_BASE_URL=http://127.0.0.1:8787 LENSMOR_API_KEY=test-key python examples/flask_app.py

and try ``curl -X POST localhost:8000/events/ev-1/unlock`` until the credits run out
(``PORT`` changes the port).
"""

from __future__ import annotations

import os

import httpx
from flask import Flask, request

from creditguard.flask import CreditGuardExtension, current_spend, requires_credits

app = Flask(__name__)
app.config.update(
    LENSMOR_API_KEY=os.environ["LENSMOR_API_KEY"],
    LENSMOR_BASE_URL=os.environ["LENSMOR_BASE_URL"],
)
credits = CreditGuardExtension(app)  # builds the app's guard from app.config


def paid_call(credits: int) -> None:
    """Stands in for a paid Lensmor request: the sandbox spends ``credits``."""
    response = httpx.post(
        app.config["LENSMOR_BASE_URL"] + "/sandbox/charge",
        params={"credits": credits},
        headers={"Authorization": "Bearer " + app.config["LENSMOR_API_KEY"]},
    )
    response.raise_for_status()


@app.get("/balance")
def balance() -> dict[str, int]:
    """Free: no credits needed."""
    return {"total_balance": credits.guard.balance().total_balance}


@app.post("/events/<event_id>/unlock")
@requires_credits(10)
def unlock_event(event_id: str) -> dict[str, str]:
    paid_call(10)
    return {"event": event_id, "status": "unlocked"}


@app.post("/contacts/unlock")
@requires_credits(lambda req: 5 * len(req.args.getlist("id")))
def unlock_contacts() -> dict[str, int | None]:
    spend = current_spend()
    assert spend is not None  # requires_credits set it
    paid_call(spend.cost)
    before = spend.balance_before.total_balance if spend.balance_before else None
    return {"cost": spend.cost, "balance_before": before, "ids": len(request.args)}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
