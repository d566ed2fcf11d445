"""The framework how-to pages' code, run as the reader would run it.

Every untitled ```` ```python ```` block of a page runs, in page order, in one module
per page, against the sandbox served over loopback HTTP with ``LENSMOR_BASE_URL`` and
``LENSMOR_API_KEY`` set as the pages tell the reader. A ```` ```text title="Output" ````
block right after a python block is what that block prints.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from creditguard import CreditGuard
from creditguard.guard import guard as _guard
from creditguard.testing import FakeLensmor, serve

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = (
    "howto/asgi-starlette-fastapi.md",
    "howto/flask.md",
    "howto/django.md",
    "howto/wsgi.md",
)
_FENCE = re.compile(r"^```(?P<info>.*)$")


def blocks(page: str) -> list[tuple[str, str, int]]:
    """``(info, code, line)`` of each fenced block of ``page``."""
    found: list[tuple[str, str, int]] = []
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None or not match["info"]:
            i += 1
            continue
        start = i + 1
        body: list[str] = []
        i += 1
        while lines[i] != "```":
            body.append(lines[i])
            i += 1
        found.append((match["info"].strip(), "\n".join(body) + "\n", start + 1))
        i += 1
    return found


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLensmor]:
    fake = FakeLensmor(api_key="test-key")  # what `creditguard sandbox` starts with
    with serve(fake.app) as url:
        monkeypatch.setenv("LENSMOR_BASE_URL", url)
        monkeypatch.setenv("LENSMOR_API_KEY", fake.api_key)
        monkeypatch.setattr(_guard, "_default", None)
        yield fake


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_and_prints_what_it_shows(page: str, sandbox: FakeLensmor) -> None:
    page_blocks = blocks(page)
    python = [b for b in page_blocks if b[0] == "python"]
    assert python, f"{page} has no python example"
    name = "docs_" + re.sub(r"\W", "_", page)
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        for index, (info, code, line) in enumerate(page_blocks):
            if info != "python":
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                # In a context of its own, as a reader's fresh interpreter would be.
                contextvars.copy_context().run(
                    exec, compile(code, f"{page}:{line}", "exec"), module.__dict__
                )
            following = page_blocks[index + 1] if index + 1 < len(page_blocks) else None
            if following is not None and following[0] == 'text title="Output"':
                assert out.getvalue() == following[1], f"{page}:{line}"
            else:
                assert out.getvalue() == "", f"{page}:{line} prints without an Output block"
    finally:
        del sys.modules[name]
        for value in list(vars(module).values()):
            if isinstance(value, CreditGuard):
                value.close()
        if _guard._default is not None:
            _guard._default.close()
    assert sandbox.charges > 0


def test_every_page_is_in_the_nav() -> None:
    nav = (DOCS.parent / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert f": {page}\n" in nav, page
