"""A deployment as the "Deploying" how-to describes it: gunicorn with sync workers serving a
Flask app whose guard shares its state through Redis, over the sandbox (a process of its
own, on loopback). The workers together spend exactly the balance: no call the account
could not pay reaches Lensmor, and every credit is spent.

The app and the processes are those of ``benchmarks/gunicorn_run.py`` (the how-to's
figures come from its run with four workers).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def _load_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gunicorn_run", BENCHMARKS / "gunicorn_run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_two_gunicorn_workers_over_redis_spend_exactly_the_balance(redis_url: str) -> None:
    run = _load_run()
    paid, requests = 10, 20
    row = run.run_variant(
        run.Variant("search_redis_gate1", "redis", max_concurrent=1),
        workers=2,
        paid=paid,
        requests=requests,
        concurrency=4,
        latency=0.01,
        redis_url=redis_url,
    )
    assert row["overspent"] == 0, row  # no search the guard let through was refused (402)
    assert row["conflict"] == 0, row  # one paid call at a time across workers: no 409
    assert row["other"] == 0, row
    assert row["served"] == paid, row  # every search the balance pays for was made...
    assert row["left"] == 0, row  # ...down to the last credit
    assert row["refused"] == requests - paid, row  # and the guard refused the rest
