"""Where conversations kept by the bridge live: a small get/put/delete interface per
(device, session), and its SQLite implementation in `BRIDGE_DATA_DIR`.

The interface is async and holds opaque bytes, so a shared store (Redis, for
several bridge workers) can stand in for SQLite without touching the plugin.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Protocol

from bridge.core.shared import use_wal

SESSIONS_FILE = "sessions.sqlite3"


class SessionStore(Protocol):
    """Stored conversations, keyed by (device, session id); values are opaque bytes."""

    async def get(self, device: str, session: str) -> bytes | None:
        """The session's data, or None when there is none (or it expired)."""
        ...

    async def put(self, device: str, session: str, data: bytes, expires_at: float | None) -> None:
        """Store the session (replacing it); `expires_at` is a Unix time, None for never."""
        ...

    async def delete(self, device: str, session: str) -> None:
        """Forget the session (nothing happens when there is none)."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


class SqliteSessionStore:
    """Sessions in one SQLite file, bounded in total bytes and in sessions per device.

    Past `max_bytes` in all, the least recently stored sessions (of any device)
    are dropped; past `per_device` sessions of one device, its least recently
    stored one. Expired sessions are never returned and are swept on `put`.
    Calls complete without awaiting: one small indexed read or write each, in
    WAL mode without fsync per commit (a crash loses at most the last turns).
    """

    def __init__(self, path: Path, *, max_bytes: int, per_device: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.per_device = per_device
        # timeout: workers of a group open the same file at once (the first sets WAL).
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        use_wal(self.db)
        # Sessions are small rows read once a request: a small page cache keeps the
        # bridge's memory flat however many devices have one.
        self.db.execute("PRAGMA cache_size=-256")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS sessions (
                device TEXT NOT NULL, session TEXT NOT NULL, data BLOB NOT NULL,
                bytes INTEGER NOT NULL, stored REAL NOT NULL, expires REAL,
                PRIMARY KEY (device, session));
            CREATE INDEX IF NOT EXISTS sessions_by_age ON sessions (stored);
            CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires);
            """
        )
        self.db.execute("DELETE FROM sessions WHERE expires IS NOT NULL AND expires <= ?",
                        (time.time(),))  # fmt: skip
        (total,) = self.db.execute("SELECT COALESCE(SUM(bytes), 0) FROM sessions").fetchone()
        self.total = int(total)
        self._trim_total()

    async def get(self, device: str, session: str) -> bytes | None:
        row = self.db.execute(
            "SELECT data, expires FROM sessions WHERE device = ? AND session = ?",
            (device, session),
        ).fetchone()
        if row is None:
            return None
        data, expires = row
        if expires is not None and expires <= time.time():
            await self.delete(device, session)
            return None
        return bytes(data)

    async def put(self, device: str, session: str, data: bytes, expires_at: float | None) -> None:
        now = time.time()
        with self.db:  # one transaction
            self.db.execute("BEGIN")
            old = self.db.execute(
                "SELECT bytes FROM sessions WHERE device = ? AND session = ?", (device, session)
            ).fetchone()
            self.db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                (device, session, data, len(data), now, expires_at),
            )
            self.total += len(data) - (old[0] if old else 0)
            gone = self.db.execute(
                "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions WHERE device = ?"
                " ORDER BY stored DESC LIMIT -1 OFFSET ?) RETURNING bytes",
                (device, self.per_device),
            ).fetchall()
            self.total -= sum(row[0] for row in gone)
        self._sweep(now)
        self._trim_total()

    async def delete(self, device: str, session: str) -> None:
        row = self.db.execute(
            "DELETE FROM sessions WHERE device = ? AND session = ? RETURNING bytes",
            (device, session),
        ).fetchone()
        if row is not None:
            self.total -= row[0]

    def close(self) -> None:
        self.db.close()

    def count(self, device: str | None = None) -> int:
        """How many sessions are stored (of one device, or in all)."""
        if device is None:
            return int(self.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
        sql = "SELECT COUNT(*) FROM sessions WHERE device = ?"
        return int(self.db.execute(sql, (device,)).fetchone()[0])

    def _sweep(self, now: float) -> None:
        rows = self.db.execute(
            "DELETE FROM sessions WHERE expires IS NOT NULL AND expires <= ? RETURNING bytes",
            (now,),
        ).fetchall()
        self.total -= sum(r[0] for r in rows)

    def _trim_total(self) -> None:
        """Drop the least recently stored sessions until all of them fit `max_bytes`."""
        while self.total > self.max_bytes:
            row = self.db.execute(
                "DELETE FROM sessions WHERE rowid = "
                "(SELECT rowid FROM sessions ORDER BY stored LIMIT 1) RETURNING bytes"
            ).fetchone()
            if row is None:
                self.total = 0
                return
            self.total -= row[0]
