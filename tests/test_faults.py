"""Fault suite, part 1: the bridge killed with -9 and Mosquitto restarted, under load.

Run on its own with `pytest -m faults`. The other parts: test_faults_storm.py
(an upstream fault storm) and test_faults_fuzz.py (fuzzed payloads and topics).
Every test uses real processes on loopback, a bounded number of requests, and
generous time limits that only guard against hangs.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.dev.mock_llm import reply_tokens
from tests.harness import BridgeProcess, Broker, Device, Reply, bridge_env, wait_for_status

pytestmark = pytest.mark.faults

StartBridge = Callable[..., BridgeProcess]
MakeDevice = Callable[..., Device]

LONG = "[mock tokens=200 delay_ms=10]"  # about 2 s of streaming


def expected(prompt: str, tokens: int | None = None) -> str:
    return "".join(reply_tokens(prompt, tokens))


def is_terminal(m: dict[str, Any]) -> bool:
    return "done" in m or "error" in m


def check_interrupted(rid: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The weaker check for a reply cut by a crash: chunks may be missing before the
    terminal (they were in flight when the bridge died), but seq only grows, nothing
    is repeated, and exactly one terminal comes, last. Returns the terminal."""
    seqs = [m.get("seq") for m in messages]
    assert all(isinstance(s, int) for s in seqs), f"{rid}: seq {seqs}"
    assert all(a < b for a, b in itertools.pairwise(seqs)), f"{rid}: seq {seqs}"
    terminals = [i for i, m in enumerate(messages) if is_terminal(m)]
    assert terminals == [len(messages) - 1], f"{rid}: terminals at {terminals} of {seqs}"
    for m in messages[:-1]:
        assert set(m) in ({"seq", "delta"}, {"seq", "refusal"}), m
    return messages[-1]


