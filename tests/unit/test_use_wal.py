"""Workers of a group switch a shared SQLite file to WAL at once: the second one waits."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from bridge.core.shared import use_wal


def test_the_switch_waits_while_another_process_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    first.execute("CREATE TABLE t (x)")
    first.execute("BEGIN EXCLUSIVE")  # another worker in the middle of its own switch
    threading.Timer(0.3, lambda: first.execute("COMMIT")).start()
    # timeout=0: SQLite's own waiting is not what gets it through
    second = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    use_wal(second)
    assert second.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    first.close()
    second.close()
