"""The documentation's examples, run as the reader would run them, so the docs cannot rot.

Conventions the pages under ``docs/`` follow (see ``RUNNABLE_PAGES``):

* every untitled ```` ```python ```` block of a page runs, in page order, in one namespace
  per page, against the sandbox served over loopback HTTP with ``LENSMOR_BASE_URL`` and
  ``LENSMOR_API_KEY`` set, exactly as the tutorial tells the reader to do. The sandbox is
  started with the arguments of the page's ``creditguard sandbox ...`` command, if it shows
  one. Pages that call ``anyio.run`` run once on asyncio and once on trio;
* a ```` ```text title="Output" ```` block right after a python block is what that block
  prints (the sandbox's address is written ``http://127.0.0.1:8787``);
* ```` ```python title="test_....py" ```` (and ``conftest.py``) blocks are files: they are
  written to a temporary directory and run with pytest, and every test must pass;
* a ```` ```console ```` block starting with ``$ creditguard balance`` or ``$ creditguard
  demo`` is run against the sandbox and its output compared.

The reference page is checked for coverage: its API part is generated from the docstrings,
and every public name must be rendered by a ``:::`` directive (or described) and have a
docstring; the prose around it (configuration, events, sandbox, command line) must match
the code.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest

import creditguard
import creditguard.testing
from creditguard import (
    AuthenticationError,
    BalanceUnavailable,
    CreditBalance,
    CreditGuard,
    GuardEvent,
    InsufficientCredits,
    RetryPolicy,
)
from creditguard.cli.main import build_parser, main
from creditguard.core.steps import Flight, Ops
from creditguard.testing import FakeLensmor, serve
from tests.helpers import AsyncOnly

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE_PAGES = (
    "../README.md",
    "index.md",
    "tutorial.md",
    "howto/sync.md",
    "howto/async.md",
    "howto/many-keys.md",
    "howto/testing.md",
    "howto/reports.md",
    "howto/workers.md",
    "howto/long-running.md",
    "howto/ledger.md",
    "policy.md",
)
SHOWN_URL = "http://127.0.0.1:8787"


# -- reading the pages -----------------------------------------------------------------


@dataclasses.dataclass
class Block:
    lang: str
    title: str | None
    code: str
    line: int


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_TITLE = re.compile(r'title="(?P<title>[^"]*)"')


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a page, in order (blocks nested in admonitions or tabs
    included, dedented)."""
    path = DOCS / page
    if not path.exists():  # reported by test_page_examples_run, not at collection
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        start = i + 1
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        title = _TITLE.search(info)
        lang = info.split()[0] if info else ""
        found.append(Block(lang, title["title"] if title else None, "\n".join(body) + "\n", start))
    return found


def sandbox_args(page_blocks: list[Block]) -> Any:
    """The arguments of the page's ``creditguard sandbox`` command (defaults if none)."""
    for block in page_blocks:
        if block.lang not in ("bash", "console", "shell"):
            continue
        for line in block.code.splitlines():
            if block.lang == "console" and not line.startswith("$ "):
                continue  # a console block's other lines are output, not commands
            words = shlex.split(line.removeprefix("$ "), comments=True)
            if words[:2] == ["creditguard", "sandbox"]:
                return build_parser().parse_args(words[1:])
    return build_parser().parse_args(["sandbox"])


def _uses_anyio_run(page: str) -> bool:
    return any("anyio.run(" in b.code for b in blocks(page) if b.lang == "python")


def _page_params() -> list[Any]:
    params = []
    for page in RUNNABLE_PAGES:
        backends = ("asyncio", "trio") if _uses_anyio_run(page) else ("asyncio",)
        params += [pytest.param(page, backend, id=f"{page}-{backend}") for backend in backends]
    return params


def _normalise(text: str, url: str) -> str:
    text = text.replace(url, SHOWN_URL)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@contextlib.contextmanager
def sandbox_for(page: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeLensmor, str]]:
    """The page's sandbox, served over loopback HTTP, with the two variables set."""
    args = sandbox_args(blocks(page))
    fake = FakeLensmor(
        subscription_balance=args.subscription,
        gift_balance=args.gift,
        api_key=args.api_key,
        latency=args.latency,
    )
    with serve(fake.app) as url:
        monkeypatch.setenv("LENSMOR_BASE_URL", url)
        monkeypatch.setenv("LENSMOR_API_KEY", args.api_key)
        yield fake, url


