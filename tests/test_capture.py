"""Capture of upstream exchanges (`BRIDGE_CAPTURE_DIR`) by a real bridge process: one file
per API call with the body sent, the raw SSE received and timings; the key redacted; the
folder bounded in files and bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.harness import API_KEY, BridgeProcess, Device


def test_capture_records_each_exchange_redacted_and_bounded(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device], tmp_path: Path
) -> None:
    folder = tmp_path / "capture"
    proc = start_bridge(BRIDGE_CAPTURE_DIR=str(folder), BRIDGE_CAPTURE_MAX_FILES=3,
                        BRIDGE_CAPTURE_MAX_BYTES=40_000, BRIDGE_UPSTREAM_RETRIES=1)  # fmt: skip
    dev = make_device(prefix=proc.prefix)
    # The key in a prompt comes back in the echo: the capture must hide it both ways.
    assert dev.ask({"id": "k1", "prompt": f"my key is {API_KEY}"}).terminal.get("done")
    files = sorted(folder.glob("capture-*.json"))
    assert len(files) == 1 and f"{dev.id}-k1" in files[0].name
    raw = files[0].read_text()
    assert API_KEY not in raw and "***" in raw
    record = json.loads(raw)
    assert record["id"] == f"{dev.id}-k1" and record["status"] == 200
    assert record["request"]["messages"] == [{"role": "user", "content": "my key is ***"}]
    assert record["request"]["stream"] is True
    assert record["sse"].startswith("data: {") and record["sse"].rstrip().endswith("[DONE]")
    assert "You said: my key is ***" in "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in record["sse"].splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert "authorization" not in {k.lower() for k in record["headers"]}
    t = record["timings_ms"]
    assert 0 <= t["headers"] <= t["first_byte"] <= t["end"]
    assert record["bytes"] == len(record["sse"].replace("***", API_KEY).encode())
    assert not record["truncated"]

    # A failed call is captured too, each attempt on its own (retried once here).
    failed = dev.ask({"id": "e1", "prompt": "[mock status=503]"})
    assert failed.error_code == "upstream_status"
    errors = [json.loads(f.read_text()) for f in sorted(folder.glob(f"*{dev.id}-e1.json"))]
    assert [e["status"] for e in errors] == [503, 503]
    assert "mock" in errors[0]["sse"] and errors[0]["error"].startswith("UpstreamError")

    # Bounded: at most 3 files, 40000 bytes in all, a long stream cut at a quarter of that.
    assert dev.ask({"id": "long", "prompt": "[mock tokens=4000]"}).terminal.get("done")
    for i in range(3):
        assert dev.ask({"id": f"n{i}", "prompt": "again"}).terminal.get("done")
    files = sorted(folder.glob("capture-*.json"))
    assert len(files) == 3 and f"{dev.id}-n2" in files[-1].name
    assert sum(f.stat().st_size for f in files) <= 40_000
    assert not list(folder.glob("*.tmp"))


def test_capture_cuts_a_long_stream(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device], tmp_path: Path
) -> None:
    folder = tmp_path / "capture"
    proc = start_bridge(BRIDGE_CAPTURE_DIR=str(folder), BRIDGE_CAPTURE_MAX_BYTES=40_000)
    dev = make_device(prefix=proc.prefix)
    assert dev.ask({"id": "long", "prompt": "[mock tokens=4000]"}).terminal.get("done")
    (only,) = folder.glob("capture-*.json")
    record = json.loads(only.read_text())
    assert record["truncated"] is True and record["bytes"] > 40_000
    assert len(record["sse"].encode()) <= 10_000
    assert only.stat().st_size <= 40_000
