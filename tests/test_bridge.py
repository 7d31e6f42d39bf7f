"""Protocol v1 end to end: a real Mosquitto, the mock LLM on loopback, the bridge as a process.

Each test states one sentence of docs/protocol.md and checks it from the
device's side (and, where it matters, from what the API received).
"""

from __future__ import annotations

import base64
import io
import json
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from bridge.dev.mock_llm import reply_tokens, running_mock
from bridge.ops.tlsgen import make_certificates
from tests.harness import API_KEY, BridgeProcess, Broker, Device, free_port, wait_for_status

StartBridge = Callable[..., BridgeProcess]
MakeDevice = Callable[..., Device]


def expected(prompt: str, tokens: int | None = None) -> str:
    return "".join(reply_tokens(prompt, tokens))


# --- the normal path ------------------------------------------------------------------------


def test_reply_streams_in_chunks_with_one_terminal(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "r1", "prompt": "Why is the sky blue? [mock tokens=20]"})
    assert reply.text == expected("Why is the sky blue?", 20)
    assert len(reply.messages) == 21  # one chunk per token, then the terminal
    t = reply.terminal
    assert t["done"] is True and t["finish_reason"] == "stop" and t["model"] == "mock-1"
    assert t["usage"]["completion_tokens"] == 20
    assert "text" not in t
    device.quiet_after("r1")


def test_unstreamed_reply_is_one_terminal_with_text(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "r2", "prompt": "Hello there", "stream": False})
    assert len(reply.messages) == 1
    assert reply.terminal["text"] == expected("Hello there")
    assert reply.terminal["finish_reason"] == "stop"


def test_plain_text_payload_is_a_prompt(bridge: BridgeProcess, device: Device) -> None:
    device.send("What time is it?")
    rid, reply = device.wait_any()
    assert len(rid) == 12 and reply.text == expected("What time is it?")


def test_request_without_id_gets_one(bridge: BridgeProcess, device: Device) -> None:
    device.send({"prompt": "no id here"})
    rid, reply = device.wait_any()
    assert reply.text == expected("no id here")
    assert all(c in "0123456789abcdef" for c in rid)


def test_fields_are_forwarded_exactly(bridge: BridgeProcess, device: Device, mock_llm: Any) -> None:
    req = {
        "id": "fw1",
        "prompt": "forward me",
        "system": "Be brief.",
        "model": "mock-large",
        "max_tokens": 50,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
    }
    reply = device.ask(req)
    assert reply.terminal["model"] == "mock-large"
    sent = [r for r in mock_llm.requests if r["path"].endswith("/chat/completions")][-1]
    body = sent["body"]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "forward me"},
    ]
    for key in ("model", "max_tokens", "temperature", "top_p", "stop", "seed"):
        assert body[key] == req[key]
    assert body["presence_penalty"] == 0.1 and body["frequency_penalty"] == -0.2
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert sent["headers"]["authorization"] == f"Bearer {API_KEY}"


def test_messages_with_image_parts(bridge: BridgeProcess, device: Device, mock_llm: Any) -> None:
    """Inline images reach the API re-encoded as JPEG (docs/protocol.md "Pictures"), the rest
    of the conversation as it was sent."""
    small = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(small, "PNG")
    image = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    messages = [
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "reply"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        },
    ]
    reply = device.ask({"id": "img1", "messages": messages})
    assert reply.text.startswith("I see 1 image")
    body = [r for r in mock_llm.requests if r["path"].endswith("/chat/completions")][-1]["body"]
    sent = body["messages"][2]["content"][1]["image_url"]["url"]
    assert sent.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1]))).size == (40, 30)
    messages[2]["content"][1]["image_url"]["url"] = sent
    assert body["messages"] == messages


def test_reasoning_never_reaches_the_device(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "th1", "prompt": "think first [mock reasoning=5 tokens=4]"})
    assert reply.text == expected("think first", 4)


def test_refusal_reaches_the_device(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "rf1", "prompt": "something bad [mock refusal=1]"})
    assert reply.refusal == "I can't help with that."
    assert reply.text == ""
    assert reply.terminal["done"] is True


def test_tool_calls_come_back_in_the_terminal(bridge: BridgeProcess, device: Device) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    reply = device.ask({"id": "tc1", "prompt": "weather? [mock tool=1]", "tools": tools})
    t = reply.terminal
    assert t["finish_reason"] == "tool_calls"
    (call,) = t["tool_calls"]
    assert call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"]) == {"q": "weather?"}
    follow = device.ask({
        "id": "tc2",
        "tools": tools,
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call["id"], "type": "function", "function": call["function"]}]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
    })  # fmt: skip
    assert "sunny" in follow.text


