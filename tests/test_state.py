"""Retained device state (`P/D/state`), reply events (`P/D/event`) and the bridge's counters
(`P/bridge/stats`), against a real Mosquitto and the bridge as a process.

These tests run on a Mosquitto of their own (the project's broker/ files), so that
no other bridge answers or publishes state there; `Watcher` is what Home Assistant
or Node-RED would be: the `automation` user (it may also ask).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import StartBridge
from tests.harness import Broker, Device, Watcher, retained, wait_for_status

_ids = itertools.count()


def states(w: Watcher, device: str) -> list[dict[str, Any]]:
    return [m.json for m in w.on(f"llm/{device}/state") if m.payload]


# --- per-device state -----------------------------------------------------------------------


def test_state_follows_status_changes_not_chunks(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    own_bridge()
    dev = own_device()
    w = Watcher(own_broker, [f"llm/{dev.id}/state", f"llm/{dev.id}/event"])
    try:
        reply = dev.ask({"id": "s1", "prompt": "Why? [mock tokens=20 delay_ms=15]"})
        assert len(reply.messages) == 21  # 20 chunks and the terminal
        w.wait_for(lambda m: m.topic.endswith("/state") and m.json["status"] == "idle")
        seen = states(w, dev.id)
        # One state per change of status, none per chunk.
        assert [s["status"] for s in seen] == ["thinking", "streaming", "idle"]
        last = seen[-1]
        assert last["request_id"] == "s1"
        assert last["question"] == "Why? [mock tokens=20 delay_ms=15]"
        assert last["reply"] == reply.text and len(reply.text) > 0
        assert last["finish_reason"] == reply.terminal["finish_reason"] == "stop"
        assert last["usage"] == reply.terminal["usage"] and last["usage"]["total_tokens"] > 0
        assert last["model"] == "mock-1"
        assert last["error"] is None and last["active"] == 0
        assert last["time"].endswith("+00:00") and last["replied_at"]
        assert all(m.retain is False for m in w.on(f"llm/{dev.id}/state"))  # live copies
        # The event: one, after the reply, with the text and usage.
        ev = w.wait_for(lambda m: m.topic.endswith("/event")).json
        assert ev["event_type"] == "reply_complete"
        assert ev["request_id"] == "s1" and ev["text"] == reply.text
        assert ev["usage"] == reply.terminal["usage"]
        # A late subscriber gets the last state, retained.
        late = retained(own_broker, f"llm/{dev.id}/state")
        assert late is not None and json.loads(late) == last
        # An event is not retained: a late subscriber gets none.
        assert retained(own_broker, f"llm/{dev.id}/event", timeout=0.3) is None
    finally:
        w.close()


def test_error_state_keeps_the_last_reply(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    own_bridge(BRIDGE_UPSTREAM_RETRIES=0)
    dev = own_device()
    w = Watcher(own_broker, [f"llm/{dev.id}/state", f"llm/{dev.id}/event"])
    try:
        good = dev.ask({"id": "e1", "prompt": "hello"})
        bad = dev.ask({"id": "e2", "prompt": "[mock status=503] again"})
        assert bad.error_code == "upstream_status"
        w.wait_for(lambda m: m.topic.endswith("/state") and m.json["status"] == "error")
        seen = states(w, dev.id)
        assert [s["status"] for s in seen] == ["thinking", "streaming", "idle", "thinking", "error"]
        last = seen[-1]
        assert last["error"]["code"] == "upstream_status"
        assert last["request_id"] == "e2"
        assert last["reply"] == good.text  # the last reply stays, with its request's details
        assert last["finish_reason"] == "stop"
        ev = w.wait_for(lambda m: m.topic.endswith("/event") and m.json["event_type"] == "error")
        assert ev.json["request_id"] == "e2" and ev.json["code"] == "upstream_status"
        # The next good reply clears the error.
        dev.ask({"id": "e3", "prompt": "fine"})
        w.wait_for(lambda m: m.topic.endswith("/state") and m.json["request_id"] == "e3"
                   and m.json["status"] == "idle")  # fmt: skip
        assert states(w, dev.id)[-1]["error"] is None
    finally:
        w.close()


def test_cancel_ends_in_error_cancelled_and_bad_requests_leave_no_state(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    own_bridge()
    dev = own_device()
    w = Watcher(own_broker, [f"llm/{dev.id}/state"])
    try:
        bad = dev.ask({"id": "b1", "prompt": "x", "colour": "red"})
        assert bad.error_code == "bad_request"
        dev.send({"id": "c1", "prompt": "[mock tokens=500 delay_ms=20] long"})
        w.wait_for(lambda m: m.json["status"] == "streaming")
        dev.cancel("c1")
        assert dev.wait("c1").error_code == "cancelled"
        w.wait_for(lambda m: m.json["status"] == "error")
        seen = states(w, dev.id)
        assert [s["status"] for s in seen] == ["thinking", "streaming", "error"]
        assert seen[-1]["error"]["code"] == "cancelled"
        assert all(s["request_id"] != "b1" for s in seen)
    finally:
        w.close()


def test_two_requests_at_once_one_status(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    """The status is the device's: busy while any request runs, idle when all ended."""
    own_bridge()
    dev = own_device()
    w = Watcher(own_broker, [f"llm/{dev.id}/state"])
    try:
        dev.send({"id": "p1", "prompt": "[mock tokens=5 delay_ms=20] one"})
        dev.send({"id": "p2", "prompt": "[mock tokens=40 delay_ms=20] two"})
        dev.wait("p1")
        dev.wait("p2")
        w.wait_for(lambda m: m.json["status"] == "idle" and m.json["active"] == 0)
        seen = states(w, dev.id)
        # p1 ends while p2 streams: a state with p1's reply, still streaming.
        mid = [s for s in seen if s["request_id"] == "p1" and s["replied_at"]]
        assert mid and mid[0]["status"] == "streaming" and mid[0]["active"] == 1
        assert mid[0]["question"] == "[mock tokens=5 delay_ms=20] one"  # p1's, not p2's
        assert seen[-1]["request_id"] == "p2" and seen[-1]["status"] == "idle"
        assert len(seen) <= 5  # thinking, streaming, (p1 done), idle: never per chunk
    finally:
        w.close()


