"""The command line as a user meets it: pipes, Ctrl-C, help, and errors in its own terms."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from creditguard.cli.main import EXIT_BROKEN_PIPE, build_parser, main
from creditguard.testing import FakeLensmor


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LENSMOR_", "PYTEST_"))}
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_balance(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, **env: str
) -> tuple[int, str]:
    for name in ("LENSMOR_API_KEY", "LENSMOR_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["balance", *argv], out=io.StringIO())
    return code, capsys.readouterr().err


# -- pipes ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["demo"], ["balance"], ["balance", "--json"]])
def test_a_closed_pipe_ends_quietly_with_141(command: list[str], served: str) -> None:
    """``creditguard balance | head -2``: the reader is gone; no traceback, the status a
    shell reports for a command ended by SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: the first write fails, whatever the timing
    try:
        done = subprocess.run(
            [sys.executable, "-m", "creditguard", *command],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(LENSMOR_API_KEY="test-key", LENSMOR_BASE_URL=served),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == EXIT_BROKEN_PIPE == 141


# -- the sandbox command -------------------------------------------------------------


@pytest.fixture
def sandbox_process() -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "creditguard", "sandbox", "--port", "0", "--api-key", "sk-b"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert process.stdout is not None
    banner = [process.stdout.readline()]  # waits for the server: the banner comes after
    while banner[-1] and "scripted faults" not in banner[-1]:
        banner.append(process.stdout.readline())
    try:
        yield process, banner
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def test_sandbox_banner_names_the_key_it_accepts(
    sandbox_process: tuple[subprocess.Popen[str], list[str]],
) -> None:
    _, banner = sandbox_process
    assert banner[0].startswith("creditguard sandbox on http://127.0.0.1:"), banner
    # A key given with --api-key is not echoed (it may be a real one)...
    assert any(
        line.strip().startswith("export LENSMOR_API_KEY=<the key given with --api-key>")
        for line in banner
    ), banner
    assert not any("sk-b" in line for line in banner), banner


def test_sandbox_banner_shows_its_built_in_test_key() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "creditguard", "sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline()]
        while banner[-1] and "scripted faults" not in banner[-1]:
            banner.append(process.stdout.readline())
    finally:
        process.kill()
        process.communicate(timeout=30)
    # ...the built-in test key is.
    assert any(line.strip().startswith("export LENSMOR_API_KEY=test-key") for line in banner)


def test_sandbox_exits_130_on_ctrl_c(
    sandbox_process: tuple[subprocess.Popen[str], list[str]],
) -> None:
    process, banner = sandbox_process
    assert "Ctrl-C to stop" in banner[0]
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Traceback" not in err


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["balance", "demo", "sandbox"])
def test_every_option_has_help(command: str) -> None:
    sub = _subcommands()[command]
    for action in sub._actions:  # type: ignore[attr-defined]
        if action.option_strings:
            assert action.help, f"creditguard {command} {action.option_strings[0]} has no help"


def test_sandbox_help_explains_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["sandbox", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "the address to listen on" in text
    assert "the one API key the sandbox accepts" in text
    assert "subscription credits to start with" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "\u0663"],
        ["--port", "70000"],
        ["--subscription", "\u0663"],
        ["--gift", "+5"],
        ["--latency", "\u0661"],
        ["--latency", "1e3"],
        ["--retry-after", "1\r\nSet-Cookie: a=b"],
        ["--fail", "\u0665\u0660\u0663"],
    ],
)
def test_sandbox_flags_take_ascii_numbers_and_sendable_headers(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["sandbox", *argv])
    assert done.value.code == 2
    assert "error: argument" in capsys.readouterr().err


# -- errors in command-line terms ----------------------------------------------------


def test_no_key_says_which_variable_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_balance(monkeypatch, capsys)
    assert code == 1
    assert "set the LENSMOR_API_KEY environment variable" in err
    assert "api_key=" not in err


def test_a_malformed_key_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_balance(monkeypatch, capsys, LENSMOR_API_KEY="two words")
    assert code == 1
    assert "LENSMOR_API_KEY is malformed" in err
    assert "two words" not in err