def test_length_finish_reason(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "len1", "prompt": "long [mock tokens=30]", "max_tokens": 5})
    assert reply.terminal["finish_reason"] == "length"
    assert len(reply.messages) == 6


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        ({"id": "b1", "prompt": "x", "colour": "red"}, "bad_request", "colour: unknown field"),
        ({"id": "b2", "prompt": 42}, "bad_request", "prompt"),
        ({"id": "b3", "prompt": "x", "stream": "yes"}, "bad_request", "stream"),
        ({"id": "b4", "prompt": "x", "max_tokens": "5"}, "bad_request", "max_tokens"),
        ({"id": "b5", "prompt": "x", "temperature": 3}, "bad_request", "temperature"),
        ({"id": "b6"}, "bad_request", "exactly one of prompt and messages"),
        ({"id": "b7", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
         "bad_request", "exactly one"),
        ({"id": "b8", "messages": [{"role": "robot", "content": "y"}]}, "bad_request", "role"),
        ({"id": "b9", "prompt": "x", "n": 3}, "bad_request", "n: unknown field"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_error(
    bridge: BridgeProcess, device: Device, payload: dict[str, Any], code: str, fragment: str
) -> None:
    reply = device.ask(payload)
    assert len(reply.messages) == 1
    assert reply.error_code == code
    assert fragment in reply.terminal["error"]["message"]


def test_bad_json_is_answered_on_its_id(bridge: BridgeProcess, device: Device) -> None:
    device.send(b'{"id": "bj1", "prompt": "unterminated')
    reply = device.wait("bj1")
    assert (
        reply.error_code == "bad_request" and "not valid JSON" in reply.terminal["error"]["message"]
    )


def test_bad_id_is_answered_on_a_made_id(bridge: BridgeProcess, device: Device) -> None:
    device.send({"id": "has/slash", "prompt": "x"})
    rid, reply = device.wait_any()
    assert rid != "has/slash" and reply.error_code == "bad_request"
    assert "id" in reply.terminal["error"]["message"]


def test_too_large_is_answered_on_its_id(bridge: BridgeProcess, device: Device) -> None:
    big = json.dumps({"id": "big1", "prompt": "x" * 300_000})
    device.send(big)
    reply = device.wait("big1")
    assert reply.error_code == "too_large"


def test_invalid_utf8_and_empty(bridge: BridgeProcess, device: Device) -> None:
    device.send(b"\xff\xfe\xfa")
    _rid, reply = device.wait_any()
    assert reply.error_code == "bad_request"
    assert "UTF-8" in reply.terminal["error"]["message"]


def test_invalid_device_id_is_logged_and_bridge_keeps_serving(
    bridge: BridgeProcess, broker: Broker, device: Device
) -> None:
    bad_id = "x" * 70  # a broker user whose name is too long to be a device id
    broker.add_user(bad_id)
    c = paho.Client(CallbackAPIVersion.VERSION2)
    c.username_pw_set(bad_id, broker.users[bad_id])
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(f"llm/{bad_id}/req", b'{"prompt":"hi"}', qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    deadline = time.monotonic() + 5
    while "invalid device id" not in bridge.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "invalid device id 'xxxxxxxx" in bridge.logs()
    assert device.ask({"id": "after", "prompt": "still there?"}).terminal["done"]


# --- upstream faults: each ends with exactly one terminal ----------------------------------


def test_http_error_keeps_status(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "s1", "prompt": "[mock status=400]"})
    err = reply.terminal["error"]
    assert err["code"] == "upstream_status" and err["status"] == 400
    assert "400" in err["message"]


def test_retryable_status_is_retried_then_succeeds(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "s2", "prompt": "flaky [mock status=503 fail_times=2 run=s2]"})
    assert reply.text == expected("flaky")


def test_retries_give_up_with_the_last_status(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "s3", "prompt": "[mock status=429 retry_after=0]"})
    assert reply.terminal["error"]["status"] == 429


def test_retry_after_is_honoured(bridge: BridgeProcess, device: Device) -> None:
    t0 = time.monotonic()
    reply = device.ask(
        {"id": "s4", "prompt": "wait [mock status=429 retry_after=1 fail_times=1 run=s4]"}
    )
    assert reply.text == expected("wait")
    assert time.monotonic() - t0 >= 1.0


