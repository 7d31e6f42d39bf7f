"""The broker's access rules (broker/acl, broker/mosquitto.conf) against a real Mosquitto.

Every test here runs the project's own broker files (the `broker` fixture renders
them) and the bridge as a process: a device can neither read nor spend another's,
a wrong password is refused, the integrations user reads but cannot write, and
the API key appears in nothing that crosses the broker.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import API_KEY, BridgeProcess, Broker, Device, bridge_env, wait_for_status


class Listener:
    """A plain paho client that records every message it is allowed to see."""

    def __init__(self, broker: Broker, user: str, filters: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self._lock = threading.Lock()
        done = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        c.username_pw_set(user, broker.users[user])
        c.on_message = self._on_message

        def on_subscribe(_c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
            self.granted.extend(getattr(rc, "value", rc) for rc in codes)
            done.set()

        c.on_subscribe = on_subscribe
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.subscribe([(f, 1) for f in filters])
        assert done.wait(5), f"{user} could not subscribe"
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.got)

    def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_device_cannot_read_another_devices_replies(
    broker: Broker, bridge: BridgeProcess, make_device
) -> None:
    bob: Device = make_device()
    alice = "alice-spy"  # one connection only: a second one as alice would replace it
    broker.add_user(alice)
    spy = Listener(
        broker, alice, [f"llm/{bob.id}/res/+", f"llm/{bob.id}/res/#", "llm/+/res/+", "llm/#"]
    )
    try:
        # Mosquitto grants the SUBSCRIBE (it cannot know what will be published)...
        assert all(code <= 2 for code in spy.granted), spy.granted
        reply = bob.ask({"id": "secret1", "prompt": "only for bob"})
        assert reply.terminal.get("done") is True
        assert "only for bob" in reply.text
        # ...and a request of alice's own, answered after bob's, bounds the wait.
        spy.publish(f"llm/{alice}/req", json.dumps({"id": "mine1", "prompt": "mine"}))
        deadline = time.monotonic() + 10
        while not any(b'"done":true' in p for t, p in spy.messages() if t.endswith("/mine1")):
            assert time.monotonic() < deadline, spy.messages()[-3:]
            time.sleep(0.02)
        time.sleep(0.2)
        seen = spy.messages()
        # ...but delivers nothing of bob's: the only reply alice sees is her own.
        assert not [t for t, _ in seen if f"/{bob.id}/" in t], seen
        own = {f"llm/{alice}/res/mine1", f"llm/{alice}/state", "llm/bridge/status",
               "llm/bridge/models"}  # fmt: skip
        assert {t for t, _ in seen} <= own
        assert any(t == f"llm/{alice}/res/mine1" for t, _ in seen)
    finally:
        spy.close()


def test_device_cannot_publish_another_devices_request_or_cancel(
    bridge: BridgeProcess, make_device
) -> None:
    alice: Device = make_device()
    bob: Device = make_device()
    # bob asks something slow; alice tries to spend bob's budget and to cancel bob.
    bob.send({"id": "slow1", "prompt": "[mock delay_ms=40 tokens=12] slow"})
    alice.send({"id": "spoof1", "prompt": "spend bob's budget"}, topic=f"llm/{bob.id}/req")
    alice.client.publish(f"llm/{bob.id}/cancel", json.dumps({"id": "slow1"}), qos=1)
    # alice's own request, sent last, is answered: the broker and bridge are working.
    assert alice.ask({"id": "own1", "prompt": "mine"}).terminal.get("done") is True
    slow = bob.wait("slow1")
    assert slow.terminal.get("done") is True, slow.terminal  # not cancelled by alice
    time.sleep(0.2)
    assert "spoof1" not in bob.replies
    assert "spoof1" not in alice.replies
    logs = bridge.logs()
    assert f"device={alice.id} id=own1" in logs  # the log does show requests...
    assert "id=spoof1" not in logs  # ...and the bridge never got the spoofed one
    assert f"cancel device={bob.id} id=slow1" not in logs


def test_wrong_password_unknown_user_and_anonymous_are_refused(broker: Broker) -> None:
    dev = "pwcheck"  # a user without a live connection: can_connect would replace it
    broker.add_user(dev)
    assert broker.can_connect(dev)
    assert not broker.can_connect(dev, "not-the-password")
    assert not broker.can_connect(dev, "")
    assert not broker.can_connect("bridge", broker.users[dev])  # another user's password
    assert not broker.can_connect("nobody-" + dev, "pw-nobody")

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    codes: list[int] = []
    c.on_connect = lambda *a: codes.append(a[3].value)
    c.connect("127.0.0.1", broker.port)
    deadline = time.monotonic() + 3
    while not codes and time.monotonic() < deadline:
        c.loop(0.05)
    c.disconnect()
    assert codes and codes[0] != 0, "an anonymous client was accepted"


def test_integrations_user_reads_everything_and_cannot_publish(
    broker: Broker, bridge: BridgeProcess, make_device
) -> None:
    dev: Device = make_device()
    ha = Listener(broker, "integrations", ["llm/#"])
    try:
        ha.publish(f"llm/{dev.id}/req", json.dumps({"id": "ha1", "prompt": "from HA"}))
        ha.publish("llm/integrations/req", json.dumps({"id": "ha2", "prompt": "as a device"}))
        ha.publish(f"llm/{dev.id}/res/fake", json.dumps({"seq": 0, "done": True}))
        ha.publish(f"llm/{dev.id}/cancel", "x")
        ha.publish(f"llm/{dev.id}/ask", "from HA: asking needs the automation user")
        ha.publish("llm/bridge/status", "offline", retain=True)
        # The device's own request goes through, and integrations sees it all.
        assert dev.ask({"id": "real1", "prompt": "hello"}).terminal.get("done") is True
        time.sleep(0.2)
        seen = ha.messages()
        topics = [t for t, _ in seen]
        assert f"llm/{dev.id}/req" in topics  # the device's request, read by integrations
        assert f"llm/{dev.id}/res/real1" in topics  # and its reply
        assert ("llm/bridge/status", b"online") in seen
        assert ("llm/bridge/status", b"offline") not in seen
        for _, payload in seen:
            assert b"from HA" not in payload and b"as a device" not in payload
        assert set(dev.replies) == {"real1"}  # no "fake", no "ha1", no answer to the ask
        logs = bridge.logs()
        assert "id=ha1" not in logs and "id=ha2" not in logs
        assert "device=integrations" not in logs
    finally:
        ha.close()


def test_api_key_crosses_the_broker_in_no_message(
    broker: Broker, bridge: BridgeProcess, make_device
) -> None:
    """Everything published under llm/# while requests succeed and fail holds no API key."""
    dev: Device = make_device()
    ha = Listener(broker, "integrations", ["llm/#"])
    try:
        cases: list[tuple[Any, str | None]] = [
            ({"id": "k1", "prompt": "hello"}, None),
            ({"id": "k2", "prompt": "whole", "stream": False}, None),
            ({"id": "k3", "prompt": "[mock status=401] no"}, "upstream_status"),
            ({"id": "k4", "prompt": "[mock status=500 run=k4] no"}, "upstream_status"),
            ({"id": "k5", "prompt": "[mock error_event_at=1] no"}, "upstream_error"),
            ({"id": "k6", "prompt": "[mock malformed_at=1] no"}, "upstream_protocol"),
            ({"id": "k7", "prompt": "x", "colour": "red"}, "bad_request"),
            ({"id": "k8", "prompt": "x" * 300_000}, "too_large"),
        ]
        for payload, code in cases:
            reply = dev.ask(payload)
            if code is not None:
                assert reply.error_code == code, (payload.get("id"), reply.terminal)
        time.sleep(0.2)
        seen = ha.messages()
        replies = [t for t, _ in seen if "/res/" in t]
        assert len({t for t in replies}) == len(cases), replies
        leaks = [(t, p[:200]) for t, p in seen if API_KEY.encode() in p]
        assert not leaks, leaks
        assert API_KEY not in bridge.logs()
    finally:
        ha.close()


