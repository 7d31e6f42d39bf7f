"""Client ids and what one device can make the broker hold, against a real Mosquitto
rendered from broker/ (use_username_as_clientid, max_queued_*, persistent_client_expiration).

Each test runs a broker of its own: they connect twice as one user on purpose.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.dev.mock_llm import reply_tokens
from bridge.ops.brokerconf import BROKER_DIR
from tests.harness import (
    API_KEY,
    BridgeProcess,
    Broker,
    Device,
    bridge_env,
    rss_kb,
    wait_for_status,
)

# docs/deploy.md "Broker memory": what one user's session may make Mosquitto hold.
PER_USER_BOUND_KB = 4 * 1024


class Client:
    """A bare paho client logged in as `user` with the client id it chooses."""

    def __init__(
        self, broker: Broker, user: str, client_id: str, *, clean: bool = True, sub: str = ""
    ) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.disconnects = 0
        self._lock = threading.Lock()
        ready = threading.Event()
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
            protocol=paho.MQTTv311,
        )
        c.username_pw_set(user, broker.users[user])
        c.on_message = self._on_message
        c.on_connect = lambda *a: ready.set()
        c.on_subscribe = lambda *a: ready.set()
        c.on_disconnect = self._on_disconnect
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert ready.wait(5), f"{user} could not connect"
        if sub:
            ready.clear()
            c.subscribe(sub, qos=1)
            assert ready.wait(5), f"{user} could not subscribe"
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def _on_disconnect(self, *_a: Any) -> None:
        self.disconnects += 1

    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.got)

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def wait_finished(proc: BridgeProcess, device: str, rids: list[str], timeout: float = 20) -> None:
    """Wait until the bridge has ended every request in `rids` of `device`."""
    deadline = time.monotonic() + timeout
    while True:
        logs = proc.logs()
        if all(f"finished device={device} id={rid} " in logs for rid in rids):
            return
        assert time.monotonic() < deadline, f"the bridge did not finish {rids}"
        time.sleep(0.05)


def test_every_listener_makes_the_client_id_the_user_name() -> None:
    """Mosquitto 2.0 reads use_username_as_clientid per listener: one block without it
    would let a device take over the bridge's id there (TLS, websockets)."""
    text = (BROKER_DIR / "mosquitto.conf").read_text()
    blocks = re.split(r"^listener\s+", text, flags=re.M)[1:]
    assert len(blocks) == 3
    for block in blocks:
        assert re.search(r"^use_username_as_clientid true$", block, re.M), block.split()[0]