def test_retry_after_beyond_the_limit_is_not_waited(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    device = make_device(prefix=start_bridge(BRIDGE_UPSTREAM_RETRY_MAX_WAIT=1).prefix)
    t0 = time.monotonic()
    reply = device.ask({"id": "s5", "prompt": "[mock status=429 retry_after=30]"})
    assert reply.terminal["error"]["status"] == 429 and time.monotonic() - t0 < 5


def test_silent_api_times_out(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "t1", "prompt": "[mock hang=1]"}, timeout=20)
    assert reply.error_code == "upstream_timeout"


def test_slow_first_byte_times_out(start_bridge: StartBridge, make_device: MakeDevice) -> None:
    device = make_device(prefix=start_bridge(BRIDGE_UPSTREAM_RETRIES=0).prefix)
    reply = device.ask({"id": "t2", "prompt": "[mock first_byte_delay_ms=4000]"}, timeout=20)
    assert reply.error_code == "upstream_timeout"


def test_total_timeout_bounds_a_dripping_stream(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    device = make_device(prefix=start_bridge(BRIDGE_UPSTREAM_TOTAL_TIMEOUT=1).prefix)
    reply = device.ask({"id": "t3", "prompt": "[mock tokens=100 delay_ms=50]"}, timeout=20)
    assert reply.error_code == "upstream_timeout"
    assert 5 < len(reply.messages) < 60


def test_refused_connection(start_bridge: StartBridge, make_device: MakeDevice) -> None:
    device = make_device(
        prefix=start_bridge(
            base_url=f"http://127.0.0.1:{free_port()}/v1", BRIDGE_UPSTREAM_RETRIES=1
        ).prefix
    )
    reply = device.ask({"id": "u1", "prompt": "anyone?"})
    assert reply.error_code == "upstream_unreachable"


def test_stream_cut_in_the_middle(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "c1", "prompt": "[mock tokens=10 cut_after=4]"})
    assert reply.error_code == "upstream_protocol"
    assert len(reply.messages) == 5  # four chunks, then the terminal


def test_malformed_event(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "m1", "prompt": "[mock tokens=10 malformed_at=3]"})
    assert reply.error_code == "upstream_protocol"
    assert "malformed" in reply.terminal["error"]["message"]


@pytest.mark.parametrize("kind", ["error_event_at", "event_error_at"])
def test_error_inside_the_stream(bridge: BridgeProcess, device: Device, kind: str) -> None:
    reply = device.ask({"id": "e1", "prompt": f"[mock tokens=10 {kind}=3]"})
    assert reply.error_code == "upstream_error"
    assert "mock error" in reply.terminal["error"]["message"]
    assert len(reply.messages) == 4


def test_api_key_is_never_published_or_logged(
    bridge: BridgeProcess, broker: Broker, device: Device
) -> None:
    seen: list[bytes] = []
    c = paho.Client(CallbackAPIVersion.VERSION2)
    c.username_pw_set("integrations", broker.users["integrations"])
    c.on_message = lambda _c, _u, m: seen.append(m.payload)
    c.on_connect = lambda *a: c.subscribe("llm/#", qos=1)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    time.sleep(0.3)
    device.ask({"id": "k1", "prompt": "[mock status=401]"})
    device.ask({"id": "k2", "prompt": "fine"})
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()
    assert len(seen) >= 3
    assert not [m for m in seen if API_KEY.encode() in m]
    assert API_KEY not in bridge.logs()


# --- cancel, concurrency, overload -----------------------------------------------------------


