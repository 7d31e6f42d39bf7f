"""Smoke test of the benchmark: `python -m bench --quick` runs end to end.

Why not assert timings: the machine is shared and absolute figures drift;
what must always hold is that the bench measures all three systems and that
no system lost, repeated or reordered a chunk.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_bench_runs_all_three_systems_without_losing_a_chunk(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    rows = [line.split() for line in table.splitlines()]
    systems = {r[3] for r in rows if len(r) > 3 and r[0].startswith("C=")}
    assert {"ours", "baseline"} <= systems, table
    assert any(line.startswith("broker ceiling") for line in table.splitlines()), table
    assert "integrity: every chunk delivered once, in order" in table, table

    run = json.loads(out.read_text())
    assert run["ceiling"]["msgs_per_s"] > 0
    assert run["results"], run
    for res in run["results"]:
        for system in ("ours", "baseline"):
            r = res[system]
            assert r["requests"] > 0, (res["case"], system)
            assert r["tokens"] == r["expected_tokens"] > 0, (res["case"], system, r)
            assert (r["lost"], r["repeated"], r["out_of_order"]) == (0, 0, 0), (system, r)
            assert r["errors"] == 0 and r["unfinished"] == 0, (res["case"], system, r)
    assert {t["result"] for t in run["targets"]} <= {"PASS", "MISS", "n/a"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_starts_bench_measures_both_pool_layouts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.starts", "--starts", "20", "--rounds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.lstrip().startswith("20 ")]
    assert [r[1:3] for r in rows] == [["one", "pool"], ["pools", "of"]], proc.stdout
    for r in rows:
        burst_cpu_ms, last_written_ms, warm_us = (float(x) for x in r[-3:])
        assert burst_cpu_ms > 0 and last_written_ms > 0 and warm_us > 0, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_store_bench_measures_each_store_both_ways() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.store", "--requests", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("Redis", "SQLite"))]
    assert [r.split()[0] for r in rows] == ["Redis", "Redis", "SQLite"], proc.stdout
    for row in rows:
        on_loop, deferred = (float(x) for x in re.findall(r"(\d+) µs", row))
        assert on_loop > 0 and deferred > 0, proc.stdout
