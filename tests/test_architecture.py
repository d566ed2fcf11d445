"""docs/architecture.md is the map of the code: it must stay true. Every module of the
package is on it, every test it names exists, no module is over 600 lines, the layers'
import rules hold, no two modules import each other in a cycle (``TYPE_CHECKING``
imports and imports inside functions count), Lua lives only in ``.lua`` files, and only
the facade reads a ``CreditGuard``'s private attributes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "creditguard"

# The top-level modules kept as short re-exports of their layer's module.
SHIMS = {"redis", "asgi", "wsgi", "fastapi", "flask", "django"}


def _files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    """``creditguard/core/flows.py`` -> ``creditguard.core.flows``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_name(p): p for p in _files()}


def _imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports, anywhere in it (``TYPE_CHECKING`` blocks and
    function bodies included); ``from creditguard.core import flows`` names the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("creditguard"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("creditguard"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    found.discard(here)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in ("core", "guard", "lensmor", "web", "cli", "testing", "telemetry", "ledger"):
        return parts[1]
    if parts[1] == "backends":
        return "backends." + parts[2] if len(parts) > 2 else "backends"
    return "root"  # __main__, the shims


def test_every_module_is_on_the_map() -> None:
    shown = [str(p.relative_to(PACKAGE)) for p in _files() if p.name != "__init__.py"]
    shown += [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.lua"))]
    missing = [name for name in shown if f"`{name}`" not in PAGE]
    assert missing == []


def test_every_test_the_map_names_exists() -> None:
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", PAGE)
    assert named
    for path, test in named:
        source = (ROOT / path).read_text(encoding="utf-8")
        if test:
            assert re.search(rf"def {test}\(", source), f"{path}::{test}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"{path.relative_to(ROOT)}: {lines} lines"


def test_no_import_cycle() -> None:
    """Not even through ``TYPE_CHECKING`` or a function-level import."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for imported in sorted(GRAPH[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


# What each layer may import (besides itself). ``lensmor.tasks`` is the one Lensmor
# module above the facade: the contact-unlock helper takes a ``CreditGuard``.
ALLOWED = {
    "core": set(),
    "backends.memory": {"core"},
    "backends.redis": {"core", "backends.memory"},
    "lensmor": {"core"},
    "guard": {"core", "lensmor", "backends.memory", "telemetry"},
    "telemetry": {"core"},
    "web": {"core", "guard"},
    "testing": {"core", "lensmor"},
    "ledger": {"core", "telemetry"},
    "cli": {"core", "guard", "lensmor", "backends.redis", "testing", "ledger", "root"},
}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, imported in GRAPH.items():
        layer = _layer(module)
        if layer not in ALLOWED or module == "creditguard.lensmor.tasks":
            continue
        for other in imported:
            if _layer(other) not in ALLOWED[layer] | {layer}:
                wrong.append(f"{module} -> {other}")
    assert wrong == []
    assert GRAPH["creditguard.lensmor.tasks"] <= {
        m for m in MODULES if _layer(m) in ("core", "lensmor")
    } | {"creditguard.guard.guard", "creditguard.guard.spend"}


def test_opentelemetry_is_imported_lazily_and_only_by_telemetry() -> None:
    """``import creditguard`` never imports OpenTelemetry: only the telemetry layer does,
    inside its functions (or for type checking)."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            ):
                lazy.update(id(inner) for inner in ast.walk(node) if inner is not node)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if not any(n.split(".")[0] == "opentelemetry" for n in names):
                continue
            assert _layer(module) == "telemetry", f"{module} imports OpenTelemetry"
            assert id(node) in lazy, f"{module}:{node.lineno} imports OpenTelemetry eagerly"


def test_the_core_imports_no_io_library() -> None:
    for module, path in MODULES.items():
        if _layer(module) in ("core", "backends.memory"):
            source = path.read_text(encoding="utf-8")
            assert not re.search(r"^\s*(import|from) (httpx|redis)\b", source, re.M), module


def test_web_adapters_use_the_public_guard() -> None:
    allowed = {
        "creditguard.guard.guard",
        "creditguard.guard.spend",
        "creditguard.web.common",
        "creditguard.web.problems",
        "creditguard.core.errors",
        "creditguard.core.policy",
        "creditguard.core.balance",
        "creditguard.core.checks",
    }
    for module, imported in GRAPH.items():
        if _layer(module) == "web":
            assert imported <= allowed, (module, imported - allowed)


def test_the_public_paths_are_short_reexports() -> None:
    for name in SHIMS:
        source = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
        assert len(source.splitlines()) <= 10, name
        assert "import *" in source


def test_lua_lives_in_lua_files() -> None:
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"redis\.call\(|redis\.pcall\(|\bKEYS\[\d", source), module


# A CreditGuard's private attributes with names nothing else uses; and any private
# attribute read on a name that says it is a guard (``guard._x``, ``self._guard._x``).
PRIVATE = {"_clients", "_owner", "_bind", "_lensmor", "_ahold", "_engine"}


def _guardish(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return "guard" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "guard" in node.attr.lower()
    return False


def test_only_the_facade_reads_a_guards_private_attributes() -> None:
    wrong = []
    for module, path in MODULES.items():
        layer = _layer(module)
        if layer == "guard":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__"):
                continue
            if layer == "core" and node.attr == "_engine":
                continue  # Guarded._engine / Held._engine: the core's own
            if node.attr in PRIVATE or _guardish(node.value):
                wrong.append(f"{module}:{node.lineno} .{node.attr}")
    assert wrong == []
