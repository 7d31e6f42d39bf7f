"""Plugins use only the public interface: what `Host` offers, and a job's plugin-facing
fields; the core's own bookkeeping on a job (its task, journal slot, chunker...) stays
the core's. Read from the code of every plugin with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

from bridge.core.job import Job
from bridge.core.plugin import Host

PLUGINS = sorted((Path(__file__).resolve().parents[2] / "bridge" / "plugins").glob("*.py"))

#: Job fields only the core uses: how it runs, journals, chunks and cancels a request.
CORE_ONLY = {"cancel_code", "cancel_message", "chunker", "digest", "estimated_chars", "props",
             "slot", "task", "timer"}  # fmt: skip

HOST_OFFER = {name for name in dir(Host) if not name.startswith("_")} | set(Host.__annotations__)


def uses(path: Path) -> list[tuple[str, str, int]]:
    """(object, attribute, line) for every `job.x`, `host.x` and `self.host.x` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("job", "host"):
            found.append((value.id, node.attr, node.lineno))
        elif (isinstance(value, ast.Attribute) and value.attr == "host"
              and isinstance(value.value, ast.Name) and value.value.id == "self"):  # fmt: skip
            found.append(("host", node.attr, node.lineno))
    return found


def test_there_are_plugins_to_look_at() -> None:
    names = {p.stem for p in PLUGINS}
    assert {"policy", "state", "homeassistant", "metrics"} <= names
    assert {"publish", "subscribe", "submit", "emit", "job", "topics"} <= HOST_OFFER


def test_plugins_use_only_what_the_host_offers_and_a_job_s_public_fields() -> None:
    wrong = []
    for path in PLUGINS:
        for obj, attr, line in uses(path):
            if obj == "host" and attr not in HOST_OFFER:
                wrong.append(f"{path.name}:{line} host.{attr} is not in Host")
            if obj == "job" and (attr in CORE_ONLY or not hasattr(Job, attr)):
                wrong.append(f"{path.name}:{line} job.{attr} is the core's")
    assert not wrong, "; ".join(wrong)
