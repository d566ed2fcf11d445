"""pytest plugin (``pytest11`` entry point): the ``fake_lensmor`` fixture.

Imports nothing but pytest at collection time; creditguard's sandbox is loaded only when a
test asks for the fixture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from creditguard.testing._fake import FakeLensmor


@pytest.fixture
def fake_lensmor() -> FakeLensmor:
    """A fresh in-memory Lensmor credits service (30,000 subscription + 50 gift credits,
    key ``"test-key"``). Point a guard at it with
    ``CreditGuard(fake_lensmor.api_key, transport=fake_lensmor.transport)``."""
    from creditguard.testing._fake import FakeLensmor

    return FakeLensmor()