def test_queued_request_survives_a_broker_restart(mock_llm: Any, tmp_path: Path) -> None:
    """broker/mosquitto.conf's persistence: a QoS 1 request waiting for the (stopped) bridge
    outlives a Mosquitto restart and is served when the bridge is back."""
    b = Broker(tmp_path / "broker").start()
    env = bridge_env(b, mock_llm.base_url, BRIDGE_CLIENT_ID="persist-bridge",
                     BRIDGE_DATA_DIR=str(tmp_path / "data"), BRIDGE_TOPIC_PREFIX="llm")  # fmt: skip
    first = BridgeProcess(tmp_path / "b1", env).start()
    try:
        wait_for_status(b, "llm", "online")  # its persistent session now exists
        assert first.stop() == 0
        asker = Device(b, "persist-dev", subscribe=False)
        asker.send({"id": "q1", "prompt": "kept across a restart"})  # PUBACK: stored
        asker.close()
        b.restart()
        reader = Device(b, "persist-dev")
        second = BridgeProcess(tmp_path / "b2", env).start()
        try:
            reply = reader.wait("q1", timeout=15)
            assert reply.terminal.get("done") is True
            assert "kept across a restart" in reply.text
        finally:
            reader.close()
            second.stop()
            assert API_KEY not in second.logs()
    finally:
        first.stop()
        b.stop()