def test_device_with_the_bridges_client_id_cannot_kick_it_or_wipe_its_session(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    b = own_broker
    env = bridge_env(
        b, mock_llm.base_url, BRIDGE_MQTT_URL=b.url("bridge"), BRIDGE_CLIENT_ID="llm-bridge",
        BRIDGE_TOPIC_PREFIX="llm", BRIDGE_DATA_DIR=str(tmp_path / "data"),
    )  # fmt: skip
    b.add_user("kitchen")
    b.add_user("asker")
    status = Client(b, "integrations", "dash", sub="llm/bridge/status")
    bridge = BridgeProcess(tmp_path / "b1", env).start()
    try:
        wait_for_status(b, "llm", "online")
        # kitchen logs in with the bridge's documented id and its user name, twice.
        for cid in ("llm-bridge", "bridge", "llm-bridge"):
            thief = Client(b, "kitchen", cid, sub="llm/+/req")
            time.sleep(0.3)
            thief.close()
        asker = Device(b, "asker")
        assert asker.ask({"id": "a1", "prompt": "still served"}).terminal.get("done") is True
        asker.close()
        assert b.takeovers() == []
        assert bridge.logs().count("connected to mqtt://") == 1  # no reconnect
        assert "disconnected from broker" not in bridge.logs()
        assert [p for _, p in status.messages()] == [b"online"]  # no offline/online flap

        # The bridge stops cleanly; a request waits for it in its persistent session.
        assert bridge.stop() == 0
        asker = Device(b, "asker", persistent=True)
        asker.send({"id": "q1", "prompt": "queued for the bridge"})
        # kitchen clean-starts the bridge's ids while it is away...
        for cid in ("llm-bridge", "bridge"):
            Client(b, "kitchen", cid, clean=True).close()
        # ...and the request is still there when the bridge is back.
        bridge = BridgeProcess(tmp_path / "b2", env).start()
        reply = asker.wait("q1", timeout=15)
        assert reply.terminal.get("done") is True and "queued for the bridge" in reply.text
        asker.close()
    finally:
        status.close()
        bridge.stop()
        assert API_KEY not in bridge.logs()


def test_device_cannot_take_over_another_devices_id_or_session(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    b = own_broker
    env = bridge_env(b, mock_llm.base_url, BRIDGE_TOPIC_PREFIX="llm",
                     BRIDGE_DATA_DIR=str(tmp_path / "data"))  # fmt: skip
    bridge = BridgeProcess(tmp_path / "b", env).start()
    b.add_user("bob")
    try:
        wait_for_status(b, "llm", "online")
        alice = Device(b, "alice", persistent=True)
        # bob logs in with alice's id (the device library's default id is the device id).
        thief = Client(b, "bob", "alice", sub="llm/alice/res/#")
        assert alice.ask({"id": "r1", "prompt": "alice online"}).terminal.get("done") is True
        assert alice.connects == 1  # never replaced
        assert not [t for t, _ in thief.messages() if "/alice/" in t]
        thief.close()

        # alice asks and goes away before the reply; bob clean-starts her id meanwhile.
        alice.send({"id": "r2", "prompt": "kept for alice"})
        alice.close()
        Client(b, "bob", "alice", clean=True).close()
        wait_finished(bridge, "alice", ["r2"])
        back = Device(b, "alice", persistent=True)
        reply = back.wait("r2")
        assert reply.terminal.get("done") is True and "kept for alice" in reply.text
        back.close()
        assert b.takeovers() == []
    finally:
        bridge.stop()


def test_a_slow_device_gets_every_chunk_of_a_16_kb_reply(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """The queue bound leaves room for a long reply that a device reads later: 16 KB of
    text as token-sized chunks and as 100-byte chunks, queued while it is offline."""
    b = own_broker
    env = bridge_env(b, mock_llm.base_url, BRIDGE_TOPIC_PREFIX="llm",
                     BRIDGE_DATA_DIR=str(tmp_path / "data"))  # fmt: skip
    bridge = BridgeProcess(tmp_path / "b", env).start()
    try:
        wait_for_status(b, "llm", "online")
        prompt = "[mock tokens=2800] long"
        want = "".join(reply_tokens(prompt, 2800))
        assert len(want.encode()) >= 16 * 1024
        dev = Device(b, "slowpico", persistent=True)
        dev.send({"id": "tok", "prompt": prompt, "max_tokens": 4000})
        dev.send({"id": "c100", "prompt": prompt, "max_tokens": 4000, "chunk_bytes": 100})
        dev.close()
        wait_finished(bridge, "slowpico", ["tok", "c100"])
        back = Device(b, "slowpico", persistent=True)
        tok, c100 = back.wait("tok"), back.wait("c100")
        back.close()
        assert tok.text == want and c100.text == want
        assert len(tok.messages) > 2800 and len(c100.messages) > 16 * 1024 // 100
    finally:
        bridge.stop()


def test_one_device_cannot_grow_the_broker_beyond_its_bound(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """The attack from the hardening issue, measured: one device's credentials open 30
    persistent sessions (distinct client ids) subscribed to its replies, then ask for
    12 replies of 1000 tokens and stay away. Mosquitto's RSS may grow by at most
    PER_USER_BOUND_KB (before: ~1 MB per session per 1000 replies' chunks, ~35 MB here)."""
    b = own_broker
    env = bridge_env(b, mock_llm.base_url, BRIDGE_TOPIC_PREFIX="llm",
                     BRIDGE_DATA_DIR=str(tmp_path / "data"))  # fmt: skip
    bridge = BridgeProcess(tmp_path / "b", env).start()
    b.add_user("hog")
    assert b.proc is not None
    try:
        wait_for_status(b, "llm", "online")
        before = rss_kb(b.proc.pid)
        for i in range(30):
            Client(b, "hog", f"hog-{i}", clean=False, sub="llm/hog/res/#").close()
        sender = Client(b, "hog", "hog-send", clean=False, sub="llm/hog/res/#")
        rids = [f"r{i}" for i in range(12)]
        for rid in rids:
            sender.publish("llm/hog/req", {"id": rid, "prompt": "[mock tokens=1000] x"})
        sender.close()
        wait_finished(bridge, "hog", rids, timeout=60)
        time.sleep(0.5)  # the last chunks reach the broker
        grown = rss_kb(b.proc.pid) - before
        assert grown <= PER_USER_BOUND_KB, f"Mosquitto grew by {grown} kB"
        # The bound is the queue limit at work: the session got 12000 chunks, holds 5000.
        drain = Client(b, "hog", "hog-x", clean=False)
        got, still, deadline = -1, 0, time.monotonic() + 30
        while still < 4 and time.monotonic() < deadline:  # until nothing more for 2 s
            now = len(drain.messages())
            still = still + 1 if now == got else 0
            got = now
            time.sleep(0.5)
        drain.close()
        assert 5000 <= got <= 5000 + 20, got  # max_queued_messages, plus those in flight
    finally:
        bridge.stop()


def test_bridge_workers_with_their_own_users_can_share_the_requests(own_broker: Broker) -> None:
    """What several bridge workers will need: each its own user (`broker user add
    bridge-2`, the bridge's rules), together on one shared subscription that splits the
    requests between them, with neither replacing the other."""
    b = own_broker
    b.add_user("bridge-2")
    b.add_user("kitchen")
    workers = []
    for user in ("bridge", "bridge-2"):
        workers.append(Client(b, user, "worker", sub="$share/workers/llm/+/req"))
    kitchen = Client(b, "kitchen", "kitchen")
    try:
        for i in range(10):
            kitchen.publish("llm/kitchen/req", {"id": f"r{i}", "prompt": "hi"})
        deadline = time.monotonic() + 5
        while sum(len(w.messages()) for w in workers) < 10:
            assert time.monotonic() < deadline, [w.messages() for w in workers]
            time.sleep(0.02)
        counts = [len(w.messages()) for w in workers]
        assert sum(counts) == 10 and min(counts) > 0, counts  # each request once, both work
        assert b.takeovers() == [] and all(w.disconnects == 0 for w in workers)
    finally:
        for c in (*workers, kitchen):
            c.close()
