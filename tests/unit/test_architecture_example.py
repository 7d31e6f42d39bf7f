"""The plugin example of docs/architecture.md, run as written: a plugin added without
touching the core, through the public interface only."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from bridge.core.plugin import Inbound, Plugin
from tests.unit.fakes import bridge, settle

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def example_plugin() -> type[Plugin]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/architecture.md has one Python example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    plugins = [v for v in namespace.values()
               if isinstance(v, type) and issubclass(v, Plugin) and v is not Plugin]  # fmt: skip
    assert len(plugins) == 1
    return plugins[0]


def test_the_documented_plugin_refuses_adds_to_done_and_hears_its_topic() -> None:
    async def main() -> None:
        b, link = bridge(plugins=[example_plugin()()])
        b.router.route(Inbound("llm/kitchen/limit", b"5", retain=False, qos=1))
        assert b.submit("kitchen", b'{"id":"long","prompt":"too long"}') is None
        assert b.submit("kitchen", b'{"id":"ok","prompt":"short"}') is not None
        assert b.submit("hall", b'{"id":"hall","prompt":"no limit here"}') is not None
        await settle(b)
        ends = {s.topic.rsplit("/", 1)[1]: s.message for s in link.terminals()}
        assert ends["long"]["error"] == {"code": "bad_request",
                                         "message": "prompts of at most 5 characters"}  # fmt: skip
        assert ends["ok"]["chars"] == ends["hall"]["chars"] == len("Hi there")

    asyncio.run(main())
