"""The bench's target table judges what the run measured, and never fails on what it lacks."""

from __future__ import annotations

from typing import Any

from bench import report


def _result(streams: int, tokens: int, rss_kb: int) -> dict[str, Any]:
    ours = {"chunks_per_s": 100.0, "ttfc_p99_ms": 5.0, "latency_p99_ms": 1.0,
            "peak_rss_kb": rss_kb}  # fmt: skip
    return {"case": {"streams": streams, "tokens": tokens, "delay_ms": 0}, "ours": ours}


def _target(rows: list[dict[str, Any]], start: str) -> dict[str, Any]:
    return next(r for r in rows if r["target"].startswith(start))


def test_memory_growth_needs_two_stream_counts() -> None:
    # Only C=1 cases (short and long replies): no growth per stream to compute.
    rows = report.targets([_result(1, 1, 70_000), _result(1, 200, 72_000)], None)
    assert _target(rows, "peak RSS growth")["result"] == "n/a"


def test_memory_growth_per_extra_stream() -> None:
    rows = report.targets([_result(1, 200, 70_000), _result(101, 200, 73_000)], None)
    growth = _target(rows, "peak RSS growth")
    assert growth["value"] == 30.0 and growth["result"] == "PASS"
