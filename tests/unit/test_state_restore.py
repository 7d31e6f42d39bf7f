"""The state plugin reads the retained states and counters once, then leaves their topics.

Why: every later message on `P/+/state` is a copy of a state this bridge (or a
peer worker) just published, one per change of status of every device; the
plugin ignores them, but each costs the bridge a read, a decode and a route,
and at a burst of new requests that CPU comes before their first chunks.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.plugins import state
from bridge.plugins.state import StatePlugin
from tests.unit.fakes import bridge, settings


def test_leaves_the_state_and_stats_topics_after_the_restore_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state, "RESTORE_WINDOW", 0.05)

    async def run() -> tuple[list[str], list[str], bool]:
        plugin = StatePlugin(settings())
        _bridge, link = bridge(plugins=[plugin])
        plugin.connected()
        during = list(link.unsubscribed)  # still reading the retained messages
        for _ in range(100):
            if link.unsubscribed:
                break
            await asyncio.sleep(0.01)
        return during, link.unsubscribed, plugin.stats.restored

    during, after, restored = asyncio.run(run())
    assert during == []
    assert restored
    assert sorted(after) == ["llm/+/state", "llm/bridge/stats"]
