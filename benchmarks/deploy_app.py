"""The Flask app that ``gunicorn_run.py`` serves with gunicorn: one guarded route that makes
one paid Lensmor call (an exhibitor search, 50 credits) to the sandbox.

Configured from the environment, read at import (so ``--preload`` builds it in the master):
``LENSMOR_BASE_URL`` and ``LENSMOR_API_KEY``; ``DEPLOY_BACKEND`` (``memory`` or ``redis``,
the latter on ``CREDITGUARD_REDIS_URL``); ``DEPLOY_MAX_CONCURRENT`` (``0``: no gate);
``DEPLOY_READ_AT_IMPORT`` (``1``: read the balance at import, which ``--preload`` makes in
the master, before the fork); ``DEPLOY_PAID`` (below).

``POST /search`` answers 200 ``{"upstream": 201}`` when Lensmor served (and charged) the
search, 502 ``{"upstream": <status>}`` when Lensmor refused it (402: the guard let through
a call the account could not pay, an overspend; 409: another paid call of the key was in
progress), and the adapter's own 402 when the guard refused it.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from flask import Flask

from creditguard.flask import CreditGuardExtension, requires_credits

SEARCH_COST = 50
SEARCH_PATH = "/external/exhibitors/search-by-company-name"
# "search": the exhibitor search, which Lensmor runs one at a time per key (409 to an
# overlapping one); "charge": the sandbox's /sandbox/charge, which has no such limit, to see
# what the guard alone does with concurrent calls.
PAID = os.environ.get("DEPLOY_PAID", "search")

options: dict[str, Any] = {"ttl": 5}
if os.environ.get("DEPLOY_BACKEND", "memory") == "redis":
    from creditguard.redis import RedisBackend

    options["backend"] = RedisBackend()  # CREDITGUARD_REDIS_URL
max_concurrent = int(os.environ.get("DEPLOY_MAX_CONCURRENT", "0"))
if max_concurrent:
    options["max_concurrent"] = max_concurrent

app = Flask(__name__)
app.config["CREDITGUARD_OPTIONS"] = options  # the key and base URL from the environment
credits = CreditGuardExtension(app)
if os.environ.get("DEPLOY_READ_AT_IMPORT") == "1":
    credits.guard.balance()  # opens the guard's connection to Lensmor here
lensmor = httpx.Client(
    base_url=os.environ["LENSMOR_BASE_URL"],
    headers={"Authorization": "Bearer " + os.environ["LENSMOR_API_KEY"]},
    timeout=30,
)


@app.post("/search")
@requires_credits(SEARCH_COST)
def search() -> tuple[dict[str, int], int]:
    if PAID == "charge":
        answer = lensmor.post("/sandbox/charge", params={"credits": SEARCH_COST})
    else:
        answer = lensmor.post(SEARCH_PATH, json={"company_name": "Acme"})
    return {"upstream": answer.status_code}, 200 if answer.is_success else 502
