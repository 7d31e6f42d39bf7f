"""MQTT v5 request/response: a request with Response Topic and Correlation Data gets its
whole reply on that topic, every message carrying the same correlation data
(docs/protocol.md "MQTT v5 request/response"). Real Mosquitto, the bridge as a process,
and a paho MQTT v5 client as the device.
"""

from __future__ import annotations

import os
import time
from typing import Any

from tests.harness import BridgeProcess, Broker, Device, V5Device


def _terminals(msgs: list[tuple[str, dict[str, Any], Any]], corr: bytes) -> int:
    return sum(1 for _, m, c in msgs if c == corr and ("done" in m or "error" in m))


def _check_stream(msgs: list[dict[str, Any]]) -> None:
    assert [m["seq"] for m in msgs] == list(range(len(msgs)))
    assert all("delta" in m for m in msgs[:-1])
    assert "done" in msgs[-1] or "error" in msgs[-1]


def test_response_topic_and_correlation_data(broker: Broker, bridge: BridgeProcess) -> None:
    dev = V5Device(broker, f"v5a{os.getpid()}")
    try:
        inbox = f"llm/{dev.id}/res/inbox"
        corr = b"\x00\x01corr-1\xff"
        dev.request({"id": "v1", "prompt": "[mock tokens=8] hello v5"}, inbox, corr)
        msgs = dev.wait(lambda g: _terminals(g, corr) == 1)
        time.sleep(0.2)
        msgs = dev.got
        # Everything went to the response topic, each message with the correlation data.
        assert {t for t, _, _ in msgs} == {inbox}
        assert all(c == corr for _, _, c in msgs)
        stream = [m for _, m, _ in msgs]
        _check_stream(stream)
        assert len(stream) == 9 and stream[-1]["done"] is True
        assert "".join(m.get("delta", "") for m in stream).startswith("You said")
    finally:
        dev.close()


def test_two_requests_share_a_response_topic(broker: Broker, bridge: BridgeProcess) -> None:
    """The correlation data, not the topic, tells two concurrent replies apart."""
    dev = V5Device(broker, f"v5b{os.getpid()}")
    try:
        inbox = f"llm/{dev.id}/res/all"
        dev.request({"id": "a", "prompt": "[mock tokens=12 delay_ms=5] first"}, inbox, b"A")
        dev.request({"id": "b", "prompt": "[mock tokens=6 delay_ms=5] second"}, inbox, b"B")
        msgs = dev.wait(lambda g: _terminals(g, b"A") == 1 and _terminals(g, b"B") == 1)
        assert {t for t, _, _ in msgs} == {inbox}
        a = [m for _, m, c in msgs if c == b"A"]
        b = [m for _, m, c in msgs if c == b"B"]
        _check_stream(a)
        _check_stream(b)
        assert len(a) == 13 and len(b) == 7
        assert "first" in "".join(m.get("delta", "") for m in a)
    finally:
        dev.close()


def test_errors_follow_the_response_topic_and_bad_topics_are_refused(
    broker: Broker, bridge: BridgeProcess, make_device: Any
) -> None:
    dev = V5Device(broker, f"v5c{os.getpid()}")
    try:
        inbox = f"llm/{dev.id}/res/box"
        # An error terminal goes to the response topic too.
        dev.request({"id": "e1", "prompt": "x", "colour": "red"}, inbox, b"E1")
        msgs = dev.wait(lambda g: _terminals(g, b"E1") == 1)
        err = [(t, m) for t, m, c in msgs if c == b"E1"]
        assert err == [(inbox, err[0][1])] and err[0][1]["error"]["code"] == "bad_request"
        # A response topic outside P/D/res/ (another device's, a wildcard) is refused,
        # answered on P/D/res/R with the correlation data.
        other = make_device()
        for i, topic in enumerate([f"llm/{other.id}/res/steal", f"llm/{dev.id}/res/+", "x/y"]):
            corr = f"bad{i}".encode()
            dev.request({"id": f"b{i}", "prompt": "hi"}, topic, corr)
            got = dev.wait(lambda g, corr=corr: _terminals(g, corr) == 1)
            mine = [(t, m) for t, m, c in got if c == corr]
            assert [t for t, _ in mine] == [f"llm/{dev.id}/res/b{i}"]
            assert mine[0][1]["error"]["code"] == "bad_request"
            assert "response topic" in mine[0][1]["error"]["message"]
        time.sleep(0.2)
        assert other.replies == {}  # nothing was sent to the other device
        # Without a response topic a v5 request is served as in protocol v1; correlation
        # data alone still comes back.
        dev.request({"id": "plain", "prompt": "[mock tokens=3] plain"}, None, b"P")
        got = dev.wait(lambda g: _terminals(g, b"P") == 1)
        assert {t for t, _, c in got if c == b"P"} == {f"llm/{dev.id}/res/plain"}
        dev.request({"id": "none", "prompt": "[mock tokens=3] none"}, None, None)
        got = dev.wait(lambda g: any(t.endswith("/res/none") and "done" in m for t, m, _ in g))
        assert all(c is None for t, _, c in got if t.endswith("/res/none"))
    finally:
        dev.close()


def test_v311_devices_are_unchanged(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "old1", "prompt": "[mock tokens=4] v3.1.1"})
    assert reply.terminal["done"] is True and len(reply.messages) == 5
    assert set(device.replies) == {"old1"}
