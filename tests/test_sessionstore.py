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


class _BrokenStore:
    """A store whose disk failed: every call raises."""

    async def get(self, device: str, session: str) -> bytes | None:
        raise OSError("disk I/O error")

    async def put(self, device: str, session: str, data: bytes, expires_at: float | None) -> None:
        raise OSError("disk I/O error")

    async def delete(self, device: str, session: str) -> None:
        raise OSError("disk I/O error")

    def close(self) -> None:
        pass


def test_a_broken_store_costs_the_history_not_the_request(tmp_path: Path) -> None:
    from bridge.core import protocol as p
    from bridge.core.job import Job
    from bridge.core.settings import Settings
    from bridge.plugins.sessions import SessionsPlugin

    async def main() -> None:
        plugin = SessionsPlugin(Settings(data_dir=tmp_path), store=_BrokenStore())
        request = p.parse_request(b'{"prompt": "hi", "session": "s", "system": "Be brief."}', 1000)
        job = Job("kitchen", "r1", "llm/kitchen/res/r1", request, b"")
        job.body = request.upstream_body("m", True)
        await plugin.prepare(job)
        assert job.body["messages"] == [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        ]  # fmt: skip

    asyncio.run(main())
