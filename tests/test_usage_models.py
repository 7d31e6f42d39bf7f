"""Usage and latency statistics (`usage_stats` in `P/D/state` and `P/bridge/stats`, and
Prometheus), and the models topic `P/bridge/models` with its ACL, on the real stack."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import BridgeProcess, Broker, Device, free_port


class Watcher:
    """A paho client as `user`, keeping the last payload of each topic it may read."""

    def __init__(self, broker: Broker, user: str, topic_filter: str) -> None:
        self.last: dict[str, bytes] = {}
        self._cond = threading.Condition()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"w-{user}-{free_port()}")
        c.username_pw_set(user, broker.users[user])
        c.on_message = self._on_message
        c.on_connect = lambda *a: c.subscribe(topic_filter, qos=1)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.last[msg.topic] = bytes(msg.payload)
            self._cond.notify_all()

    def wait(self, topic: str, ok: Callable[[Any], bool], timeout: float = 10) -> Any:
        """The first JSON payload on `topic` for which `ok` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                raw = self.last.get(topic)
                data = json.loads(raw) if raw else None
                if data is not None and ok(data):
                    return data
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{topic}: last {raw!r}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


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
    watch = Watcher(broker, "integrations", f"{proc.prefix}/#")
    try:
        assert dev.ask({"id": "a", "prompt": "one [mock delay_ms=20]"}).terminal.get("done")
        assert dev.ask({"id": "b", "prompt": "two"}).terminal.get("done")
        assert dev.ask({"id": "c", "prompt": "[mock status=500]"}).error_code == "upstream_status"
        assert dev.ask({"id": "d", "prompt": 3}).error_code == "bad_request"  # a refusal
        state = watch.wait(f"{proc.prefix}/{dev.id}/state", lambda s: s["request_id"] == "c")
        usage = state["usage_stats"]
        assert usage["finished"] == 3 and usage["done"] == 2
        assert usage["success_rate"] == round(2 / 3, 4)
        assert usage["errors_by_code"] == {"upstream_status": 1}
        assert 0 < usage["ttfc_ms"]["p50"] <= usage["ttfc_ms"]["p95"]
        assert usage["ttfc_ms"]["p95"] >= 20  # the delayed first token
        assert usage["duration_ms"]["p50"] <= usage["duration_ms"]["p95"]
        assert usage["window"] == 256

        stats = watch.wait(f"{proc.prefix}/bridge/stats",
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
    as_device = Watcher(broker, "picky", topic)
    try:
        models = as_device.wait(topic, lambda m: True)
        assert models["models"] == ["mock-1"] and models["default"] == "mock-1"

        # A device cannot write it: the retained list stays the bridge's.
        evil = as_device.client.publish(topic, b'{"models":["evil"]}', qos=1, retain=True)
        evil.wait_for_publish(5)
        other = make_device(prefix=proc.prefix)
        assert other.ask({"id": "m", "prompt": "hi"}).terminal.get("done")
        late = Watcher(broker, "integrations", f"{proc.prefix}/#")
        try:
            assert late.wait(topic, lambda m: True)["models"] == ["mock-1"]
            state = late.wait(f"{proc.prefix}/{other.id}/state", lambda s: "models" in s)
            assert state["models"] == ["mock-1"]  # no policy list: what the API offers
            picky = make_device("picky", prefix=proc.prefix)
            assert picky.ask({"id": "p", "prompt": "hi"}).terminal.get("done")
            state = late.wait(f"{proc.prefix}/picky/state", lambda s: "models" in s)
            assert state["models"] == ["mock-1", "mock-9"]  # its policy's list
        finally:
            late.close()
    finally:
        as_device.close()