def _patch_anyio_run(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    original = anyio.run

    @functools.wraps(original)
    def run(func: Callable[..., Any], *args: Any, backend: str = backend, **kwargs: Any) -> Any:
        return original(func, *args, backend=backend, **kwargs)

    monkeypatch.setattr(anyio, "run", run)


def _close_guards(namespace: dict[str, Any]) -> None:
    for value in namespace.values():
        if isinstance(value, CreditGuard):
            value.close()


# -- running the pages -----------------------------------------------------------------


@pytest.mark.parametrize(("page", "backend"), _page_params())
def test_page_examples_run(
    page: str, backend: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    assert (DOCS / page).exists(), f"docs/{page} is missing"
    if "CREDITGUARD_REDIS_URL" in (DOCS / page).read_text(encoding="utf-8"):
        monkeypatch.setenv("CREDITGUARD_REDIS_URL", request.getfixturevalue("redis_url"))
    if "CREDITGUARD_REDIS_CLUSTER_URL" in (DOCS / page).read_text(encoding="utf-8"):
        cluster = request.getfixturevalue("redis_cluster")
        monkeypatch.setenv("CREDITGUARD_REDIS_CLUSTER_URL", cluster.url)
    page_blocks = blocks(page)
    assert any(b.lang == "python" and b.title is None for b in page_blocks), page
    _patch_anyio_run(monkeypatch, backend)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with sandbox_for(page, monkeypatch) as (_, url):
        try:
            for index, block in enumerate(page_blocks):
                if block.lang != "python" or block.title is not None:
                    continue
                where = f"docs/{page}:{block.line}"
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(block.code, where, "exec"), namespace)  # noqa: S102
                following = page_blocks[index + 1] if index + 1 < len(page_blocks) else None
                if following is not None and following.title == "Output":
                    expected = _normalise(following.code, url)
                    assert _normalise(out.getvalue(), url) == expected, where
        finally:
            _close_guards(namespace)


def _console_params() -> list[Any]:
    params = []
    for page in (*RUNNABLE_PAGES, "reference.md"):
        for block in blocks(page):
            if block.lang == "console" and re.match(r"\$ creditguard (balance|demo)\b", block.code):
                params.append(pytest.param(page, block, id=f"{page}:{block.line}"))
    return params


@pytest.mark.parametrize(("page", "block"), _console_params())
def test_console_examples(page: str, block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    command, _, expected = block.code.partition("\n")
    argv = shlex.split(command.removeprefix("$ "))[1:]
    with sandbox_for(page, monkeypatch) as (_, url):
        out = io.StringIO()
        assert main(argv, out=out) == 0
        assert _normalise(out.getvalue(), url) == _normalise(expected, url)


def _file_pages() -> list[str]:
    return [p for p in RUNNABLE_PAGES if any(b.title and b.lang == "python" for b in blocks(p))]


@pytest.mark.parametrize("page", _file_pages())
def test_page_test_files_pass(page: str, tmp_path: Path) -> None:
    files = [b for b in blocks(page) if b.lang == "python" and b.title]
    for block in files:
        assert re.fullmatch(r"\w+\.py", block.title or ""), block.title
        path = tmp_path / str(block.title)
        assert not path.exists(), f"{block.title} appears twice on {page}"
        path.write_text(block.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LENSMOR_", "PYTEST_"))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert re.search(r"\b\d+ passed\b", report), report
    assert not re.search(r"\b\d+ (failed|error|errors|skipped)\b", report), report


# -- the reference page covers the public API --------------------------------------------
#
# The API part of docs/reference.md is generated from the docstrings by mkdocstrings
# (``::: creditguard`` renders every name in ``creditguard.__all__``, new ones included), so
# these tests check what the generation cannot: that every public name is rendered by a
# directive (or, for names the directives filter out, described in the prose), that it has
# a docstring, and that the prose around it (configuration, events, sandbox, command line)
# matches the code.

PUBLIC_MODULES = {"creditguard": creditguard, "creditguard.testing": creditguard.testing}
# Public members without a docstring (none: every member must have one).
UNDOCUMENTED_MEMBERS: set[str] = set()


def _reference_text() -> str:
    return (DOCS / "reference.md").read_text(encoding="utf-8")


def _directives() -> dict[str, str]:
    """``::: path`` lines of the reference -> the indented options under each."""
    found: dict[str, str] = {}
    lines = _reference_text().splitlines()
    for index, line in enumerate(lines):
        match = re.fullmatch(r":::\s+([\w.]+)\s*", line)
        if match:
            options = []
            for following in lines[index + 1 :]:
                if following and not following.startswith(" "):
                    break
                options.append(following)
            found[match.group(1)] = "\n".join(options)
    return found


def _prose() -> str:
    """The reference without its directives: what a reader sees besides the docstrings."""
    return re.sub(r"^:::.*(\n[ \t]+.*)*", "", _reference_text(), flags=re.MULTILINE)


def _filtered_out(name: str) -> bool:
    """Whether mkdocs.yml's ``filters`` keep ``name`` out of a module's directive."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert 'filters: ["!^_"]' in config, "update _filtered_out to the filters of mkdocs.yml"
    return name.startswith("_")


def _public_names() -> list[Any]:
    return [
        pytest.param(module, name, id=f"{module}.{name}")
        for module, namespace in PUBLIC_MODULES.items()
        for name in namespace.__all__
    ]


@pytest.mark.parametrize(("module", "name"), _public_names())
def test_reference_renders_every_public_name(module: str, name: str) -> None:
    directives = _directives()
    if f"{module}.{name}" in directives:
        return
    options = directives.get(module)
    if options is not None and "members:" not in options and not _filtered_out(name):
        return
    assert f"`{name}`" in _prose() or f"`{module}.{name}`" in _prose(), (
        f"reference.md neither renders {module}.{name} (a ::: directive) nor describes it"
    )


def _attribute_docstring(module: str, name: str) -> str | None:
    """The docstring of a module-level constant: a string right after its assignment."""
    body = ast.parse(inspect.getsource(importlib.import_module(module))).body
    for node, following in itertools.pairwise(body):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return str(following.value.value)
            return None
    return None


def _defining_module(module: str, name: str) -> str:
    exports: dict[str, str] = getattr(PUBLIC_MODULES[module], "_EXPORTS", {})
    relative = exports.get(name)
    return module if relative is None else importlib.util.resolve_name(relative, module)


@pytest.mark.parametrize(("module", "name"), _public_names())
def test_every_public_name_has_a_docstring(module: str, name: str) -> None:
    obj = getattr(PUBLIC_MODULES[module], name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"
        return
    # A constant: a docstring after its assignment, or described in the prose.
    documented = _attribute_docstring(_defining_module(module, name), name)
    assert documented or f"`{name}`" in _prose() or f"`{module}.{name}`" in _prose(), (
        f"{module}.{name} has no docstring and the reference does not describe it"
    )


def _public_members() -> list[tuple[str, Any]]:
    members = []
    for namespace in PUBLIC_MODULES.values():
        for name in namespace.__all__:
            obj = getattr(namespace, name)
            if not inspect.isclass(obj):
                continue
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                if isinstance(value, property):
                    value = value.fget
                elif isinstance(value, (classmethod, staticmethod)):
                    value = value.__func__
                if callable(value):
                    members.append((f"{name}.{member}", value))
    return members


def test_public_members_have_docstrings() -> None:
    missing = {name for name, value in _public_members() if not (value.__doc__ or "").strip()}
    assert missing <= UNDOCUMENTED_MEMBERS, (
        f"members without a docstring: {missing - UNDOCUMENTED_MEMBERS}"
    )


def test_reference_directives_name_what_exists() -> None:
    for path in _directives():
        module_path, _, attribute = path.rpartition(".")
        try:
            importlib.import_module(path)
        except ImportError:
            assert hasattr(importlib.import_module(module_path), attribute), path


def _documented_defaults(table_heading: str) -> dict[str, str]:
    """``| `name` | `default` | ...`` rows of the table under ``table_heading``."""
    _, _, rest = _reference_text().partition(table_heading)
    rows: dict[str, str] = {}
    for line in rest.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        match = re.match(r"\|\s*`(\w+)`\s*\|\s*`([^`]*)`", line)
        if match:
            rows[match.group(1)] = match.group(2)
    assert rows, f"no table under {table_heading!r}"
    return rows


def test_reference_configuration_matches_the_constructor() -> None:
    documented = _documented_defaults("## Configuration")
    parameters = inspect.signature(CreditGuard).parameters
    for name in parameters:
        assert name in documented, f"## Configuration: {name} missing"
    for name, shown in documented.items():
        assert name in parameters, f"## Configuration: {name} is not a parameter"
        try:
            value = ast.literal_eval(shown)
        except (ValueError, SyntaxError):
            continue  # described in words (an environment variable, a constructor...)
        assert parameters[name].default == value, f"## Configuration: {name} is not {shown}"


def _section(heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split()[0]
    _, found, rest = _reference_text().partition(f"\n{heading}\n")
    assert found, f"reference.md has no {heading!r}"
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.MULTILINE)
    return rest if end is None else rest[: end.start()]


def test_reference_events_are_the_kinds_the_guard_emits() -> None:
    table = set(re.findall(r'^\| `"(\w+)"`', _section("## Events"), flags=re.MULTILINE))
    docstring = set(re.findall(r'``"(\w+)"``', GuardEvent.__doc__ or ""))
    assert table == docstring


def test_refusals_emit_the_events_the_reference_lists() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, retry=RetryPolicy(attempts=1), on_event=log.append
    )
    fake.fail_next(503)
    with pytest.raises(BalanceUnavailable), guard.spend(1):
        pytest.fail("failing closed")
    wrong = guard.for_key("wrong-key")
    with pytest.raises(AuthenticationError), wrong.spend(1):
        pytest.fail("a rejected key")
    assert [e.kind for e in log] == ["unavailable", "rejected"]
    assert all(e.error is not None for e in log)


@pytest.mark.parametrize("cost", [-1, 1.5, True, "1"])
def test_spend_validates_its_cost_as_the_reference_says(cost: Any) -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    with pytest.raises((TypeError, ValueError)):
        creditguard.Spend(guard, cost)


def test_reference_documents_every_cli_option() -> None:
    text = _reference_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for action in parser._actions:  # the command's own: --version
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"creditguard {option}" in text, f"creditguard {option} undocumented"
    for name, sub in subparsers.choices.items():  # type: ignore[union-attr]
        assert f"creditguard {name}" in text, name
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"creditguard {name} {option} undocumented"


def test_reference_documents_no_cli_option_that_does_not_exist() -> None:
    cli = _section("## Command line")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    options = {
        option
        for sub in [parser, *subparsers.choices.values()]  # type: ignore[union-attr]
        for action in sub._actions
        for option in action.option_strings
    }
    for option in set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", cli)):
        assert option in options, f"reference.md documents {option}, which does not exist"


def test_reference_sandbox_endpoints_exist() -> None:
    section = _section("### The sandbox's HTTP API")
    rows = re.findall(r"^\| `(GET|POST|DELETE) (/[\w/-]+)", section, flags=re.MULTILINE)
    assert len(rows) == 6
    fake = FakeLensmor()
    with httpx.Client(transport=fake.transport, base_url="http://sandbox") as client:
        for method, path in rows:
            response = client.request(method, path, headers={"Authorization": "Bearer test-key"})
            assert response.status_code not in (404, 405), f"{method} {path}"


def test_reference_lists_every_fault() -> None:
    section = _section("### The sandbox's HTTP API")
    listed = re.findall(r'^\| `"([\w-]+)"`', section, flags=re.MULTILINE)
    assert listed == list(creditguard.testing.FAULTS)


# -- the outcomes the consistency page promises ------------------------------------------


def test_outcome_action_raises() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=log.append)
    spend = guard.spend(10)

    def action() -> None:
        with spend:
            fake.charge(10)
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        action()
    assert spend.balance_after is None
    assert guard._account.snapshot() == (None, 0, 0)  # released, cache dropped
    assert [e.kind for e in log] == ["admitted", "failed"]
    assert guard.balance().total_balance == 30040  # read anew


def test_outcome_a_blocks_balance_after_is_read_when_asked_for() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=log.append)

    with guard.spend(10) as spend:
        fake.charge(10)
    reads = fake.balance_requests
    assert [e.kind for e in log] == ["admitted", "spent"]
    assert log[-1].balance_after is None  # the block exited with no read
    assert guard._account.snapshot()[1:] == (10, 1)  # held until a read includes it
    after = spend.balance_after  # that read, now
    assert after is not None
    assert after.total_balance == 30040
    assert fake.balance_requests == reads + 1
    assert guard._account.snapshot() == (after, 0, 0)  # released; the read is stored
    assert spend.balance_after is after  # remembered
    assert fake.balance_requests == reads + 1
    assert [e.kind for e in log] == ["admitted", "spent"]  # no event for the read


def test_outcome_the_read_after_a_block_fails() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, retry=RetryPolicy(attempts=1), on_event=log.append
    )

    with guard.spend(10) as spend:
        fake.charge(10)
    cached = guard._account.snapshot()[0]
    assert cached is not None
    fake.fail_next(503)  # the read balance_after asks for
    assert spend.balance_after is None
    assert [e.kind for e in log] == ["admitted", "spent"]  # no event
    assert guard._account.snapshot() == (cached, 10, 1)  # held, the cache unchanged
    assert guard.balance().total_balance == 30040  # a later read settles the block
    assert guard._account.snapshot()[1:] == (0, 0)


def test_outcome_refresh_fails_but_the_result_is_returned() -> None:
    """The refresh a settle waits for (``hold.settle()``, a block over an async-only
    transport) fails: ``None``, released, hard invalidation, ``"refresh_failed"``."""
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key, transport=fake.transport, retry=RetryPolicy(attempts=1), on_event=log.append
    )

    hold = guard.hold(10)
    fake.charge(10)
    fake.fail_next(503)  # the refresh after the hold's work
    assert hold.settle() is None
    assert hold.balance_after is None
    assert [e.kind for e in log] == ["admitted", "refresh_failed"]
    assert guard._account.snapshot() == (None, 0, 0)
    assert guard.balance().total_balance == 30040


@pytest.mark.anyio
async def test_outcome_refresh_fails_over_an_async_only_transport() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(
        fake.api_key,
        transport=AsyncOnly(fake.transport),
        retry=RetryPolicy(attempts=1),
        on_event=log.append,
    )

    async with guard.spend(10) as spend:
        fake.charge(10)
        fake.fail_next(503)  # the refresh after the block, at its exit
    assert spend.balance_after is None
    assert await spend.abalance_after() is None  # no second try
    assert [e.kind for e in log] == ["admitted", "refresh_failed"]
    assert guard._account.snapshot() == (None, 0, 0)
    assert (await guard.abalance()).total_balance == 30040
    await guard.aclose()


def test_outcome_fail_closed_and_fail_open() -> None:
    fake = FakeLensmor()
    closed = CreditGuard(fake.api_key, transport=fake.transport, retry=RetryPolicy(attempts=1))
    fake.fail_next(503)
    with pytest.raises(BalanceUnavailable), closed.spend(0):
        pytest.fail("a zero-cost call still needs a balance")
    opened = CreditGuard(
        fake.api_key,
        transport=fake.transport,
        retry=RetryPolicy(attempts=1),
        on_unavailable="allow",
    )
    fake.fail_next(503)
    with opened.spend(10) as spend:
        fake.charge(10)
    assert spend.balance_before is None
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == 30040
    wrong = CreditGuard("wrong-key", transport=fake.transport, on_unavailable="allow")
    with pytest.raises(AuthenticationError), wrong.spend(1):
        pytest.fail("a rejected key is never fail-open")


def test_outcome_refused_calls_reserve_nothing() -> None:
    fake = FakeLensmor(subscription_balance=10, gift_balance=0)
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    with guard.spend(6) as spend:
        with pytest.raises(InsufficientCredits) as caught, guard.spend(5):
            pytest.fail("only 4 credits are not reserved")
        assert (caught.value.required, caught.value.available) == (5, 4)
        assert caught.value.balance is not None
        assert caught.value.balance.total_balance == 10
        assert guard._account.snapshot()[1:] == (6, 1)  # the refused call took nothing
        fake.charge(6)
    assert guard._account.snapshot()[1:] == (6, 1)  # the block's, until a read
    assert spend.balance_after is not None
    assert spend.balance_after.total_balance == 4
    assert guard._account.snapshot()[1:] == (0, 0)


def _result(ops: Ops[T]) -> T:
    """The result of an operation of the memory backend (it needs no I/O: it yields
    nothing)."""
    try:
        call = next(ops)
    except StopIteration as stop:
        result: T = stop.value
        return result
    raise AssertionError(f"a memory operation asked for I/O: {call!r}")


def test_a_read_started_before_invalidate_is_not_stored() -> None:
    fake = FakeLensmor()
    guard = CreditGuard(fake.api_key, transport=fake.transport, ttl=60)
    account = guard._account
    step = _result(account.read(60, None, True))
    assert not isinstance(step, CreditBalance)
    flight, lead, _ = step
    assert isinstance(flight, Flight)
    assert lead
    guard.invalidate()
    _result(account.record(flight, fake.balance, None))
    assert account.snapshot()[0] is None
    assert guard.balance() == fake.balance  # a new read


@pytest.mark.anyio
async def test_outcome_cancelled_during_the_action() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=log.append)
    await guard.abalance()  # warm: admission then has no checkpoint the cancel could hit
    spend = guard.spend(10)
    with anyio.move_on_after(0.05):
        async with spend:
            await anyio.sleep(10)
    assert spend.balance_after is None
    assert guard._account.snapshot() == (None, 0, 0)
    assert [e.kind for e in log] == ["admitted", "cancelled"]


@pytest.mark.anyio
async def test_outcome_cancelled_during_the_read_after_a_block() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=log.append)
    await guard.abalance()
    async with guard.spend(10) as spend:
        fake.charge(10)
    cached = guard._account.snapshot()[0]
    fake.latency = 0.2
    with anyio.move_on_after(0.1) as scope:
        await spend.abalance_after()
    assert scope.cancelled_caught
    assert [e.kind for e in log] == ["admitted", "spent"]  # no event
    assert guard._account.snapshot() == (cached, 10, 1)  # held, the cache unchanged
    fake.latency = 0.0
    after = await spend.abalance_after()  # asked again: read again
    assert after is not None
    assert after.total_balance == 30040
    assert guard._account.snapshot() == (after, 0, 0)


@pytest.mark.anyio
async def test_outcome_cancelled_during_the_refresh() -> None:
    """Cancelled while its refresh is in flight (``hold.asettle()``, a block over an
    async-only transport): the cancellation goes on, released, hard invalidation."""
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=log.append)
    hold = await guard.ahold(10)
    fake.charge(10)
    fake.latency = 0.2
    with anyio.move_on_after(0.1) as scope:
        await hold.asettle()
    assert scope.cancelled_caught
    assert [e.kind for e in log] == ["admitted", "cancelled"]
    assert guard._account.snapshot() == (None, 0, 0)
    fake.latency = 0.0
    assert (await guard.abalance()).total_balance == 30040

    only = CreditGuard(fake.api_key, transport=AsyncOnly(fake.transport))
    await only.abalance()
    done: list[str] = []
    fake.latency = 0.2
    with anyio.move_on_after(0.1) as scope:
        async with only.spend(10):
            fake.charge(10)
            done.append("unlocked")
        done.append("settled")
    assert scope.cancelled_caught
    assert done == ["unlocked"]  # the block ran; it was cancelled while settling
    assert fake.charges == 2
    assert only._account.snapshot() == (None, 0, 0)
    await guard.aclose()
    await only.aclose()


@pytest.mark.anyio
async def test_no_overspend_and_shared_reads() -> None:
    fake = FakeLensmor(subscription_balance=100, gift_balance=0, latency=0.01)
    guard = CreditGuard(fake.api_key, transport=fake.transport)
    outcomes: list[str] = []

    @guard.requires_credits(1)
    async def buy() -> None:
        await anyio.sleep(0.01)
        fake.charge(1)

    async def one() -> None:
        try:
            await buy()
            outcomes.append("ran")
        except InsufficientCredits:
            outcomes.append("refused")

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)
    assert outcomes.count("ran") == 100
    assert fake.balance.total_balance == 0
    assert fake.balance_requests < 10


def test_outcome_a_decorated_call_returns_before_its_refresh() -> None:
    fake = FakeLensmor()
    log: list[GuardEvent] = []
    guard = CreditGuard(fake.api_key, transport=fake.transport, on_event=log.append)

    @guard.requires_credits(10)
    def unlock() -> str:
        fake.charge(10)
        return "unlocked"

    assert unlock() == "unlocked"
    assert fake.balance_requests == 1  # no refresh before the call returned
    assert [e.kind for e in log] == ["admitted", "spent"]
    assert log[-1].balance_after is None
    cached, reserved, in_flight = guard._account.snapshot()
    assert cached is not None
    assert cached.total_balance == 30050
    assert (reserved, in_flight) == (10, 1)  # held until a read includes it
    assert guard.balance().total_balance == 30040  # that read
    assert guard._account.snapshot()[1:] == (0, 0)
