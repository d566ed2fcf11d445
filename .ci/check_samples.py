#!/usr/bin/env python3
"""Type-check every Python sample of README.md and docs/**/*.md with ``mypy --strict``.

Usage: ``python .ci/check_samples.py [PAGE ...]`` (default: README.md and every page under
docs/), from the repository root, with mypy installed in the running interpreter.

A page's samples are checked the way the tests run them (tests/test_docs_examples.py and
tests/web/test_docs_pages.py):

* the untitled ```` ```python ```` blocks of a page, blocks nested in admonitions and tabs
  included, are one module, in page order (they run in one namespace per page);
* a ```` ```python title="name.py" ```` block is a file of that name, beside the page's other
  titled blocks (``conftest.py`` and the test files it serves).

Each page is laid out in a directory of its own and checked by a mypy run of its own (so
two pages may both have a ``conftest.py``), with the repository's mypy configuration and
``--strict``; the runs share one cache. Errors are reported at the page's own lines.

A sample that is deliberately partial (a fragment of a larger program) is left out when
the line right before its fence is ``<!-- no-check -->``: use it sparingly, never to hide
an error in a sample that is meant to run. Exit status: 0 when every sample checks, 1
otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_CHECK = "<!-- no-check -->"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_TITLE = re.compile(r'title="(?P<title>[^"]*)"')
_MYPY_LINE = re.compile(r"^(?P<file>[^:\s]+\.py):(?P<line>\d+):(?P<rest>.*)$")


@dataclasses.dataclass
class Block:
    lang: str
    title: str | None
    code: str
    line: int  # the page line of the block's first code line (1-based)
    no_check: bool


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a page, in order (nested ones dedented)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        before = lines[i - 1].strip() if i > 0 else ""
        start = i + 2
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        title = _TITLE.search(info)
        found.append(
            Block(
                lang=info.split()[0] if info else "",
                title=title["title"] if title else None,
                code="\n".join(body) + "\n",
                line=start,
                no_check=before == NO_CHECK,
            )
        )
    return found


@dataclasses.dataclass
class Laid:
    """A page's samples written out: each file with, per file line, the page line."""

    page: str
    directory: Path
    files: dict[str, list[int]]


def lay_out(page: str, directory: Path) -> Laid | None:
    """Write a page's python samples into ``directory``; None when it has none to check."""
    page_blocks = [b for b in blocks(ROOT / page) if b.lang in ("python", "py") and not b.no_check]
    if not page_blocks:
        return None
    directory.mkdir(parents=True)
    files: dict[str, list[int]] = {}
    module_lines: list[str] = []
    module_map: list[int] = []
    for block in page_blocks:
        code_lines = block.code.splitlines()
        lines_map = [block.line + n for n in range(len(code_lines))]
        if block.title is None:
            module_lines += code_lines
            module_map += lines_map
            continue
        name = block.title
        if not re.fullmatch(r"\w+\.py", name):
            raise SystemExit(f"{page}:{block.line - 1}: a python block titled {name!r}")
        if name in files:
            raise SystemExit(f"{page}:{block.line - 1}: {name} appears twice on the page")
        (directory / name).write_text(block.code, encoding="utf-8")
        files[name] = lines_map
    if module_lines:
        name = "page_" + re.sub(r"\W", "_", Path(page).stem) + ".py"
        (directory / name).write_text("\n".join(module_lines) + "\n", encoding="utf-8")
        files[name] = module_map
    return Laid(page, directory, files)


def _untyped_django(laid: Laid) -> list[str]:
    """Django ships no type information (pyproject.toml makes its names Any), so its
    decorators (``csrf_exempt``...) are untyped ones on a page whose samples use Django."""
    for name in laid.files:
        source = (laid.directory / name).read_text(encoding="utf-8")
        if re.search(r"^\s*(from|import) django\b", source, re.MULTILINE):
            return ["--allow-untyped-decorators"]
    return []


def check(laid: Laid, cache_dir: Path) -> tuple[int, list[str]]:
    """mypy --strict over one page's files: (exit status, messages at the page's lines)."""
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(cache_dir),
        "--no-error-summary",
        "--show-error-codes",
        "--hide-error-context",
        "--no-pretty",
        *_untyped_django(laid),
        *sorted(laid.files),
    ]
    env = {**os.environ, "MYPYPATH": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(  # noqa: S603 - our own interpreter, our own files
        command, cwd=laid.directory, capture_output=True, text=True, env=env, check=False
    )
    messages: list[str] = []
    for line in (proc.stdout + proc.stderr).splitlines():
        match = _MYPY_LINE.match(line)
        if match and match["file"] in laid.files:
            mapping = laid.files[match["file"]]
            number = int(match["line"])
            at = mapping[number - 1] if 0 < number <= len(mapping) else number
            line = f"{laid.page}:{at}:{match['rest']}"
        if line.strip():
            messages.append(line)
    return proc.returncode, messages


def pages(given: list[str]) -> list[str]:
    if given:
        return given
    found = ["README.md"] if (ROOT / "README.md").exists() else []
    return found + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("pages", nargs="*", help="pages, relative to the repository root")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mypy runs at once (default: 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="check-samples-") as tmp:
        work = Path(tmp)
        cache_dir = work / ".mypy_cache"
        laid = [
            out
            for index, page in enumerate(pages(args.pages))
            if (out := lay_out(page, work / f"p{index}")) is not None
        ]
        # One run first fills the shared cache (the library, the frameworks, the stdlib):
        # the runs after it only check their own samples.
        results = [check(laid[0], cache_dir)] if laid else []
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results += pool.map(lambda one: check(one, cache_dir), laid[1:])
    failed = 0
    for one, (status, messages) in zip(laid, results, strict=True):
        samples = len(one.files)
        if status == 0:
            print(f"ok      {one.page} ({samples} module{'s' * (samples != 1)})")
            continue
        failed += 1
        print(f"FAILED  {one.page}")
        for message in messages:
            print(f"  {message}")
    print(f"{len(laid) - failed} of {len(laid)} pages' samples pass mypy --strict")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