def wait_chunks(devices_rids: list[tuple[Device, str]], at_least: int, timeout: float) -> None:
    """Wait until every request has streamed `at_least` chunks (and none has ended)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [len(d.messages(rid)) for d, rid in devices_rids]
        if min(counts) >= at_least:
            for d, rid in devices_rids:
                assert not any(is_terminal(m) for m in d.messages(rid)), f"{rid} ended early"
            return
        assert time.monotonic() < deadline, f"streams did not start: chunk counts {counts}"
        time.sleep(0.02)


def upstream_count(mock_llm: Any, marker: str) -> int:
    """How many chat requests the mock received whose body contains `marker`."""
    return sum(
        1
        for r in list(mock_llm.requests)
        if r["path"].endswith("/chat/completions") and marker in json.dumps(r["body"])
    )


# --- kill -9 --------------------------------------------------------------------------------


def test_kill_9_during_streams_then_restart(
    start_bridge: StartBridge, make_device: MakeDevice, mock_llm: Any, tmp_path: Path
) -> None:
    """Requests sent while the bridge is dead are served in full when it is back; every
    request it was streaming when killed ends with exactly one `interrupted` terminal,
    sent by the restarted bridge from its crash journal (BRIDGE_DATA_DIR)."""
    proc = start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "data"))
    same = {k: proc.env[k] for k in ("BRIDGE_TOPIC_PREFIX", "BRIDGE_CLIENT_ID")}
    devices = [make_device(prefix=proc.prefix) for _ in range(4)]
    running: list[tuple[Device, str]] = []
    for i in range(20):
        d = devices[i % len(devices)]
        rid = f"k{i}"
        d.send({"id": rid, "prompt": f"kill {d.id} {rid} {LONG}"})
        running.append((d, rid))
    wait_chunks(running, at_least=3, timeout=15)
    proc.kill()
    killed_at = {rid: len(d.messages(rid)) for d, rid in running}

    queued: list[tuple[Device, str, str]] = []
    for i in range(8):
        d = devices[i % len(devices)]
        rid = f"q{i}"
        prompt = f"while dead {d.id} {rid}"
        d.send({"id": rid, "prompt": f"{prompt} [mock tokens=30]"})
        queued.append((d, rid, prompt))

    start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "data"), **same)

    for d, rid, prompt in queued:
        reply = d.wait(rid, timeout=30)
        assert reply.text == expected(prompt, 30), rid
        assert reply.terminal["done"] is True

    missing_before_terminal = 0
    for d, rid in running:
        messages = d.wait_raw(rid, timeout=30)
        terminal = check_interrupted(rid, messages)
        assert terminal.get("error", {}).get("code") == "interrupted", (rid, terminal)
        missing_before_terminal += terminal["seq"] - (len(messages) - 1)
        # chunks delivered before the kill are all there, from 0 without gaps
        head = [m["seq"] for m in messages[: killed_at[rid]]]
        assert head == list(range(len(head))), (rid, head)
        # interrupted requests are ended, not sent upstream again
        assert upstream_count(mock_llm, f"kill {d.id} {rid} ") == 1, rid
    time.sleep(0.5)
    for d, rid in running:  # nothing more after the terminal
        assert sum(is_terminal(m) for m in d.messages(rid)) == 1, rid
    print(f"kill -9: chunks missing before the interrupted terminals: {missing_before_terminal}")


# --- Mosquitto restart ------------------------------------------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Any:
    """A Mosquitto of this test's own, so that restarting it disturbs no other test."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def dedup(rid: str, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Drop exact repeats of an earlier message (QoS 1 redelivery); a different message
    with a seq already seen is an error. Returns the messages and the repeats dropped."""
    seen: dict[int, dict[str, Any]] = {}
    out = []
    for m in messages:
        s = m.get("seq")
        assert isinstance(s, int), (rid, m)
        if s in seen:
            assert seen[s] == m, f"{rid}: two different messages with seq {s}: {seen[s]} {m}"
            continue
        seen[s] = m
        out.append(m)
    return out, len(messages) - len(out)


def test_broker_restart_under_load(own_broker: Broker, mock_llm: Any, tmp_path: Path) -> None:
    """Mosquitto (persistence on) restarts while replies stream: the bridge reconnects to
    its session and goes on; each request in flight ends with exactly one terminal;
    requests published after the restart are all answered."""
    broker = own_broker
    env = bridge_env(
        broker,
        mock_llm.base_url,
        BRIDGE_TOPIC_PREFIX="brr",
        BRIDGE_CLIENT_ID="bridge-broker-restart",
        BRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    proc = BridgeProcess(tmp_path / "bridge", env).start()
    devices: list[Device] = []
    try:
        wait_for_status(broker, "brr", "online")
        devices = [Device(broker, f"bd{i}", "brr", persistent=True) for i in range(4)]
        running: list[tuple[Device, str]] = []
        for i in range(16):
            d = devices[i % len(devices)]
            rid = f"f{i}"
            d.send({"id": rid, "prompt": f"restart {d.id} {rid} {LONG}"})
            running.append((d, rid))
        wait_chunks(running, at_least=3, timeout=15)
        before = {rid: len(d.messages(rid)) for d, rid in running}

        broker.restart()
        wait_for_status(broker, "brr", "online", timeout=30)
        deadline = time.monotonic() + 15
        while any(d.connects < 2 or not d.client.is_connected() for d in devices):
            assert time.monotonic() < deadline, "devices did not reconnect"
            time.sleep(0.05)

        after: list[tuple[Device, str, str]] = []
        for i in range(20):
            d = devices[i % len(devices)]
            rid = f"a{i}"
            prompt = f"after restart {d.id} {rid}"
            d.send({"id": rid, "prompt": f"{prompt} [mock tokens=20]"})
            after.append((d, rid, prompt))
        for d, rid, prompt in after:
            reply = d.wait(rid, timeout=30)
            assert reply.text == expected(prompt, 20), rid

        outcomes: dict[str, int] = {}
        repeats = gaps = 0
        for d, rid in running:
            d.wait_raw(rid, timeout=30)
        time.sleep(0.5)  # anything late (a repeated terminal) shows now
        for d, rid in running:
            raw = d.messages(rid)
            messages, rep = dedup(rid, raw)
            if rep:
                print("REP", rid, [m["seq"] for m in raw][before[rid] - 3 :][:40])
            repeats += rep
            seqs = [m["seq"] for m in messages]
            assert seqs == sorted(seqs), f"{rid}: out of order {seqs}"
            gaps += seqs[-1] + 1 - len(seqs)
            terminals = [i for i, m in enumerate(messages) if is_terminal(m)]
            assert terminals == [len(messages) - 1], f"{rid}: terminals at {terminals}"
            assert len(messages) > before[rid]
            t = messages[-1]
            code = "done" if t.get("done") else t["error"]["code"]
            outcomes[code] = outcomes.get(code, 0) + 1
            if code == "done":
                assert "".join(m.get("delta", "") for m in messages) == expected(
                    f"restart {d.id} {rid}", 200
                ), rid
        print(f"broker restart: outcomes {outcomes}, repeated messages {repeats}, gaps {gaps}")
        assert gaps == 0, "chunks were lost across the broker restart"
        assert outcomes == {"done": len(running)}, outcomes
        assert proc.proc is not None and proc.proc.poll() is None
    finally:
        for d in devices:
            d.close()
        proc.stop()


# --- a cancel right behind its request ------------------------------------------------------


def test_cancel_right_behind_its_request(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    """A cancel that reaches the bridge in the same read as its request (before the
    request's task ever ran) still ends the request with exactly one terminal."""
    proc = start_bridge()
    device = make_device(prefix=proc.prefix)
    c = device.client
    rids = [f"cb{i}" for i in range(60)]
    for rid in rids:  # back to back, without waiting for acknowledgements
        c.publish(f"{proc.prefix}/{device.id}/req", json.dumps({"id": rid, "prompt": "hi"}), 1)
        c.publish(f"{proc.prefix}/{device.id}/cancel", rid, 1)
    codes: dict[str, int] = {}
    for rid in rids:
        reply = device.wait(rid, timeout=10)
        code = "done" if reply.terminal.get("done") else reply.error_code
        codes[str(code)] = codes.get(str(code), 0) + 1
    for rid in rids:
        device.quiet_after(rid, 0)
    print(f"cancel right behind: {codes}")
    assert set(codes) <= {"done", "cancelled"}, codes

    # the same for a request superseded (same id, new payload) before it ever ran
    for i in range(20):
        rid = f"sp{i}"
        for prompt in ("first", "second"):
            c.publish(
                f"{proc.prefix}/{device.id}/req", json.dumps({"id": rid, "prompt": prompt}), 1
            )
    deadline = time.monotonic() + 10
    for i in range(20):
        rid = f"sp{i}"
        while sum(is_terminal(m) for m in device.messages(rid)) < 2:
            assert time.monotonic() < deadline, f"{rid}: {device.messages(rid)}"
            time.sleep(0.02)
    time.sleep(0.3)
    for i in range(20):
        got = device.messages(f"sp{i}")
        cut = next(n for n, m in enumerate(got) if is_terminal(m)) + 1
        first, second = Reply(f"sp{i}", got[:cut]).check(), Reply(f"sp{i}", got[cut:]).check()
        assert first.error_code == "cancelled" or first.text == expected("first"), got
        assert second.text == expected("second"), got
