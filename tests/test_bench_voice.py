"""Smoke test of the voice benchmark: `python -m bench.voice` runs end to end, and
sentence by sentence the first audio comes before the whole reply's speech does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_voice_bench_first_audio_sooner_sentence_by_sentence(tmp_path: Path) -> None:
    out = tmp_path / "voice.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.voice", "--concurrency", "1,4", "--rounds", "1",
         "--tokens", "40", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        # 40 tokens at 25 ms: the whole text alone takes a second before its speech starts
        assert r["ours_p50_ms"] < r["whole_p50_ms"], r
