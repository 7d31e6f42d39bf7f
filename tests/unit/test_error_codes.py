"""One error type with a closed list of codes: every code a `ProtocolError` is raised
with under bridge/ is in docs/protocol.md's table of codes (read from the code with `ast`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ERROR_TYPES = {"ProtocolError", "UpstreamError"}


def documented() -> set[str]:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))


def raised() -> dict[str, list[str]]:
    """code -> where: the first argument of every ProtocolError(...) whose value is known
    (a string, or a module constant such as `p.BAD_REQUEST` or `RATE_LIMITED`)."""
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in (ROOT / "bridge").rglob("*.py")}
    constants: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in tree.body:
            value = node.value if isinstance(node, ast.Assign) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                for target in node.targets:  # type: ignore[union-attr]
                    if isinstance(target, ast.Name):
                        constants.setdefault(target.id, set()).add(value.value)
    found: dict[str, list[str]] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name not in ERROR_TYPES:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                codes = {first.value}
            elif isinstance(first, ast.Name | ast.Attribute):
                key = first.id if isinstance(first, ast.Name) else first.attr
                codes = constants.get(key, set()) if key.isupper() else set()
            else:
                codes = set()
            for code in codes:
                found.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_reader_finds_the_core_s_and_a_plugin_s_codes() -> None:
    codes = raised()
    assert {"bad_request", "too_large", "overloaded", "upstream_status", "rate_limited"} <= set(
        codes
    )


def test_every_code_raised_is_in_protocol_md_s_closed_list() -> None:
    missing = {code: where for code, where in raised().items() if code not in documented()}
    assert not missing, f"codes missing from docs/protocol.md's table: {missing}"
