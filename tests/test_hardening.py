"""What a security and reliability review broke, each pinned on the real broker and bridge.

Every test here failed before its fix: a lost terminal across a broker outage
and a crash, a QoS 0 reply that leaked its stream slot, refusals dropped as
duplicates, retained requests served at every start, unjournaled v5
requests, a stream that broke after its finish_reason, the per-device size
limit applied after parsing, free tokens for cancelled streams, and state
errors without their message.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.dev.mock_llm import reply_tokens
from tests.harness import (
    BridgeProcess,
    Broker,
    Device,
    V5Device,
    Watcher,
    bridge_env,
    wait_for_status,
)

StartBridge = Callable[..., BridgeProcess]
MakeDevice = Callable[..., Device]


def is_terminal(m: dict[str, Any]) -> bool:
    return "done" in m or "error" in m


def upstream_count(mock_llm: Any, marker: str) -> int:
    """How many chat requests the mock received whose body contains `marker`."""
    return sum(
        1
        for r in list(mock_llm.requests)
        if r["path"].endswith("/chat/completions") and marker in json.dumps(r["body"])
    )


def terminals(device: Device, rid: str) -> list[dict[str, Any]]:
    return [m for m in device.messages(rid) if is_terminal(m)]


def wait_terminals(device: Device, rid: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait for a terminal, then a little longer to see that no second one comes."""
    deadline = time.monotonic() + timeout
    while not terminals(device, rid):
        assert time.monotonic() < deadline, f"{rid}: no terminal; got {device.messages(rid)}"
        time.sleep(0.05)
    time.sleep(0.5)
    return terminals(device, rid)


@pytest.fixture
def own_broker(tmp_path: Path) -> Any:
    """A Mosquitto of this test's own, so that stopping it disturbs no other test."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def start_on(broker: Broker, mock_llm: Any, workdir: Path, **env: Any) -> BridgeProcess:
    """A bridge on `broker` (prefix llm) that may start while the broker is down."""
    return BridgeProcess(workdir, bridge_env(broker, mock_llm.base_url, **env)).start()


# --- exactly one terminal -------------------------------------------------------------------


def test_terminal_survives_a_broker_outage_and_two_crashes(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """A request that fails while the broker is down keeps its journal slot until the
    broker acknowledges its terminal: kill -9, a restart with the broker still down, a
    second kill -9, and the device still gets exactly one terminal (`interrupted`)."""
    env = {"BRIDGE_DATA_DIR": str(tmp_path / "data"), "BRIDGE_CLIENT_ID": "bridge-out",
           "BRIDGE_UPSTREAM_RETRIES": 0}  # fmt: skip
    first = start_on(own_broker, mock_llm, tmp_path / "b1", **env)
    wait_for_status(own_broker, "llm", "online")
    dev = Device(own_broker, f"out{os.getpid()}", persistent=True)
    try:
        dev.send({"id": "o1", "prompt": "fail late [mock first_byte_delay_ms=1500 status=500]"})
        time.sleep(0.5)
        own_broker.stop()  # the request fails while the broker is down
        time.sleep(2.0)
        first.kill()
        second = start_on(own_broker, mock_llm, tmp_path / "b2", **env)
        time.sleep(1.0)  # it reads the journal, cannot reach the broker...
        second.kill()  # ...and dies too
        own_broker.start()
        third = start_on(own_broker, mock_llm, tmp_path / "b3", **env)
        got = wait_terminals(dev, "o1", timeout=30)
        assert len(got) == 1, dev.messages("o1")
        assert got[0]["error"]["code"] == "interrupted"
        # Acknowledged now: a fourth start sends nothing more.
        third.stop()
        fourth = start_on(own_broker, mock_llm, tmp_path / "b4", **env)
        wait_for_status(own_broker, "llm", "online")
        time.sleep(1.0)
        assert len(terminals(dev, "o1")) == 1
        fourth.stop()
    finally:
        dev.close()


def test_qos0_reply_cut_by_a_broker_restart_still_ends_and_frees_its_stream(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """With BRIDGE_RESPONSE_QOS=0 a broker restart mid-reply loses chunks (QoS 0), but the
    request still gets its terminal, its seq shows the gap, and the device's stream slot
    is freed: its next request is served, not refused `too_many_streams`."""
    dev_id = f"q0{os.getpid()}"
    policy = {"devices": {dev_id: {"max_streams": 1}}}
    proc = start_on(own_broker, mock_llm, tmp_path / "b", BRIDGE_RESPONSE_QOS=0,
                    BRIDGE_CLIENT_ID="bridge-q0", BRIDGE_POLICY=json.dumps(policy),
                    BRIDGE_DATA_DIR=str(tmp_path / "data"))  # fmt: skip
    wait_for_status(own_broker, "llm", "online")
    dev = Device(own_broker, dev_id, persistent=True)
    try:
        dev.send({"id": "z1", "prompt": "long [mock tokens=150 delay_ms=20]", "chunk_ms": 50})
        deadline = time.monotonic() + 10
        while len(dev.messages("z1")) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        own_broker.restart()
        got = wait_terminals(dev, "z1", timeout=30)
        assert len(got) == 1
        seqs = [m["seq"] for m in dev.messages("z1")]
        assert seqs == sorted(set(seqs)), seqs  # only grows
        assert got[0]["seq"] == max(seqs)
        dev.send({"id": "z2", "prompt": "after the outage"})
        reply = dev.wait("z2", timeout=20)
        assert reply.terminal.get("done") is True, reply.messages
        assert "internal" not in proc.logs()
    finally:
        dev.close()
        proc.stop()


def test_a_refused_request_asked_again_is_answered_again(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    """Refusals do not enter the duplicate table: the same request sent again after
    `too_many_streams` is served."""
    dev_id = f"ra{os.urandom(3).hex()}"
    policy = {"devices": {dev_id: {"max_streams": 1}}}
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy))
    dev = make_device(dev_id, prefix=proc.prefix)
    dev.send({"id": "long", "prompt": "hold [mock tokens=40 delay_ms=20]"})
    time.sleep(0.3)
    again = {"id": "r2", "prompt": "me too"}
    dev.send(again)
    refused = dev.wait("r2")
    assert refused.error_code == "too_many_streams"
    dev.wait("long", timeout=20)
    dev.replies["r2"].clear()
    dev.send(again)
    served = dev.wait("r2")
    assert served.terminal.get("done") is True, served.messages


def test_retained_request_is_served_once(
    start_bridge: StartBridge, make_device: MakeDevice, mock_llm: Any, tmp_path: Path
) -> None:
    """A request published retained is served when it arrives, and never again from the
    broker's retained copy, however often the bridge restarts or reconnects."""
    env = {"BRIDGE_DATA_DIR": str(tmp_path / "data")}
    proc = start_bridge(**env)
    same = {k: proc.env[k] for k in ("BRIDGE_TOPIC_PREFIX", "BRIDGE_CLIENT_ID")}
    dev = make_device(prefix=proc.prefix)
    marker = f"retained {dev.id}"
    dev.client.publish(f"{proc.prefix}/{dev.id}/req",
                       json.dumps({"id": "rt", "prompt": marker}), qos=1, retain=True)  # fmt: skip
    assert dev.wait("rt").terminal.get("done") is True
    for _ in range(2):
        proc.stop()
        proc = start_bridge(**env, **same)
        time.sleep(0.5)
    assert len(terminals(dev, "rt")) == 1
    assert upstream_count(mock_llm, marker) == 1
    assert "retained copy of a request" in proc.logs()
    dev.client.publish(f"{proc.prefix}/{dev.id}/req", b"", qos=1, retain=True)


