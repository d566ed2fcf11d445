"""Run in child processes (multiprocessing, spawn) by the ledger's tests."""

from __future__ import annotations

from creditguard import CreditGuard
from creditguard.ledger import SQLiteLedger
from creditguard.testing import FakeLensmor


def spend_into(path: str, subject: str, calls: int) -> None:
    """``calls`` guarded spends of 1 credit for ``subject``, recorded in the SQLite ledger
    at ``path`` (closed at the end: what it holds is written)."""
    fake = FakeLensmor()
    with SQLiteLedger(path, interval=0.01, batch=7) as ledger:
        with CreditGuard(fake.api_key, transport=fake.transport, ledger=ledger) as guard:
            for _ in range(calls):
                with guard.spend(1, subject=subject):
                    fake.charge(1)
        assert ledger.dropped == 0
