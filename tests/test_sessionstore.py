"""The SQLite session store: bounded in sessions per device and in bytes overall, expiry,
and what it keeps across a reopen (a bridge restart)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bridge.plugins.sessionstore import SqliteSessionStore


def test_store_bounds_sessions_per_device_and_bytes_overall(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteSessionStore(tmp_path / "s.sqlite3", max_bytes=10_000, per_device=3)
        for i in range(5):
            await store.put("a", f"s{i}", b"x" * 100, None)
        assert store.count("a") == 3
        assert await store.get("a", "s0") is None  # the least recently stored went first
        assert await store.get("a", "s4") == b"x" * 100
        for i in range(30):
            await store.put(f"d{i}", "s", b"y" * 1000, None)
        assert store.total <= 10_000
        assert store.count() == 10
        assert await store.get("d29", "s") is not None and await store.get("d0", "s") is None
        await store.put("e", "s", b"z", time.time() - 1)
        assert await store.get("e", "s") is None
        await store.delete("d29", "s")
        assert await store.get("d29", "s") is None
        total = store.total
        store.close()
        again = SqliteSessionStore(tmp_path / "s.sqlite3", max_bytes=10_000, per_device=3)
        assert again.total == total and await again.get("d28", "s") == b"y" * 1000
        smaller = SqliteSessionStore(tmp_path / "s.sqlite3", max_bytes=5_000, per_device=3)
        assert smaller.total <= 5_000

    asyncio.run(main())
