#!/usr/bin/env python3
"""Run a how-to page's Python sample as a reader would, with whatever this interpreter has.

Usage::

    python .ci/run_sample.py PAGE [--section HEADING] [--sandbox-python PYTHON]

The page's untitled ```` ```python ```` blocks (of the section under ``HEADING`` only, when
given: from that heading to the next heading of the same or a higher level) run in page
order, in one module, against the sandbox (``creditguard sandbox``, started with the page's
own ``creditguard sandbox ...`` arguments if it shows a command, on a free loopback port)
with ``LENSMOR_BASE_URL`` and ``LENSMOR_API_KEY`` set as the pages tell the reader. A
```` ```text title="Output" ```` block right after a python block is what that block prints
(the sandbox's address shown as ``http://127.0.0.1:8787``). Titled blocks are files of a
test suite, not run here.

It uses nothing but the standard library and what the sample imports, so it runs in a
virtualenv that has one extra installed: a missing import fails it (exit status 1). The
sandbox runs in another interpreter (``--sandbox-python``, default this one), so that a
venv without the ``sandbox`` extra can still be served one.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_samples import Block, blocks  # the module next to this file

SHOWN_URL = "http://127.0.0.1:8787"
_HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<title>.+?)\s*$")


def sandbox_args(page_blocks: list[Block]) -> list[str]:
    """The page's ``creditguard sandbox`` arguments, less ``--host`` and ``--port``."""
    for block in page_blocks:
        if block.lang not in ("bash", "console", "shell"):
            continue
        for line in block.code.splitlines():
            if block.lang == "console" and not line.startswith("$ "):
                continue
            words = shlex.split(line.removeprefix("$ "), comments=True)
            if words[:2] == ["creditguard", "sandbox"]:
                args, rest = [], iter(words[2:])
                for word in rest:
                    if word in ("--host", "--port"):
                        next(rest, None)
                    elif not word.startswith(("--host=", "--port=")):
                        args.append(word)
                return args
    return []


def api_key(args: list[str]) -> str:
    for index, word in enumerate(args):
        if word == "--api-key" and index + 1 < len(args):
            return args[index + 1]
        if word.startswith("--api-key="):
            return word.partition("=")[2]
    return "test-key"


def section_lines(path: Path, heading: str | None) -> tuple[int, int]:
    """The page lines (1-based, end exclusive) of the section under ``heading``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if heading is None:
        return 1, len(lines) + 1
    start = level = None
    fenced = False
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        if start is None:
            if match["title"].strip("`").startswith(heading):
                start, level = number, len(match["level"])
        elif len(match["level"]) <= (level or 0):
            return start, number
    if start is None:
        raise SystemExit(f"{path}: no heading starting with {heading!r}")
    return start, len(lines) + 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def sandbox(python: str, args: list[str]) -> Iterator[str]:
    """``creditguard sandbox`` on a free loopback port until the block ends; its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [python, "-m", "creditguard", "sandbox", "--host", "127.0.0.1"]
    command += ["--port", str(port), *args]
    proc = subprocess.Popen(  # noqa: S603 - our interpreter, our package
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        request = urllib.request.Request(  # noqa: S310 - loopback http only
            f"{url}/external/credits/balance",
            headers={"Authorization": f"Bearer {api_key(args)}"},
        )
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the sandbox exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                with urllib.request.urlopen(request, timeout=2):  # noqa: S310
                    break
            except urllib.error.HTTPError:
                break  # it answers (a scripted fault, a shaped error): it is up
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the sandbox did not answer within 30 s") from None
                time.sleep(0.05)  # polling a server that is starting: nothing to wait on
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def normalise(text: str, url: str) -> str:
    text = text.replace(url, SHOWN_URL)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def run_page(page: Path, heading: str | None, sandbox_python: str) -> int:
    page_blocks = blocks(page)
    first, end = section_lines(page, heading)
    chosen = [
        (index, block)
        for index, block in enumerate(page_blocks)
        if block.lang == "python" and block.title is None and first <= block.line < end
    ]
    if not chosen:
        print(f"{page}: no python sample to run", file=sys.stderr)
        return 1
    args = sandbox_args(page_blocks)
    if os.environ.get("DJANGO_SETTINGS_MODULE"):  # a Django page runs inside a project
        import django

        django.setup()
    module = types.ModuleType("__main__")
    with sandbox(sandbox_python, args) as url:
        os.environ["LENSMOR_BASE_URL"] = url
        os.environ["LENSMOR_API_KEY"] = api_key(args)
        sys.modules["__main__"] = module
        for index, block in chosen:
            where = f"{page}:{block.line}"
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    code = compile(block.code, where, "exec")
                    contextvars.copy_context().run(exec, code, module.__dict__)
            except BaseException:
                sys.stdout.write(out.getvalue())
                print(f"FAILED: {where}", file=sys.stderr)
                traceback.print_exc()
                return 1
            sys.stdout.write(out.getvalue())
            following = page_blocks[index + 1] if index + 1 < len(page_blocks) else None
            if following is not None and following.title == "Output":
                expected = normalise(following.code, url)
                if normalise(out.getvalue(), url) != expected:
                    print(f"FAILED: {where} printed otherwise than its Output:", file=sys.stderr)
                    print(expected, file=sys.stderr)
                    return 1
    print(f"ok: {page}" + (f" ({heading})" if heading else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("page", type=Path)
    parser.add_argument("--section", help="run only the section under this heading")
    parser.add_argument(
        "--sandbox-python", default=sys.executable, help="the interpreter that serves the sandbox"
    )
    args = parser.parse_args(argv)
    return run_page(args.page, args.section, args.sandbox_python)


if __name__ == "__main__":
    sys.exit(main())
