"""The bench keeps each latency's distribution as its percentiles 0-100, and draws it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import plot, report


def test_percentiles_0_to_100_keep_the_distribution() -> None:
    q = report.quantiles([5_000_000, 1_000_000, 2_000_000, 3_000_000], 1e-6)
    assert len(q) == 101
    assert q[0] == 1.0 and q[100] == 5.0 and q[50] == 2.0
    assert q == sorted(q)
    assert report.quantiles([]) == []


def _system(ttfc: list[int]) -> dict[str, Any]:
    raw = {"last_end_ns": 2_000_000_000, "first_sent_ns": 0, "ttfc_ns": ttfc,
           "latency_ns": [x // 2 for x in ttfc], "requests": len(ttfc), "finished": len(ttfc),
           "error_count": 0, "errors": {}, "chunks": 10, "tokens": 10, "expected_tokens": 10,
           "lost": 0, "repeated": 0, "out_of_order": 0, "strays": 0, "failure": None}  # fmt: skip
    return report.summarize(raw, {"cpu_s": 0.1, "peak_rss_kb": 1000})


def test_plot_draws_a_cdf_per_latency(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    case = {"streams": 2, "tokens": 5, "delay_ms": 0}
    res = {"case": case, "ours": _system([1_000_000, 3_000_000]),
           "baseline": _system([40_000_000, 90_000_000])}  # fmt: skip
    paths = plot.save({"results": [res]}, tmp_path)
    names = {p.name for p in paths}
    assert {"ttfc_cdf.png", "latency_cdf.png", "chunks_per_s.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)