def test_v5_properties_are_bounded_and_journaled(
    start_bridge: StartBridge, broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """Correlation data over 256 bytes or a response topic over 256 bytes is refused with
    `bad_request`; anything smaller is journaled, so a crash still ends it `interrupted`
    with its correlation data."""
    env = {"BRIDGE_DATA_DIR": str(tmp_path / "data")}
    proc = start_bridge(**env)
    same = {k: proc.env[k] for k in ("BRIDGE_TOPIC_PREFIX", "BRIDGE_CLIENT_ID")}
    dev = V5Device(broker, f"v5j{os.getpid()}", prefix=proc.prefix)
    try:
        inbox = f"{proc.prefix}/{dev.id}/res/box"
        dev.request({"id": "big", "prompt": "x"}, inbox, b"C" * 257)
        dev.request({"id": "far", "prompt": "x"}, inbox + "/" + "t" * 260, b"F")
        got = dev.wait(lambda g: sum(1 for _, m, _c in g if "error" in m) >= 2)
        codes = {c: m["error"] for _, m, c in got if "error" in m}
        assert codes[b"C" * 257]["code"] == "bad_request"
        assert "correlation data" in codes[b"C" * 257]["message"]
        assert codes[b"F"]["code"] == "bad_request"
        corr = b"K" * 256
        dev.request({"id": "jr", "prompt": "long [mock tokens=300 delay_ms=20]"}, inbox, corr)
        dev.wait(lambda g: sum(1 for _, _m, c in g if c == corr) >= 3)
        proc.kill()
        start_bridge(**env, **same)
        got = dev.wait(lambda g: any(c == corr and "error" in m for _, m, c in g), timeout=20)
        ends = [m for t, m, c in got if c == corr and "error" in m]
        assert [m["error"]["code"] for m in ends] == ["interrupted"]
        assert all(t == inbox for t, _m, c in got if c == corr)
    finally:
        dev.close()


def test_stream_broken_after_its_finish_reason_is_complete(
    bridge: BridgeProcess, device: Device, mock_llm: Any
) -> None:
    """A reply whose finish_reason arrived is whole: a connection that breaks after it
    ends the request `done`, and the API is not asked again."""
    marker = f"finish then break {device.id}"
    reply = device.ask({"id": "fb", "prompt": f"{marker} [mock tokens=12 cut_after_finish=1]"})
    assert reply.terminal.get("done") is True, reply.messages
    assert reply.terminal["finish_reason"] == "stop"
    assert reply.text == "".join(reply_tokens(marker, 12))
    assert upstream_count(mock_llm, marker) == 1


# --- policy as written ----------------------------------------------------------------------


def test_device_size_limit_comes_before_parsing(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    """`max_request_bytes` is checked first: an oversized payload is `too_large` even when it
    is not JSON at all (it is never parsed), and its id is still found for the reply."""
    dev_id = f"sz{os.urandom(3).hex()}"
    policy = {"devices": {dev_id: {"max_request_bytes": 300}}}
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy))
    dev = make_device(dev_id, prefix=proc.prefix)
    dev.send('{"id": "sz", "prompt": "' + "x" * 1000 + '", broken')
    assert dev.wait("sz").error_code == "too_large"


