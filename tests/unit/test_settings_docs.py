"""The defaults that README.md and docs/configuration.md give are the settings' own.

A table row `| `BRIDGE_X` | `value` | ...` names one setting and its default; a
default changed in code and not in the docs (as `BRIDGE_MAX_STREAMS` once was) fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticUndefined

from bridge.core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `(BRIDGE_[A-Z0-9_]+)` \| `([^`]*)` \|", re.MULTILINE)


def _as_written(value: Any) -> str:
    """A default as the docs write it: `true`, `60` (not `60.0`), a path or a word."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_documented_defaults_are_the_settings_defaults(doc: str) -> None:
    rows = ROW.findall((REPO / doc).read_text(encoding="utf-8"))
    assert len(rows) >= 10, f"{doc}: the settings table was not found"
    wrong = []
    for name, documented in rows:
        field = Settings.model_fields.get(name.removeprefix("BRIDGE_").lower())
        assert field is not None, f"{doc} documents {name}, which is no setting"
        if field.default is PydanticUndefined or field.default is None:
            continue  # documented in words (`(system CAs)`, ...), not as a value
        if _as_written(field.default) != documented:
            wrong.append(f"{name}: {documented!r} in the doc, {field.default!r} in code")
    assert not wrong, "\n".join(wrong)
