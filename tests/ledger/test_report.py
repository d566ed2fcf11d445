"""``creditguard report``: the table, ``--json``, ``--by``, ``--since``, ``--chart`` (a real
PNG), errors; on SQLite and on the session's PostgreSQL server."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from creditguard import CreditGuard, InsufficientCredits
from creditguard.cli.main import main
from creditguard.cli.report import since_arg
from creditguard.ledger import Ledger, PostgresLedger, SQLiteLedger
from creditguard.testing import FakeLensmor

if TYPE_CHECKING:
    from creditguard.testing._postgres_server import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


def _record(ledger: Ledger) -> None:
    fake = FakeLensmor(subscription_balance=1000, gift_balance=0)
    with ledger, CreditGuard(fake.api_key, transport=fake.transport, ledger=ledger) as guard:
        guard.balance()
        for subject, action, cost in [("alice", "search", 30), ("alice", "unlock", 200)]:
            with guard.spend(cost, subject=subject, action=action):
                fake.charge(cost)
        with guard.spend(70, subject="bob", action="search"):
            fake.charge(70)
        with pytest.raises(InsufficientCredits), guard.spend(5000, subject="bob", action="unlock"):
            pass
        fake.spend_outside(100)
        guard.balance(refresh=True)


def _report(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["report", *argv], out=out)
    return code, out.getvalue()


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    path = tmp_path / "spend.db"
    _record(SQLiteLedger(path, sample_every=0))
    return f"sqlite:///{path}"


def test_the_table(ledger_url: str) -> None:
    code, text = _report("--ledger", ledger_url)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].startswith("credits charged by subject since ")
    assert lines[1].split() == ["subject", "charged", "calls", "refusals"]
    assert lines[2].split() == ["alice", "230", "2", "0"]
    assert lines[3].split() == ["bob", "70", "1", "1"]
    assert lines[4].split() == ["total", "300", "3", "1"]
    assert lines[5] == "  spent outside the guard: 100 credits"


def test_json_by_action_and_day(ledger_url: str) -> None:
    code, text = _report("--ledger", ledger_url, "--by", "action", "--json")
    assert code == 0
    data = json.loads(text)
    assert data["by"] == "action"
    assert data["ledger"] == ledger_url
    assert data["rows"] == [
        {"key": "unlock", "charged": 200, "calls": 1, "refusals": 1},
        {"key": "search", "charged": 100, "calls": 2, "refusals": 0},
    ]
    assert data["total"] == {"charged": 300, "calls": 3, "refusals": 1}
    assert data["outside"] == 100
    since = datetime.fromisoformat(data["since"])
    assert abs(since - (datetime.now(timezone.utc) - timedelta(days=30))) < timedelta(minutes=1)
    code, text = _report("--ledger", ledger_url, "--by", "day", "--json", "--since", "12h")
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert [r["key"] for r in json.loads(text)["rows"]] == [today]
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
    code, text = _report("--ledger", ledger_url, "--json", "--since", tomorrow)
    assert json.loads(text)["rows"] == []


def test_since_arg() -> None:
    assert since_arg("30d") == timedelta(days=30)
    assert since_arg("12h") == timedelta(hours=12)
    assert since_arg("90m") == timedelta(minutes=90)
    assert since_arg("2w") == timedelta(weeks=2)
    assert since_arg("2026-01-01") == datetime(2026, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--ledger", "sqlite:///x.db", "--since", "last tuesday"])
    assert exit_.value.code == 2


def test_the_chart_is_a_png(ledger_url: str, tmp_path: Path) -> None:
    png = tmp_path / "spend.png"
    code, text = _report("--ledger", ledger_url, "--chart", str(png))
    assert code == 0
    assert f"chart written to {png}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _ = _report("--ledger", ledger_url, "--by", "day", "--json", "--chart", str(png))
    assert code == 0


def test_the_chart_without_matplotlib(
    ledger_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    code, _ = _report("--ledger", ledger_url, "--chart", str(tmp_path / "x.png"))
    assert code == 1
    assert "pip install 'creditguard[report]'" in capsys.readouterr().err


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _report("--ledger", f"sqlite:///{tmp_path}/missing.db")[0] == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()
    assert _report("--ledger", "mysql://db/x")[0] == 1
    assert "sqlite:///PATH" in capsys.readouterr().err
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    assert _report("--ledger", f"sqlite:///{tmp_path}/junk.db")[0] == 1
    assert "cannot read the ledger" in capsys.readouterr().err


def test_postgresql(postgres: PostgresServer) -> None:
    name = f"cg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = postgres.dsn.rsplit("/", 1)[0] + f"/{name}"
    _record(PostgresLedger(dsn, sample_every=0))
    code, text = _report("--ledger", dsn, "--json")
    assert code == 0
    data = json.loads(text)
    assert data["total"] == {"charged": 300, "calls": 3, "refusals": 1}
    assert data["outside"] == 100


def test_the_docs_example_makes_the_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/ledger_report.py drew docs/img/spend.png; it still runs, and its table is
    the one docs/howto/ledger.md and the reference show."""
    spec = importlib.util.spec_from_file_location(
        "ledger_report", ROOT / "examples" / "ledger_report.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = tmp_path / "spend.png"
    assert module.run(str(tmp_path / "spend.db"), str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()[1:8]
    for page in ("howto/ledger.md", "reference.md"):
        assert "\n".join(table) in (ROOT / "docs" / page).read_text(encoding="utf-8"), page


HOSTILE = [
    "eve\x1b[2J\x1b[31m",  # terminal escapes: clear the screen, turn red
    "mallory\n  total  999999  1  0",  # a forged total line
    "cost $\\frac{1}{2$",  # what matplotlib would read as (broken) mathtext
    "o" * 500,  # a name far wider than a terminal
    "zoë ✓",  # printable text stays as it is
]


def test_names_are_shown_as_text_never_as_terminal_codes(tmp_path: Path) -> None:
    """Actions are any text the application names (subjects refuse control characters at
    the call, but not ``$`` or width): the table shows each name on one line with its
    control characters escaped and its width bounded, the chart draws them as plain text
    (no mathtext), and the JSON keeps them whole."""
    path = tmp_path / "spend.db"
    fake = FakeLensmor(subscription_balance=10_000, gift_balance=0)
    ledger = SQLiteLedger(path, sample_every=0)
    with ledger, CreditGuard(fake.api_key, transport=fake.transport, ledger=ledger) as guard:
        for i, name in enumerate(HOSTILE):
            subject = name if name.isprintable() else f"user-{i}"
            with guard.spend(10 + i, subject=subject, action=name):
                fake.charge(10 + i)
    url = f"sqlite:///{path}"
    for by in ("action", "subject"):
        code, text = _report("--ledger", url, "--by", by)
        assert code == 0
        assert "\x1b" not in text
        lines = text.splitlines()
        assert len(lines) == 2 + len(HOSTILE) + 2  # title, header, a line each, total, outside
        assert [line.split()[0] for line in lines if line.startswith("  total")] == ["total"]
        assert "zoë ✓" in text
        assert max(len(line) for line in lines[1:]) < 120  # the title names the file
        assert "o" * 60 + "…" in text
        if by == "action":
            assert "eve\\x1b[2J\\x1b[31m" in text
            assert "mallory\\n  total  999999" in text
    code, text = _report("--ledger", url, "--by", "action", "--json")
    assert code == 0
    assert sorted(row["key"] for row in json.loads(text)["rows"]) == sorted(HOSTILE)
    png = tmp_path / "spend.png"
    for by in ("subject", "action"):
        code, _ = _report("--ledger", url, "--by", by, "--chart", str(png))
        assert code == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