@pytest.mark.parametrize("url", ["ftp://example.test", "https://"])
def test_a_bad_base_url_names_the_variable(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_balance(monkeypatch, capsys, LENSMOR_API_KEY="k", LENSMOR_BASE_URL=url)
    assert code == 1
    assert "LENSMOR_BASE_URL" in err
    assert "base_url" not in err


def test_plain_http_elsewhere_gives_command_line_advice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_balance(
        monkeypatch, capsys, LENSMOR_API_KEY="k", LENSMOR_BASE_URL="http://sandbox.example.test"
    )
    assert code == 1
    assert "sandbox.example.test" in err
    assert "https://" in err
    assert "loopback" in err
    assert "--allow-insecure-http" in err
    assert "allow_insecure_http" not in err
    assert len(err.strip().splitlines()) == 1


def test_allow_insecure_http_lets_the_command_use_plain_http(
    served: str, fake: FakeLensmor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag reaches the guard (over loopback here, so nothing leaves the machine;
    what it changes for other hosts is the guard's own, tested with the guard)."""
    from creditguard import CreditGuard
    from creditguard.cli import main as _cli

    seen: list[bool] = []
    original = CreditGuard

    def spy(*args: object, allow_insecure_http: bool = False, **kwargs: object) -> object:
        seen.append(allow_insecure_http)
        return original(*args, allow_insecure_http=allow_insecure_http, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_cli, "CreditGuard", spy)
    monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
    monkeypatch.setenv("LENSMOR_BASE_URL", served)
    out = io.StringIO()
    assert main(["balance", "--allow-insecure-http", "--json"], out=out) == 0
    assert main(["balance", "--json"], out=io.StringIO()) == 0
    assert seen == [True, False]


def test_a_rejected_key_says_which_variable_to_check(
    served: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_balance(
        monkeypatch, capsys, LENSMOR_API_KEY="wrong-key", LENSMOR_BASE_URL=served
    )
    assert code == 1
    assert "rejected the API key (401); check LENSMOR_API_KEY" in err
    assert "wrong-key" not in err


def test_an_unreachable_service_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    code, err = _run_balance(monkeypatch, capsys, LENSMOR_API_KEY="sk-secret", LENSMOR_BASE_URL=url)
    assert code == 1
    assert f"could not reach the credits service at {url} (ConnectError)" in err
    assert "sk-secret" not in err


# -- the demo ------------------------------------------------------------------------


def _spend_row(output: str) -> str:
    """The demo's row of the step run with ``async with guard.spend(50)`` (the search)."""
    return next(line for line in output.splitlines() if "search exhibitor events" in line)


def test_demo_labels_the_backend_that_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trio", None)  # as if trio were not installed
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    row = _spend_row(out.getvalue())
    assert "trio" not in row
    assert "asyncio" in row


def test_demo_runs_on_trio_when_it_is_there() -> None:
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    assert "trio" in _spend_row(out.getvalue())


def test_balance_table_shows_the_add_on_bucket_of_newer_servers() -> None:
    from creditguard import CreditBalance
    from creditguard.cli.main import _fmt_balance

    newer = CreditBalance.from_api(
        {
            "totalAmount": 36050.0,
            "totalBalance": 31050.0,
            "subscriptionAmount": 35000,
            "subscriptionBalance": 30000,
            "giftAmount": 50,
            "giftBalance": 50,
            "resetAt": None,
            "addonAmount": 1000,
            "addonBalance": 1000,
            "addonExpireAt": 1767225600000,
        }
    )
    text = _fmt_balance(newer)
    assert "add-on" in text
    assert "1,000" in text
    assert "add-on expires" in text
    older = CreditBalance.from_api({**newer.to_api(), "addonAmount": 0, "addonBalance": 0})
    assert "add-on" in _fmt_balance(older)  # the server has the bucket, even if empty


def test_demo_is_a_lensmor_workflow_with_the_balance_after_each_step() -> None:
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    text = out.getvalue()
    table = [line for line in text.splitlines() if line.startswith("  ") and "sub +" in line]
    rows = {line.split("  ")[1].strip(): line for line in table}
    assert any("precheck" in step for step in rows)
    settled = next(line for step, line in rows.items() if "settled from its report" in step)
    assert settled.split()[-1] == "1"  # no balance read after the first one
    assert "2,000" in settled
    again = next(line for step, line in rows.items() if "already unlocked" in step)
    assert " 0 " in again
    assert "refused" in text
    assert "InsufficientCredits" in text


def test_the_docs_show_the_demo_as_it_ships() -> None:
    """docs/index.md shows the demo's output: it is what the demo prints (a running total
    of balance reads, labelled as one)."""
    from pathlib import Path

    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    page = (Path(__file__).resolve().parents[2] / "docs" / "index.md").read_text()
    shown = page.split("$ creditguard demo\n", 1)[1].split("```", 1)[0]
    assert shown == out.getvalue()
    assert "reads so far" in shown


# -- the version, sandbox flags, URLs, a stalled service ------------------------------


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    from creditguard import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"creditguard {__version__}"


def test_a_port_in_use_says_so_and_suggests_any_free_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["sandbox", "--port", str(port)], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err
    assert "--port 0" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--latency", "-1"],
        ["--latency", "-0.5"],
        ["--stall-seconds", "-2"],
        ["--gift", "-5"],
        ["--subscription", "-1"],
    ],
)
def test_a_negative_value_is_refused_as_negative(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["sandbox", *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: the value must not be negative, got {argv[1]}" in err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ftp://alice:s3cr3t@example.test/x", "'ftp://example.test/x'"),
        ("https://alice:s3cr3t@example.test", "'https://example.test'"),
        ("https://example.test/?token=s3cr3t#alice", "'https://example.test/?...'"),
        ("https://alice@s3cr3t@", "'https://'"),
    ],
)
def test_a_bad_base_url_is_echoed_without_credentials(
    url: str, shown: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_balance(monkeypatch, capsys, LENSMOR_API_KEY="sk-hidden", LENSMOR_BASE_URL=url)
    assert code == 1
    assert "LENSMOR_BASE_URL" in err
    assert f"got {shown}" in err
    assert "s3cr3t" not in err
    assert "alice" not in err


def test_a_url_holding_the_key_is_echoed_without_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_balance(
        monkeypatch, capsys, LENSMOR_API_KEY="sk-hidden", LENSMOR_BASE_URL="ftp://sk-hidden.test"
    )
    assert code == 1
    assert "got 'ftp://[redacted].test'" in err
    assert "sk-hidden" not in err


class _Stderr(io.StringIO):
    """Standard error that tells the test when the command says it is waiting."""

    def __init__(self, said: threading.Event) -> None:
        super().__init__()
        self.said = said

    def write(self, text: str) -> int:
        written = super().write(text)
        if "waiting for the credits service" in self.getvalue():
            self.said.set()
        return written


def test_a_stalled_service_is_said_to_be_waited_for(
    fake: FakeLensmor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service answers only once the command has said, on stderr, that it waits."""
    import anyio.to_thread

    from creditguard.cli import main as _cli
    from creditguard.testing import serve

    said = threading.Event()

    async def stalled(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await anyio.to_thread.run_sync(said.wait, 30)
        await fake.app(scope, receive, send)

    stderr = _Stderr(said)
    monkeypatch.setattr(_cli, "WAITING_NOTE_AFTER", 0.05)
    monkeypatch.setattr(sys, "stderr", stderr)
    with serve(stalled) as url:
        monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
        monkeypatch.setenv("LENSMOR_BASE_URL", url)
        out = io.StringIO()
        assert main(["balance"], out=out) == 0
    assert stderr.getvalue() == f"creditguard: waiting for the credits service at {url}...\n"
    assert "30,050" in out.getvalue()


def test_the_waiting_note_is_one_second_by_default() -> None:
    from creditguard.cli import main as _cli

    assert _cli.WAITING_NOTE_AFTER == 1.0


# -- creditguard status --------------------------------------------------------------


def test_status_of_a_fresh_process_shows_the_balance(
    served: str, fake: FakeLensmor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
    monkeypatch.setenv("LENSMOR_BASE_URL", served)
    out = io.StringIO()
    assert main(["status"], out=out) == 0
    text = out.getvalue()
    assert "(memory backend)" in text
    assert "balance     30,050 credits" in text
    assert "0 credits by 0 guarded calls in flight" in text
    assert "0 credits by 0 open holds" in text
    assert "0 callers waiting" in text
    assert fake.api_key not in text
    out = io.StringIO()
    assert main(["status", "--json"], out=out) == 0
    status = json.loads(out.getvalue())
    assert status["balance"] == fake.balance.to_api()
    assert status["backend"] == "memory"
    assert status["balance_error"] is None
    assert (status["reserved"], status["held"], status["gate_waiting"]) == (0, 0, 0)
    assert status["open_holds"] == []


def test_status_shows_the_open_holds(served: str, fake: FakeLensmor) -> None:
    import time

    from creditguard import CreditGuard
    from creditguard.cli.status import status_json, status_table

    with CreditGuard(fake.api_key, base_url=served) as guard:
        hold = guard.hold(60, expires_in=600)
        snapshot = guard.snapshot()
        now = time.time()
        table = status_table(guard, snapshot, None, now)
        status = status_json(guard, snapshot, None, now)
    assert "60 credits by 1 open hold" in table
    assert hold.id in table
    assert "9m 5" in table or "10m 00s" in table  # expires in about ten minutes
    (shown,) = status["open_holds"]
    assert (shown["id"], shown["cost"]) == (hold.id, 60)
    assert 590 <= shown["expires_in"] <= 600


def test_status_says_when_the_balance_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("LENSMOR_API_KEY", "sk-secret")
    monkeypatch.setenv("LENSMOR_BASE_URL", url)
    out = io.StringIO()
    assert main(["status"], out=out) == 1
    assert "balance     unavailable: could not reach the credits service" in out.getvalue()
    assert "sk-secret" not in out.getvalue() + capsys.readouterr().err


def test_status_with_a_bad_redis_url_says_so_without_credentials(
    fake: FakeLensmor, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
    code = main(["status", "--redis-url", "mysql://root:s3cr3t@db.test/0"], out=io.StringIO())
    assert code == 1
    err = capsys.readouterr().err
    assert "--redis-url" in err
    assert "'mysql://db.test/0'" in err
    assert "s3cr3t" not in err


def test_status_over_redis_shows_what_every_process_holds(
    served: str, fake: FakeLensmor, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another guard (its own RedisBackend, as another process has) holds credits: the
    command, with the deployment's Redis, shows them."""
    import uuid

    from creditguard import CreditGuard
    from creditguard.redis import RedisBackend

    prefix = f"cli-{uuid.uuid4().hex[:8]}:"
    backend = RedisBackend(redis_url, prefix=prefix)
    monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
    monkeypatch.setenv("LENSMOR_BASE_URL", served)
    argv = ["status", "--redis-url", redis_url, "--prefix", prefix]
    try:
        with CreditGuard(fake.api_key, base_url=served, backend=backend) as guard:
            hold = guard.hold(60, expires_in=600)
            out = io.StringIO()
            assert main([*argv, "--json"], out=out) == 0
            status = json.loads(out.getvalue())
            table = io.StringIO()
            assert main(argv, out=table) == 0
            hold.release()
            after = io.StringIO()
            assert main([*argv, "--json"], out=after) == 0
    finally:
        backend.close()
    assert status["backend"] == "redis"
    assert status["account"] == guard.account
    assert status["balance"] == fake.balance.to_api()
    assert (status["held"], status["holds"], status["reserved"]) == (60, 1, 0)
    (shown,) = status["open_holds"]
    assert (shown["id"], shown["cost"]) == (hold.id, 60)
    assert 0 < shown["expires_in"] <= 600
    assert "(redis backend)" in table.getvalue()
    assert "60 credits by 1 open hold" in table.getvalue()
    assert hold.id in table.getvalue()
    assert redis_url not in table.getvalue()
    released = json.loads(after.getvalue())
    assert (released["held"], released["open_holds"]) == (0, [])


def test_status_with_an_unreachable_redis_says_so(
    fake: FakeLensmor, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
    url = f"redis://:s3cr3t@127.0.0.1:{_free_port()}/0"
    assert main(["status", "--redis-url", url], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err.startswith("creditguard: ")
    assert "s3cr3t" not in err
