"""docs/architecture.md is the map of the code: it must stay true. Every module of the
package is on it, every test it names exists, and the layers' import rules hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "creditguard"


def _modules() -> list[str]:
    """The package's modules and ``.lua`` scripts, as the page names them."""
    names = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem not in ("__main__", "__init__"):
            names.append(path.stem)
    names += [path.name for path in sorted(PACKAGE.glob("*.lua"))]
    return names


def test_every_module_is_on_the_map() -> None:
    missing = [name for name in _modules() if f"`{name}`" not in PAGE]
    assert missing == []


def test_every_test_the_map_names_exists() -> None:
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", PAGE)
    assert named
    for path, test in named:
        source = (ROOT / path).read_text(encoding="utf-8")
        if test:
            assert re.search(rf"def {test}\(", source), f"{path}::{test}"


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports (relative imports, one level)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_account_state_imports_no_io_library_and_no_guard() -> None:
    for module in ("_steps", "_protocols", "_holding", "_state"):
        source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from) (httpx|redis)\b", source, re.M), module
        assert not _imports(module) & {"_guard", "_client", "_edges", "redis"}, module


def test_backends_and_the_http_edge_know_no_guard() -> None:
    for module in ("_client", "redis", "_redis_state", "_redis_gate", "_redis_leases"):
        assert "_guard" not in _imports(module), module
    assert not _imports("_client") & {"_state", "_holding", "_protocols"}


def test_web_adapters_use_only_the_public_guard() -> None:
    allowed = {"_guard", "_web", "_errors", "_config"}
    for module in ("_web", "asgi", "wsgi", "fastapi", "flask", "django"):
        assert _imports(module) <= allowed, (module, _imports(module) - allowed)
