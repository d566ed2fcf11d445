"""The examples, started with the command their docstrings give, against the sandbox
served over loopback HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from creditguard.testing import FakeLensmor, serve

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], ready: str) -> Iterator[list[str]]:
    """Run ``argv`` until the block ends; wait for a line containing ``ready``."""
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if ready in line:
                started.set()
        started.set()  # the process ended: stop waiting

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        started.wait(60)
        assert process.poll() is None, "".join(lines)
        yield lines
    finally:
        process.terminate()
        process.wait(20)
        reader.join(10)


def exercise(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/balance").json() == {"total_balance": 35}
        for i in range(3):
            unlocked = client.post(f"/events/ev-{i}/unlock")
            assert unlocked.status_code == 200, unlocked.text
            assert unlocked.json() == {"event": f"ev-{i}", "status": "unlocked"}
        contacts = client.post("/contacts/unlock", params={"id": ["c-1"]})
        assert contacts.status_code == 200, contacts.text
        assert contacts.json()["cost"] == 5
        refused = client.post("/events/ev-9/unlock")
        assert refused.status_code == 402
        problem = refused.json()
        if isinstance(problem["detail"], dict):  # FastAPI nests the problem under "detail"
            problem = problem["detail"]
        assert (problem["error"], problem["required"], problem["available"]) == (
            "insufficient_credits",
            10,
            0,
        )


@pytest.mark.parametrize(
    ("argv", "ready"),
    [
        (["examples/fastapi_app.py"], "Uvicorn running on"),
        (["examples/flask_app.py"], "Running on"),
        (
            ["examples/django_project/manage.py", "runserver", "{port}", "--noreload"],
            "Starting development server",
        ),
    ],
    ids=["fastapi", "flask", "django"],
)
def test_example(argv: list[str], ready: str) -> None:
    fake = FakeLensmor(subscription_balance=35, gift_balance=0, api_key="test-key")
    port = free_port()
    with serve(fake.app) as sandbox:
        env = {
            **os.environ,
            "LENSMOR_BASE_URL": sandbox,
            "LENSMOR_API_KEY": fake.api_key,
            "PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, *(arg.format(port=port) for arg in argv)]
        with running(command, env, ready):
            exercise(f"http://127.0.0.1:{port}")
    assert fake.balance.total_balance == 0
    assert fake.charges == 4