def test_cancelled_streams_are_charged_to_the_daily_budget(
    start_bridge: StartBridge, make_device: MakeDevice, tmp_path: Path
) -> None:
    """Tokens streamed before a cancel count (estimated, since no `usage` comes): a
    250-token stream cancelled after 60 chunks uses up a 100-token budget, and the next
    request is refused `budget_exceeded` (before the fix the counter stayed at 0)."""
    dev_id = f"bu{os.urandom(3).hex()}"
    policy = {"devices": {dev_id: {"tokens_per_day": 100}}}
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy), BRIDGE_DATA_DIR=str(tmp_path / "d"))
    dev = make_device(dev_id, prefix=proc.prefix)
    for rid in ("c1",):
        dev.send({"id": rid, "prompt": "a long one [mock tokens=250 delay_ms=5]"})
        deadline = time.monotonic() + 10
        while len(dev.messages(rid)) < 60:
            assert time.monotonic() < deadline, dev.messages(rid)
            time.sleep(0.01)
        dev.cancel(rid)
        assert dev.wait(rid).error_code == "cancelled"
    refused = dev.ask({"id": "c3", "prompt": "one more"})
    assert refused.error_code == "budget_exceeded", refused.messages


def test_state_and_event_carry_the_error_message(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """`P/D/state`'s `error.message` and `P/D/event`'s `message` say what the terminal said."""
    proc = start_on(own_broker, mock_llm, tmp_path / "b", BRIDGE_UPSTREAM_RETRIES=0)
    wait_for_status(own_broker, "llm", "online")
    dev = Device(own_broker, f"em{os.getpid()}")
    w = Watcher(own_broker, [f"llm/{dev.id}/state", f"llm/{dev.id}/event"])
    try:
        reply = dev.ask({"id": "e1", "prompt": "fail [mock status=400]"})
        message = reply.terminal["error"]["message"]
        assert message
        state = w.wait_for(
            lambda m: m.topic.endswith("/state") and m.json["status"] == "error"
        ).json
        assert state["error"] == {"code": "upstream_status", "message": message}
        event = w.wait_for(lambda m: m.topic.endswith("/event")).json
        assert event["message"] == message
    finally:
        w.close()
        dev.close()
        proc.stop()


# --- bounded memory ---------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_new_device_ids_cost_bounded_memory(
    own_broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    """After warm-up, 5,000 requests from 5,000 new device ids grow the bridge's RSS by
    less than 8 MB (state, discovery and duplicate table are bounded per device and
    overall), and refusals cost nothing that stays."""
    # A fixed number of streams: the upstream connection pool (up to BRIDGE_MAX_STREAMS
    # connections, ~16 KB each) is then the same after warm-up as after the run, and
    # what grows is what the devices cost.
    proc = start_on(own_broker, mock_llm, tmp_path / "b", BRIDGE_MAX_QUEUE=20_000,
                    BRIDGE_MAX_STREAMS=32, BRIDGE_LOG_LEVEL="WARNING")  # fmt: skip
    wait_for_status(own_broker, "llm", "online")
    assert proc.proc is not None
    # `automation` may ask for any device (P/D/ask): new device ids without 5,000 users.
    w = Watcher(own_broker, ["llm/+/event"])
    try:

        def ask(start: int, count: int) -> None:
            # In batches the bridge can hold at once (its crash journal has 4096 slots;
            # beyond, requests are refused `overloaded`, which sends no event).
            deadline = time.monotonic() + 300
            for first in range(start, start + count, 500):
                last = min(first + 500, start + count)
                for i in range(first, last):
                    w.client.publish(f"llm/m{i}/ask", f"hi {i} [mock tokens=2]", qos=0)
                while len([m for m in w.msgs if m.topic.endswith("/event")]) < last:
                    assert time.monotonic() < deadline, f"answered {len(w.msgs)} of {last}"
                    time.sleep(0.05)

        ask(0, 1200)  # warm-up: allocator arenas, caches, the first evictions
        before = rss_kb(proc.proc.pid)
        ask(1200, 5000)
        grown = rss_kb(proc.proc.pid) - before
        print(f"RSS growth over 5,000 new device ids: {grown} KB")
        assert grown < 8 * 1024, f"RSS grew {grown} KB"
    finally:
        w.close()
        proc.stop()