def test_cancel_stops_the_stream_upstream(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    with running_mock(api_key=API_KEY) as own:
        # No models topic: its GET /models would keep a connection of its own open.
        proc = start_bridge(base_url=own.base_url, BRIDGE_MODELS_TOPIC="false")
        device = make_device(prefix=proc.prefix)
        _cancel_and_check(device, own.server)


def _cancel_and_check(device: Device, server: Any) -> None:
    device.send({"id": "x1", "prompt": "long [mock tokens=400 delay_ms=20]"})
    deadline = time.monotonic() + 5
    while len(device.replies.get("x1", [])) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    device.cancel("x1")
    reply = device.wait("x1")
    assert reply.error_code == "cancelled"
    assert 3 <= len(reply.messages) < 100
    # The HTTP stream was closed at once: the mock's only connection is gone,
    # long before the 8 s the reply would have taken.
    deadline = time.monotonic() + 2
    while server.open_connections > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.open_connections == 0
    device.quiet_after("x1", 0.5)


def test_cancel_of_unknown_id_is_ignored(bridge: BridgeProcess, device: Device) -> None:
    device.cancel("never-sent")
    device.client.publish("llm/" + device.id + "/cancel", b"plain-id", qos=1)
    assert device.ask({"id": "ok1", "prompt": "still fine"}).terminal["done"]


def test_one_slow_stream_does_not_delay_another(
    bridge: BridgeProcess, make_device: Callable[..., Device]
) -> None:
    slow, fast = make_device(), make_device()
    slow.send({"id": "slow", "prompt": "[mock tokens=60 delay_ms=50]"})
    time.sleep(0.2)
    fast.ask({"id": "fast", "prompt": "quick [mock tokens=5]"})
    # The fast reply finished while the slow one (3 s in all) was still streaming.
    assert "done" not in slow.replies["slow"][-1]
    slow.wait("slow", timeout=20)


def test_overloaded_when_queue_is_full(start_bridge: StartBridge, make_device: MakeDevice) -> None:
    device = make_device(prefix=start_bridge(BRIDGE_MAX_STREAMS=1, BRIDGE_MAX_QUEUE=1).prefix)
    for i in range(4):
        device.send({"id": f"o{i}", "prompt": f"[mock tokens=10 delay_ms=30] {i}"})
    replies = [device.wait(f"o{i}", timeout=20) for i in range(4)]
    codes = [r.error_code for r in replies]
    assert codes[:2] == [None, None]
    assert codes[2:] == ["overloaded", "overloaded"]


def test_queued_requests_wait_their_turn(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    device = make_device(prefix=start_bridge(BRIDGE_MAX_STREAMS=2, BRIDGE_MAX_QUEUE=10).prefix)
    for i in range(6):
        device.send({"id": f"q{i}", "prompt": f"[mock tokens=5 delay_ms=20] {i}"})
    for i in range(6):
        assert device.wait(f"q{i}", timeout=20).terminal["done"]


def test_cancel_while_queued(start_bridge: StartBridge, make_device: MakeDevice) -> None:
    device = make_device(prefix=start_bridge(BRIDGE_MAX_STREAMS=1, BRIDGE_MAX_QUEUE=5).prefix)
    device.send({"id": "busy", "prompt": "[mock tokens=40 delay_ms=25]"})
    device.send({"id": "waiting", "prompt": "never runs"})
    time.sleep(0.2)
    device.cancel("waiting")
    reply = device.wait("waiting")
    assert reply.error_code == "cancelled" and len(reply.messages) == 1
    assert device.wait("busy", timeout=20).terminal["done"]


# --- delivery: duplicates, reused ids, restarts ----------------------------------------------


def test_duplicate_delivery_is_not_sent_upstream_twice(
    bridge: BridgeProcess, device: Device, mock_llm: Any
) -> None:
    payload = json.dumps({"id": "d1", "prompt": "dedup me [mock tokens=3]"})
    before = len([r for r in mock_llm.requests if "dedup me" in json.dumps(r.get("body"))])
    device.send(payload)
    device.wait("d1")
    device.send(payload)
    device.quiet_after("d1", 0.5)
    after = len([r for r in mock_llm.requests if "dedup me" in json.dumps(r.get("body"))])
    assert after - before == 1


def test_reused_id_with_new_payload_is_answered(bridge: BridgeProcess, device: Device) -> None:
    first = device.ask({"id": "1", "prompt": "first boot"})
    device.replies.pop("1")
    second = device.ask({"id": "1", "prompt": "second boot"})
    assert first.text == expected("first boot") and second.text == expected("second boot")


def test_reused_id_while_running_supersedes(bridge: BridgeProcess, device: Device) -> None:
    device.send({"id": "dup", "prompt": "[mock tokens=200 delay_ms=20] old"})
    time.sleep(0.3)
    device.send({"id": "dup", "prompt": "new one"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msgs = device.replies["dup"]
        terminals = [m for m in msgs if "done" in m or "error" in m]
        if len(terminals) == 2:
            break
        time.sleep(0.05)
    msgs = device.replies["dup"]
    terminals = [m for m in msgs if "done" in m or "error" in m]
    assert terminals[0]["error"]["code"] == "cancelled"
    assert "superseded" in terminals[0]["error"]["message"]
    assert terminals[1]["done"] is True
    cut = msgs.index(terminals[0]) + 1
    assert "".join(m.get("delta", "") for m in msgs[cut:]) == expected("new one")


def test_status_online_and_last_will(start_bridge: StartBridge, broker: Broker) -> None:
    proc = start_bridge(BRIDGE_TOPIC_PREFIX="lw")
    wait_for_status(broker, "lw", "online")
    proc.kill()
    wait_for_status(broker, "lw", "offline", timeout=60)


def test_clean_stop_says_offline(start_bridge: StartBridge, broker: Broker) -> None:
    proc = start_bridge(BRIDGE_TOPIC_PREFIX="cs")
    assert proc.stop() == 0
    wait_for_status(broker, "cs", "offline", timeout=5)


def test_requests_sent_while_bridge_is_down_are_served(
    start_bridge: StartBridge, broker: Broker, make_device: Callable[..., Device]
) -> None:
    env = {"BRIDGE_CLIENT_ID": "bridge-restart-test", "BRIDGE_TOPIC_PREFIX": "restart"}
    proc = start_bridge(**env)
    proc.stop()
    dev = make_device(prefix="restart")
    for i in range(3):
        dev.send({"id": f"w{i}", "prompt": f"while down {i}"})
    start_bridge(**env)
    for i in range(3):
        assert dev.wait(f"w{i}", timeout=20).text == expected(f"while down {i}")


def test_shutdown_ends_running_requests_with_interrupted(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    proc = start_bridge(BRIDGE_SHUTDOWN_GRACE=0.3)
    device = make_device(prefix=proc.prefix)
    device.send({"id": "int1", "prompt": "[mock tokens=300 delay_ms=20]"})
    time.sleep(0.4)
    proc.stop()
    reply = device.wait("int1")
    assert reply.error_code == "interrupted"


def test_grace_lets_short_requests_finish(
    start_bridge: StartBridge, make_device: MakeDevice
) -> None:
    proc = start_bridge(BRIDGE_SHUTDOWN_GRACE=5)
    device = make_device(prefix=proc.prefix)
    device.send({"id": "g1", "prompt": "[mock tokens=20 delay_ms=20]"})
    time.sleep(0.15)
    proc.stop()
    assert device.wait("g1").terminal["done"]


def test_many_devices_at_once(bridge: BridgeProcess, make_device: Callable[..., Device]) -> None:
    devices = [make_device() for _ in range(5)]
    threads = []
    results: dict[str, str] = {}

    def run(d: Device) -> None:
        for i in range(4):
            r = d.ask({"id": f"m{i}", "prompt": f"{d.id} {i} [mock tokens=15]"})
            results[f"{d.id}/{i}"] = r.text

    for d in devices:
        t = threading.Thread(target=run, args=(d,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(30)
    assert len(results) == 20
    for key, text in results.items():
        dev_id, i = key.split("/")
        assert text == expected(f"{dev_id} {i}", 15)


def test_duplicate_of_a_refused_request_gets_no_second_terminal(
    bridge: BridgeProcess, device: Device
) -> None:
    payload = json.dumps({"id": "dr1", "prompt": "x", "colour": "red"})
    device.send(payload)
    device.wait("dr1")
    device.send(payload)
    reply = device.quiet_after("dr1", 0.5)
    assert len(reply.messages) == 1 and reply.error_code == "bad_request"


def test_https_api_behind_a_private_ca(
    start_bridge: StartBridge, make_device: MakeDevice, tmp_path: Path
) -> None:
    """Real providers are HTTPS: the bridge streams over TLS and checks the certificate."""
    issued = make_certificates(tmp_path / "certs")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(issued.server_cert, issued.server_key)
    with running_mock(api_key=API_KEY, ssl_context=ctx) as secure:
        url = f"https://localhost:{secure.port}/v1"
        trusted = start_bridge(base_url=url, BRIDGE_UPSTREAM_CA_FILE=str(issued.ca_cert))
        dev = make_device(prefix=trusted.prefix)
        reply = dev.ask({"id": "tls1", "prompt": "over TLS [mock tokens=12]"})
        assert reply.text == expected("over TLS", 12)
        untrusting = start_bridge(base_url=url, BRIDGE_UPSTREAM_RETRIES=0)
        dev2 = make_device(prefix=untrusting.prefix)
        refused = dev2.ask({"id": "tls2", "prompt": "not without the CA"})
        assert refused.error_code == "upstream_unreachable"
        assert "certificate" in refused.terminal["error"]["message"].lower()
