"""Writes nobody waits for go to a Redis store from one thread, in order, off the loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from bridge.core.shared import Guarded, Held, open_store

ROUND_TRIP = 0.05


class SlowStore:
    """A store across a slow network: every call takes ROUND_TRIP, and is recorded."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []  # (operation, thread name)
        self.fail = fail

    def __getattr__(self, name: str) -> Any:
        def call(*_args: Any) -> Any:
            time.sleep(ROUND_TRIP)
            self.calls.append((name, threading.current_thread().name))
            if self.fail:
                raise ConnectionError("store away")
            return True

        return call


def test_holds_and_counts_do_not_wait_for_the_store_and_keep_their_order() -> None:
    store = SlowStore()
    g = Guarded(store, "w1", defer=True)  # type: ignore[arg-type]
    start = time.monotonic()
    g.hold("w1", Held("d", "k", "p/d/res/k", None))
    g.add_counts({"requests": 1})
    g.unhold("w1", "d", "k")
    assert time.monotonic() - start < ROUND_TRIP, "the caller waited for a round trip"
    g.flush()
    assert store.calls == [
        ("hold", "store-writer"), ("add_counts", "store-writer"), ("unhold", "store-writer"),
    ]  # fmt: skip


def test_decisions_are_still_asked_on_the_callers_thread() -> None:
    store = SlowStore()
    g = Guarded(store, "w1", defer=True)  # type: ignore[arg-type]
    assert g.claim("d", "k", b"x", time.time(), 600)
    # A request's claim and hold: in the same round trip, not left to the writer.
    assert g.take("w1", Held("d", "k2", "p/d/res/k2", None), b"x", time.time(), 600)
    me = threading.current_thread().name
    assert store.calls == [("claim", me), ("take", me)]


def test_close_makes_the_deferred_writes_first() -> None:
    store = SlowStore()
    g = Guarded(store, "w1", defer=True)  # type: ignore[arg-type]
    for i in range(3):
        g.add_counts({"requests": i})
    g.close()
    assert [name for name, _ in store.calls] == ["add_counts"] * 3 + ["close"]


def test_a_failing_deferred_write_marks_the_store_away_and_raises_nowhere() -> None:
    g = Guarded(SlowStore(fail=True), "w1", defer=True)  # type: ignore[arg-type]
    g.hold("w1", Held("d", "k", "p/d/res/k", None))
    g.flush()
    assert g.degraded and g.failures == 1


def test_without_deferral_each_write_is_a_round_trip_of_the_caller() -> None:
    """SQLite's case: its calls are CPU, which a thread would not take off the loop."""
    store = SlowStore()
    g = Guarded(store, "w1")  # type: ignore[arg-type]
    start = time.monotonic()
    g.add_counts({"requests": 1})
    assert time.monotonic() - start >= ROUND_TRIP
    assert store.calls == [("add_counts", threading.current_thread().name)]


def test_only_a_redis_store_defers_its_writes(tmp_path: Path) -> None:
    redis = open_store("redis://127.0.0.1:1/0", tmp_path, "g", "w1")  # connects lazily
    sqlite = open_store("", tmp_path, "g", "w1")
    try:
        assert redis._defer and not sqlite._defer
    finally:
        redis.store.close()
        sqlite.close()