# --- the bridge's counters and restarts ------------------------------------------------------


def _stats(w: Watcher, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return w.wait_for(lambda m: m.topic == "llm/bridge/stats" and pred(m.json)).json  # type: ignore[no-any-return]


def test_bridge_counters_and_a_crash_mid_request(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    """Counters count; after a crash the stale `thinking` becomes `interrupted` and the
    counters go on from the retained ones."""
    client_id = f"bridge-st-{os.urandom(3).hex()}"
    dev = own_device()
    w = Watcher(own_broker, ["llm/bridge/stats", f"llm/{dev.id}/state"])
    try:
        proc = own_bridge(BRIDGE_CLIENT_ID=client_id, BRIDGE_UPSTREAM_RETRIES=0)
        # The first counters this process publishes (live, not the retained ones of
        # an earlier bridge) already include the earlier bridges' counts.
        base = w.wait_for(lambda m: m.topic == "llm/bridge/stats" and not m.retain).json
        ok = dev.ask({"id": "k1", "prompt": "count me"})
        dev.ask({"id": "k2", "prompt": "[mock status=400] fail"})
        tokens = ok.terminal["usage"]["total_tokens"]
        after = _stats(w, lambda s: s["requests"] == base["requests"] + 2 and s["errors"] >= 1)
        assert after["errors"] == base["errors"] + 1
        assert after["tokens_today"] == base["tokens_today"] + tokens
        assert after["active"] == 0 and after["devices"] >= 1

        dev.send({"id": "k3", "prompt": "[mock hang=1] never ends"})
        w.wait_for(lambda m: m.topic.endswith("/state") and m.json["request_id"] == "k3")
        proc.kill()
        wait_for_status(own_broker, "llm", "offline")
        own_bridge(BRIDGE_CLIENT_ID=client_id)
        fixed = w.wait_for(
            lambda m: (
                m.topic.endswith("/state")
                and m.json["status"] == "error"
                and m.json["request_id"] == "k3"
            )
        ).json
        assert fixed["error"]["code"] == "interrupted" and fixed["request_id"] == "k3"
        assert fixed["reply"] == ok.text  # the last reply survived the crash
        # The new process (another `started`) goes on from the retained counters.
        again = _stats(
            w, lambda s: s["started"] != after["started"] and s["requests"] >= after["requests"]
        )
        assert again["tokens_today"] == after["tokens_today"]
        assert again["errors"] == after["errors"]
    finally:
        w.close()


def test_state_off(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    own_bridge(BRIDGE_STATE="false", BRIDGE_HA_DISCOVERY="false")
    dev = own_device()
    w = Watcher(own_broker, [f"llm/{dev.id}/#", "homeassistant/#", "llm/bridge/stats"])
    try:
        assert dev.ask({"id": "o1", "prompt": "quiet"}).terminal["done"] is True
        time.sleep(0.5)
        topics = {m.topic for m in w.msgs if not m.retain}
        assert f"llm/{dev.id}/res/o1" in topics  # the watcher does see the reply...
        assert topics == {f"llm/{dev.id}/req", f"llm/{dev.id}/res/o1"}  # ...and nothing else
    finally:
        w.close()
