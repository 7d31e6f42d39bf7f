"""Usage and latency statistics (`usage_stats` in `P/D/state` and `P/bridge/stats`, and
Prometheus), and the models topic `P/bridge/models` with its ACL, on the real stack."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from tests.harness import BridgeProcess, Broker, Device, Watcher, free_port


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in metrics")


def test_usage_stats_in_state_bridge_stats_and_metrics(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device], broker: Broker
) -> None:
    port = free_port()
    proc = start_bridge(BRIDGE_METRICS_PORT=port, BRIDGE_UPSTREAM_RETRIES=0)
    dev = make_device(prefix=proc.prefix)
    watch = Watcher(broker, [f"{proc.prefix}/#"], user="integrations")
    try:
        assert dev.ask({"id": "a", "prompt": "one [mock delay_ms=20]"}).terminal.get("done")
        assert dev.ask({"id": "b", "prompt": "two"}).terminal.get("done")
        assert dev.ask({"id": "c", "prompt": "[mock status=500]"}).error_code == "upstream_status"
        assert dev.ask({"id": "d", "prompt": 3}).error_code == "bad_request"  # a refusal
        state = _json(watch, f"{proc.prefix}/{dev.id}/state",
                      lambda s: s["request_id"] == "c" and s["status"] == "error")  # fmt: skip
        usage = state["usage_stats"]
        assert usage["finished"] == 3 and usage["done"] == 2
        assert usage["success_rate"] == round(2 / 3, 4)
        assert usage["errors_by_code"] == {"upstream_status": 1}
        assert 0 < usage["ttfc_ms"]["p50"] <= usage["ttfc_ms"]["p95"]
        assert usage["ttfc_ms"]["p95"] >= 20  # the delayed first token
        assert usage["duration_ms"]["p50"] <= usage["duration_ms"]["p95"]
        assert usage["window"] == 256

        stats = _json(watch, f"{proc.prefix}/bridge/stats",
                           lambda s: s["usage_stats"]["finished"] == 4)  # fmt: skip
        overall = stats["usage_stats"]
        assert overall["errors_by_code"] == {"upstream_status": 1, "bad_request": 1}
        assert overall["success_rate"] == 0.5

        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert _metric(text, "llm_bridge_success_ratio") == 0.5
        # The refusal counts for the device too (its state shows it with its next request).
        assert _metric(text, f'llm_bridge_device_success_ratio{{device="{dev.id}"}}') == 0.5
        assert _metric(text, f'llm_bridge_device_requests_total{{device="{dev.id}"}}') == 4
        key = f'llm_bridge_device_errors_total{{code="bad_request",device="{dev.id}"}}'
        assert _metric(text, key) == 1
        assert _metric(text, 'llm_bridge_ttfc_seconds{quantile="0.95"}') >= 0.02
        assert (
            _metric(text, f'llm_bridge_device_duration_seconds{{device="{dev.id}",quantile="0.5"}}')
            > 0
        )
    finally:
        watch.close()


def test_models_topic_lists_the_api_models_and_devices_may_read_it(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device], broker: Broker
) -> None:
    policy = {"devices": {"picky": {"models": ["mock-1", "mock-9"]}}}
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy))
    topic = f"{proc.prefix}/bridge/models"
    broker.add_user("picky")
    as_device = Watcher(broker, [topic], user="picky")
    try:
        models = _json(as_device, topic, lambda m: True)
        assert models["models"] == ["mock-1"] and models["default"] == "mock-1"

        # A device cannot write it: the retained list stays the bridge's.
        evil = as_device.client.publish(topic, b'{"models":["evil"]}', qos=1, retain=True)
        evil.wait_for_publish(5)
    finally:
        as_device.close()  # before the device logs in as itself (one connection per user)
    other = make_device(prefix=proc.prefix)
    assert other.ask({"id": "m", "prompt": "hi"}).terminal.get("done")
    broker.add_user("integrations-late")  # a second reader needs a user of its own
    late = Watcher(broker, [f"{proc.prefix}/#"], user="integrations-late")
    try:
        assert _json(late, topic, lambda m: True)["models"] == ["mock-1"]
        state = _json(late, f"{proc.prefix}/{other.id}/state", lambda s: "models" in s)
        assert state["models"] == ["mock-1"]  # no policy list: what the API offers
        picky = make_device("picky", prefix=proc.prefix)
        assert picky.ask({"id": "p", "prompt": "hi"}).terminal.get("done")
        state = _json(late, f"{proc.prefix}/picky/state", lambda s: "models" in s)
        assert state["models"] == ["mock-1", "mock-9"]  # its policy's list
    finally:
        late.close()


def _json(w: Watcher, topic: str, ok: Callable[[Any], bool]) -> Any:
    """The first JSON payload on `topic` for which `ok` holds."""
    return w.wait_for(lambda m: m.topic == topic and bool(m.payload) and ok(m.json)).json
