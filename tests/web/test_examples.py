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


# The Django example's wsgi.py under wsgiref's server (threaded, as a WSGI server would be).
WSGI_SERVER = """
import os, socketserver, sys
from wsgiref.simple_server import WSGIServer, make_server
sys.path.insert(0, "examples/django_project")
from unlocks.wsgi import application
class Threaded(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
server = make_server("127.0.0.1", int(os.environ["PORT"]), application, server_class=Threaded)
print("serving", flush=True)
server.serve_forever()
"""


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
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert (problem["error"], problem["required"]) == ("insufficient_credits", 10)
        # 0, or 5 while the contacts unlock's spend (settled once its response is sent)
        # is still in flight: the cost exceeds the balance either way.
        assert problem["available"] in (0, 5)


@pytest.mark.parametrize(
    ("argv", "ready"),
    [
        (["examples/fastapi_app.py"], "Uvicorn running on"),
        (["examples/flask_app.py"], "Running on"),
        (
            ["examples/django_project/manage.py", "runserver", "{port}", "--noreload"],
            "Starting development server",
        ),
        (
            [
                *("-m", "uvicorn", "--app-dir", "examples/django_project"),
                *("unlocks.asgi:application", "--port", "{port}"),
            ],
            "Uvicorn running on",
        ),
        (["-c", WSGI_SERVER], "serving"),
    ],
    ids=["fastapi", "flask", "django", "django-asgi", "django-wsgi"],
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
