"""The pytest plugin that ships FakeLensmor to users' own test suites."""

from __future__ import annotations

import subprocess
import sys

import pytest

from creditguard import CreditGuard
from creditguard.testing import FakeLensmor

pytest_plugins = ["pytester"]


def test_fixture_is_available_here(fake_lensmor: FakeLensmor) -> None:
    assert isinstance(fake_lensmor, FakeLensmor)
    assert fake_lensmor.balance.total_balance == 30050


def test_users_suite_gets_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from creditguard import CreditGuard, InsufficientCredits
        import pytest

        def test_unlock(fake_lensmor):
            guard = CreditGuard(fake_lensmor.api_key, transport=fake_lensmor.transport)

            @guard.requires_credits(10)
            def unlock():
                fake_lensmor.charge(10)

            unlock()
            assert guard.balance().total_balance == 30040
            fake_lensmor.fail_next(429, headers={"Retry-After": "60"})
            from creditguard import RateLimited
            with pytest.raises(RateLimited):
                guard.balance(refresh=True)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, creditguard.testing._plugin as p; "
        "heavy = [m for m in ('httpx', 'anyio', 'uvicorn', 'creditguard.guard.guard') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_transport_serves_sync_and_async(fake_lensmor: FakeLensmor) -> None:
    guard = CreditGuard(fake_lensmor.api_key, transport=fake_lensmor.transport)
    assert guard.balance().total_balance == 30050
    assert fake_lensmor.balance_requests == 1
