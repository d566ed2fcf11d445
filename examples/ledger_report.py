"""Make the spend ledger's sample report and chart (docs/howto/ledger.md shows them).

Guarded calls for four tenants run against the sandbox (event unlocks that report what
they charged, exhibitor searches that do not), some refused by a monthly allowance, and
Lensmor's web app spends from the same pool; every call goes into a SQLite ledger. Then
``creditguard report`` prints the table and draws the chart::

    python examples/ledger_report.py docs/img/spend.png
"""

from __future__ import annotations

import os
import sys
import tempfile

import httpx

from creditguard import Allowance, CreditGuard, InsufficientCredits
from creditguard.cli.main import main
from creditguard.ledger import SQLiteLedger
from creditguard.testing import FakeLensmor

# tenant -> (event unlocks of 2000 credits, exhibitor searches of 25)
WORK = {"acme": (4, 10), "globex": (2, 60), "initech": (1, 12), "umbrella": (2, 4)}


def run(ledger_path: str, chart: str | None) -> int:
    fake = FakeLensmor(subscription_balance=30000, gift_balance=50)
    lensmor = httpx.Client(
        transport=fake.transport,
        base_url="https://sandbox.invalid",
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )
    allowance = Allowance(6000, per="month")
    with (
        SQLiteLedger(ledger_path, sample_every=0) as ledger,
        CreditGuard(
            fake.api_key, transport=fake.transport, ledger=ledger, allowance=allowance
        ) as guard,
    ):
        guard.balance()
        event = 26000
        for tenant, (unlocks, searches) in WORK.items():
            for _ in range(unlocks):
                event += 1
                try:
                    with guard.spend(2000, subject=tenant, action="event unlock") as spend:
                        answer = lensmor.post(f"/external/events/{event}/unlock")
                        spend.report(answer.raise_for_status())
                except InsufficientCredits:
                    pass  # over the tenant's monthly allowance: counted as refused
            for _ in range(searches):
                try:
                    with guard.spend(25, subject=tenant, action="exhibitor search"):
                        fake.charge(25)  # the search charges, and does not say so
                except InsufficientCredits:
                    pass
        fake.spend_outside(1500)  # someone unlocks a list in Lensmor's web app
        guard.balance(refresh=True)
    argv = ["report", "--ledger", f"sqlite:///{ledger_path}"]
    return main([*argv, "--chart", chart] if chart else argv)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        out = sys.argv[1] if len(sys.argv) > 1 else None
        sys.exit(run(os.path.join(tmp, "spend.db"), out))
