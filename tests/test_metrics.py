"""Observability: the Prometheus endpoint and JSON logs with the request id."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from tests.harness import BridgeProcess, Device, free_port


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in metrics")


def test_metrics_endpoint_counts_requests_tokens_and_errors(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device]
) -> None:
    port = free_port()
    proc = start_bridge(BRIDGE_METRICS_PORT=port, BRIDGE_LOG_FORMAT="json")
    dev = make_device(prefix=proc.prefix)
    dev.ask({"id": "a", "prompt": "one [mock tokens=5]"})
    dev.ask({"id": "b", "prompt": "two [mock tokens=7]"})
    dev.ask({"id": "c", "prompt": "[mock status=400]"})
    dev.ask({"id": "d", "prompt": "x", "bogus": 1})
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert _value(text, 'llm_bridge_requests_total{outcome="done"}') == 2
    assert _value(text, 'llm_bridge_requests_total{outcome="upstream_status"}') == 1
    assert _value(text, 'llm_bridge_requests_total{outcome="bad_request"}') == 1
    assert _value(text, 'llm_bridge_tokens_total{kind="completion"}') == 12
    assert _value(text, "llm_bridge_time_to_first_token_seconds_count") == 2
    assert _value(text, "llm_bridge_request_duration_seconds_count") == 3
    assert _value(text, "llm_bridge_chunks_total") == 5 + 1 + 7 + 1 + 1 + 1
    assert _value(text, "llm_bridge_active_streams") == 0
    assert _value(text, "llm_bridge_queue_depth") == 0
    assert _value(text, "llm_bridge_mqtt_connected") == 1

    records = [json.loads(line) for line in proc.logs().splitlines() if line.startswith("{")]
    finished = [r for r in records if r["msg"].startswith("finished")]
    assert {r["request_id"] for r in finished} == {"a", "b", "c"}
    assert all(r["device"] == dev.id for r in finished)
    assert {r["outcome"] for r in finished} == {"done", "upstream_status"}
    refused = [r for r in records if r["msg"].startswith("refused")]
    assert refused and refused[0]["request_id"] == "d"
