"""The layout's import rule, read from the code (docs/architecture.md):

core <- plugins <- app <- cli, with ops and dev on top. The core imports no
plugin, operator or developer tool; a plugin imports only the core and other
plugins; nothing imports upward; and no bridge module imports itself through others.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "bridge"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, typing_only: bool) -> Iterator[tuple[str, bool, int]]:
    """(imported bridge module, only for type checking, line) for every import under `tree`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), module, True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), module, typing_only)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, typing_only, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                if MODULES[module].name != "__init__.py":
                    package = package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                # `from bridge.plugins import audio` imports the module bridge.plugins.audio
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), typing_only, node.lineno
        else:
            yield from _imports(node, module, typing_only)


def imports_of(module: str) -> list[tuple[str, bool, int]]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = [(name, t, line) for name, t, line in _imports(tree, module, False)]
    return [(name, t, line) for name, t, line in found if name.split(".")[0] == "bridge"]


def layer(module: str) -> str:
    """core, plugins, ops, dev, cli, or app (the wiring: bridge.app and any other top module)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("core", "plugins", "ops", "dev"):
        return parts[1]
    if module in ("bridge.cli", "bridge.__main__"):
        return "cli"
    return "app"


# What each layer may import (itself included).
ALLOWED = {
    "core": {"core"},
    "plugins": {"core", "plugins"},
    "app": {"core", "plugins", "app"},
    "ops": {"core", "plugins", "ops"},
    "dev": {"core", "plugins", "app", "ops", "dev"},
    "cli": {"core", "plugins", "app", "ops", "dev", "cli"},
}


def test_the_package_is_where_the_rule_looks() -> None:
    assert {"bridge.core.service", "bridge.core.plugin", "bridge.app", "bridge.cli"} <= set(MODULES)
    assert layer("bridge.core.service") == "core" and layer("bridge.app") == "app"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_its_own_layer_and_those_below(module: str) -> None:
    own = layer(module)
    wrong = [
        f"{module}:{line} imports {name} ({layer(name)})"
        for name, _typing, line in imports_of(module)
        if name != "bridge" and layer(name) not in ALLOWED[own]
    ]
    assert not wrong, f"{own} may import only {sorted(ALLOWED[own])}: " + "; ".join(wrong)


def _graph() -> dict[str, set[str]]:
    """Who imports whom when the code runs (imports for type checking only are left out)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        graph[module] = {
            name for name, typing_only, _ in imports_of(module)
            if not typing_only and name in MODULES and name != module
        }  # fmt: skip
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle_among_the_bridge_s_modules() -> None:
    circle = _cycle(_graph())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_circle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
