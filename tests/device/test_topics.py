"""Every topic the device library uses comes from picollm/topics.py, and it names them
as the bridge does (bridge/core/topics.py's Topics, docs/protocol.md's table)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from bridge.core.topics import Topics
from tests.device import vmkit

CASES = [("llm", "kitchen"), ("home/llm", "d-1_x"), ("pré", "Z9")]


def test_device_topics_are_the_bridges(tmp_path: Path) -> None:
    script = tmp_path / "topics.py"
    script.write_text(
        "import json\n"
        "from picollm.topics import Topics\n"
        f"for prefix, dev in {CASES!r}:\n"
        "    t = Topics(prefix, dev)\n"
        "    names = [t.req(), t.cancel(), t.res('r1'), t.res_filter(), t.state(), t.status()]\n"
        "    assert all(isinstance(n, bytes) for n in names)\n"
        "    print(json.dumps([n.decode() for n in names]))\n",
        "utf-8",
    )
    proc = vmkit.run_vm(script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    want = []
    for prefix, dev in CASES:
        b = Topics(prefix)
        want.append(
            [b.req(dev), b.cancel(dev), b.res(dev, "r1"), b.res_filter(dev),
             f"{prefix}/{dev}/state", b.status]
        )  # fmt: skip
    assert got == want


# a string that is a topic or a piece of one: a level name of the protocol, alone or
# next to a "/"
_TOPIC_PIECE = re.compile(
    r"^(req|cancel|res|state)$|/(req|cancel|res|state|status)(/|$)|^(req|cancel|res|state|bridge)/"
)


def _string_literals(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            value = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            out.append(value)
    return out


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(vmkit.DEVICE_DIR.rglob("*.py")) if p.name != "topics.py"],
    ids=lambda p: str(p.relative_to(vmkit.DEVICE_DIR)),
)
def test_no_other_device_file_spells_a_topic(path: Path) -> None:
    found = [s for s in _string_literals(path) if _TOPIC_PIECE.search(s)]
    assert found == [], f"{path.name} builds topics itself: {found}; use picollm.topics"
