"""Tools (protocol v2) end to end: Mosquitto with broker/'s ACL, the bridge as a process, the
mock LLM scripted to call tools (`[mock call=...]`), and tool devices that are real MQTT
clients of their own broker users.

The tool devices here are plain paho clients, so that each test can send exactly the
message it is about (a redelivery, another device's result, a card too large); the device
library itself is run on the MicroPython VM in tests/device/test_tools_mqtt.py.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.dev.mock_llm import PREAMBLE_TEXT, reply_tokens
from tests.harness import (
    API_KEY,
    BridgeProcess,
    Broker,
    Device,
    Watcher,
    bridge_env,
    wait_for_status,
)

PREFIX = "tools"
LAMP, SWITCH, FAN, INTRUDER, DESK = "tlamp", "tswitch", "tfan", "tintruder", "tdesk"
_n = itertools.count()

SET_LED = {
    "name": "set_led",
    "description": "Turn the lamp on or off",
    "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
    "timeout_ms": 1500,
}
READ_TEMP = {"name": "read_temp", "description": "Temperature in C", "timeout_ms": 400}


class ToolPeer:
    """A tool device as a plain paho client (MQTT 3.1.1, as a Pico speaks it)."""

    def __init__(
        self,
        broker: Broker,
        device: str,
        *,
        answer: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
        persistent: bool = False,
    ) -> None:
        if device not in broker.users:
            broker.add_user(device)
        self.broker = broker
        self.device = device
        self.base = f"{PREFIX}/{device}/"
        self.answer = answer
        self.calls: list[dict[str, Any]] = []
        self.verdicts: list[Any] = []
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.cond = threading.Condition()
        self.session = ""
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"peer-{device}" if persistent else f"peer-{device}-{next(_n)}",
            clean_session=not persistent,
            protocol=paho.MQTTv311,
        )
        c.username_pw_set(device, broker.users[device])
        c.will_set(self.base + "status", '{"online":false}', qos=1, retain=True)
        c.on_message = self._on_message
        ready = threading.Event()
        c.on_subscribe = lambda *a: ready.set()
        filters = [(self.base + "call", 1), (self.base + "tools/ack", 1), (self.base + "res/+", 1)]
        c.on_connect = lambda *a: c.subscribe(filters)
        self.client = c
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert ready.wait(5), f"{device} could not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        data = json.loads(msg.payload) if msg.payload else None
        with self.cond:
            if msg.topic.endswith("/tools/ack"):
                self.verdicts.append(data)
            elif "/res/" in msg.topic:
                self.replies.setdefault(msg.topic.rsplit("/", 1)[1], []).append(data)
            else:
                self.calls.append(data)
            self.cond.notify_all()
        if msg.topic.endswith("/call") and self.answer is not None:
            body = self.answer(data)
            if body is not None:  # not waiting: this runs in paho's network thread
                self.client.publish(self.base + "result", json.dumps({"id": data["id"], **body}), 1)

    def publish(self, kind: str, payload: bytes | str, *, retain: bool = False) -> None:
        self.client.publish(self.base + kind, payload, qos=1, retain=retain).wait_for_publish(5)

    def declare(self, *tools: dict[str, Any]) -> Any:
        """Publish the card and an online status; return the bridge's verdict."""
        with self.cond:
            seen = len(self.verdicts)
        self.publish("tools", json.dumps({"tools": list(tools)}), retain=True)
        self.session = f"s{next(_n)}"
        self.publish("status", json.dumps({"online": True, "session": self.session}), retain=True)
        return self.wait_verdict(seen)

    def wait_verdict(self, seen: int, timeout: float = 5) -> Any:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.verdicts) > seen, timeout), "no verdict"
            return self.verdicts[-1]

    def result(self, body: dict[str, Any]) -> None:
        self.publish("result", json.dumps(body))

    def wait_calls(self, n: int, timeout: float = 5) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, timeout), self.calls
            return list(self.calls)

    def ask(self, prompt: str, timeout: float = 10) -> list[dict[str, Any]]:
        """Ask with `use_tools` as this device; its checked reply stream."""
        rid = f"p{next(_n)}"
        self.publish("req", json.dumps({"id": rid, "prompt": prompt, "use_tools": True}))
        with self.cond:
            ok = self.cond.wait_for(
                lambda: any("done" in m or "error" in m for m in self.replies.get(rid, [])),
                timeout,
            )
            assert ok, self.replies.get(rid)
            msgs = list(self.replies[rid])
        check(msgs)
        return msgs

    def close(self, *, clean: bool = True) -> None:
        if clean:
            self.client.disconnect()
        else:
            sock = self.client.socket()
            if sock is not None:
                sock.close()  # gone without DISCONNECT: the broker sends the last will
        self.client.loop_stop()

    def clear(self) -> None:
        for kind in ("tools", "status"):
            self.publish(kind, b"", retain=True)


def led_answer(call: dict[str, Any]) -> dict[str, Any] | None:
    if call["name"] == "set_led":
        return {"result": {"on": call["arguments"].get("on")}}
    if call["name"] == "read_temp":
        return {"result": {"celsius": 21.5}}
    return {"error": "no such tool"}


@pytest.fixture(scope="module")
def tool_bridge(
    broker: Broker, mock_llm: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeProcess]:
    policy = {
        "devices": {
            SWITCH: {
                "tools": [f"{LAMP}/*", f"{FAN}/*", "bridge/get_weather", "bridge/slow"],
                "max_tool_rounds": 2,
                "tokens_per_day": 10_000_000,  # so that the bridge counts the tokens
            },
        }
    }
    env = bridge_env(
        broker,
        mock_llm.base_url,
        BRIDGE_TOPIC_PREFIX=PREFIX,
        BRIDGE_CLIENT_ID="bridge-tools",
        BRIDGE_POLICY=json.dumps(policy),
        BRIDGE_TOOLS="tests.tooltargets:get_weather,tests.tooltargets:slow",
        BRIDGE_TOOL_TIMEOUT_MS="800",
    )
    proc = BridgeProcess(tmp_path_factory.mktemp("tools-bridge"), env).start()
    wait_for_status(broker, PREFIX, "online")
    yield proc
    proc.stop()
    assert API_KEY not in proc.logs()


@pytest.fixture
def lamp(broker: Broker, tool_bridge: BridgeProcess) -> Iterator[ToolPeer]:
    peer = ToolPeer(broker, LAMP, answer=led_answer)
    assert peer.declare(SET_LED, READ_TEMP) == {"ok": True, "tools": ["set_led", "read_temp"]}
    yield peer
    peer.clear()
    peer.close()


@pytest.fixture
def switch(broker: Broker, tool_bridge: BridgeProcess) -> Iterator[Device]:
    d = Device(broker, SWITCH, PREFIX)
    yield d
    d.close()


def check(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Protocol v2's reply stream: seq from 0 without gaps, progress and deltas, one terminal."""
    assert [m["seq"] for m in messages] == list(range(len(messages))), messages
    kinds = [next(k for k in m if k != "seq") for m in messages]
    assert all(k in ("delta", "refusal", "tool_call", "tool_result") for k in kinds[:-1]), kinds
    assert kinds[-1] in ("done", "error"), kinds
    return messages[-1]


def ask(device: Device, prompt: str, timeout: float = 10, **extra: Any) -> list[dict[str, Any]]:
    rid = f"q{next(_n)}"
    device.send({"id": rid, "prompt": prompt, "use_tools": True, **extra})
    msgs = device.wait_raw(rid, timeout)
    check(msgs)
    return msgs


def model_requests(mock_llm: Any, marker: str) -> list[dict[str, Any]]:
    """The bodies the mock got for the conversation whose prompt holds `marker`."""
    word = re.compile(rf"(?<![\w-]){re.escape(marker)}(?![\w-])")
    out = []
    for r in mock_llm.requests:
        body = r.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            continue
        # Only the conversation's own words: the shared mock also holds other tests'
        # requests, and a picture's base64 may hold any short marker.
        said = [m.get("content") for m in body["messages"][:2] if isinstance(m, dict)]
        if any(isinstance(c, str) and word.search(c) for c in said):
            out.append(body)
    return out


def text(msgs: list[dict[str, Any]]) -> str:
    return "".join(m.get("delta", "") for m in msgs)


def tool_contents(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


# --------------------------------------------------------------------------- the loop


def tokens_today(bridge: BridgeProcess, device: str) -> int:
    """The tokens the bridge's policy counted for `device` today (its SQLite counters)."""
    db = sqlite3.connect(f"file:{bridge.dir / 'data' / 'counters.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT tokens FROM usage WHERE device = ? AND day = ?",
            (device, time.strftime("%Y-%m-%d", time.gmtime())),
        ).fetchone()
    finally:
        db.close()
    return int(row[0]) if row else 0


def test_a_granted_device_tool_is_called_and_its_result_answers(
    lamp: ToolPeer, switch: Device, mock_llm: Any, tool_bridge: BridgeProcess
) -> None:
    before = tokens_today(tool_bridge, SWITCH)
    prompt = "[mock call=set_led(on:true)] turn the lamp on m1"
    msgs = ask(switch, prompt)
    done = msgs[-1]
    assert done["done"] is True and done["tool_rounds"] == 1
    call = lamp.wait_calls(1)[-1]
    assert call == {
        "id": call["id"], "name": "set_led", "arguments": {"on": True},
        "session": lamp.session, "timeout_ms": 1500,
    }  # fmt: skip
    assert msgs[0] == {
        "seq": 0, "tool_call": {"id": call["id"], "name": "set_led", "device": LAMP}
    }  # fmt: skip
    assert msgs[1] == {"seq": 1, "tool_result": {"id": call["id"], "ok": True}}
    first, second = model_requests(mock_llm, "m1")
    assert [t["function"]["name"] for t in first["tools"]] == [
        "get_weather", "slow", f"{LAMP}__set_led", f"{LAMP}__read_temp"
    ]  # fmt: skip
    assert "use_tools" not in first
    assert tool_contents(second) == ['{"on":true}']
    assert text(msgs) == "".join(reply_tokens(prompt, tool_result='{"on":true}'))
    # usage is the sum of both calls to the model (the mock is deterministic: ask it again)
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        usages = [
            http.post(f"{mock_llm.base_url}/chat/completions", json={**b, "stream": False}).json()[
                "usage"
            ]["total_tokens"]
            for b in (first, second)
        ]
    assert done["usage"]["total_tokens"] == sum(usages)
    # and the daily budget is charged for both
    deadline = time.monotonic() + 3
    while tokens_today(tool_bridge, SWITCH) - before != sum(usages):
        assert time.monotonic() < deadline, (tokens_today(tool_bridge, SWITCH), before, usages)
        time.sleep(0.05)


def test_what_the_model_says_before_its_calls_is_streamed_and_kept_in_the_conversation(
    lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    prompt = "[mock call=set_led(on:true) preamble] m14"
    msgs = ask(switch, prompt)
    kinds = [next(k for k in m if k != "seq") for m in msgs]
    answer = reply_tokens(prompt, tool_result='{"on":true}')
    assert kinds == ["delta"] * 3 + ["tool_call", "tool_result"] + ["delta"] * len(answer) + [
        "done"
    ]
    assert "".join(m.get("delta", "") for m in msgs[:3]) == PREAMBLE_TEXT
    second = model_requests(mock_llm, "m14")[-1]
    assistant = [m for m in second["messages"] if m["role"] == "assistant"]
    assert assistant[0]["content"] == PREAMBLE_TEXT


def test_several_calls_in_a_round_bridge_tools_and_errors_are_results(
    lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    prompt = "[mock call=read_temp+get_weather(city:Oslo)+launch+set_led(on:1)] m2"
    lamp.answer = lambda c: {"error": "LED driver fault"} if c["name"] == "set_led" else (
        led_answer(c)
    )  # fmt: skip
    msgs = ask(switch, prompt)
    calls = [m["tool_call"] for m in msgs if "tool_call" in m]
    assert [(c["device"], c["name"]) for c in calls] == [
        (LAMP, "read_temp"), ("bridge", "get_weather"), (None, "launch"), (LAMP, "set_led")
    ]  # fmt: skip
    results = {m["tool_result"]["id"]: m["tool_result"]["ok"] for m in msgs if "tool_result" in m}
    assert [results[c["id"]] for c in calls] == [True, True, False, False]
    contents = tool_contents(model_requests(mock_llm, "m2")[-1])
    assert contents == [
        '{"celsius":21.5}',
        '{"city":"Oslo","temp":21}',
        '{"error":"there is no tool named \'launch\'"}',
        '{"error":"LED driver fault"}',
    ]
    assert msgs[-1]["done"] is True and msgs[-1]["tool_rounds"] == 1


def test_own_tools_keep_their_names_and_nothing_is_granted_by_default(
    broker: Broker, lamp: ToolPeer, tool_bridge: BridgeProcess, mock_llm: Any
) -> None:
    desk = ToolPeer(broker, DESK, answer=lambda c: {"result": "dimmed"})
    assert desk.declare({"name": "set_led"})["ok"] is True
    try:
        msgs = desk.ask("[mock call=set_led(on:true)] m3")
        assert msgs[0]["tool_call"]["device"] == DESK  # its own set_led, not the lamp's
        body = model_requests(mock_llm, "m3")[0]
        assert [t["function"]["name"] for t in body["tools"]] == ["set_led"]
        assert lamp.calls == [] and len(desk.calls) == 1
    finally:
        desk.clear()
        desk.close()


def test_an_unanswered_call_times_out_and_the_loop_goes_on(
    lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    lamp.answer = None
    start = time.monotonic()
    msgs = ask(switch, "[mock call=read_temp] m4")
    assert 0.35 < time.monotonic() - start < 3
    assert [m["tool_result"]["ok"] for m in msgs if "tool_result" in m] == [False]
    assert tool_contents(model_requests(mock_llm, "m4")[-1]) == [
        f'{{"error":"{LAMP} did not answer within 400 ms"}}'
    ]
    assert msgs[-1]["done"] is True
    # the answer that comes too late is ignored, and breaks nothing
    lamp.result({"id": lamp.calls[-1]["id"], "result": "late"})
    assert ask(switch, "[mock call=set_led(on:false)] m4b")[-1]["done"] is True


def test_a_device_offline_is_not_called(
    broker: Broker, switch: Device, tool_bridge: BridgeProcess, mock_llm: Any
) -> None:
    lamp = ToolPeer(broker, LAMP, answer=led_answer)
    lamp.declare(SET_LED)
    watcher = Watcher(broker, [f"{PREFIX}/{LAMP}/status"], user="integrations")
    lamp.close(clean=False)  # the broker publishes its last will: {"online":false}
    # the bridge's one connection gets the will before the request that follows it
    watcher.wait_for(lambda m: json.loads(m.payload) == {"online": False})
    watcher.close()
    msgs = ask(switch, "[mock call=set_led(on:true)] m5")
    assert tool_contents(model_requests(mock_llm, "m5")[-1]) == [
        f'{{"error":"device {LAMP} is offline"}}'
    ]
    assert msgs[-1]["done"] is True
    again = ToolPeer(broker, LAMP)  # nothing was queued for it
    time.sleep(0.3)
    assert again.calls == []
    again.clear()
    again.close()


def test_a_call_the_device_misses_expires_at_the_broker(
    broker: Broker, switch: Device, tool_bridge: BridgeProcess, mock_llm: Any
) -> None:
    """The device left without its last will reaching the bridge (a clean DISCONNECT, no
    offline status): the call waits in its persistent session, and expires there."""
    lamp = ToolPeer(broker, LAMP, persistent=True)
    lamp.declare({**SET_LED, "timeout_ms": 1000})
    lamp.close(clean=True)
    msgs = ask(switch, "[mock call=set_led(on:true)] m6")
    assert [m["tool_result"]["ok"] for m in msgs if "tool_result" in m] == [False]
    time.sleep(1.3)  # past the call's 1 s expiry
    back = ToolPeer(broker, LAMP, persistent=True)
    time.sleep(0.5)
    assert back.calls == []
    back.clear()
    back.close()


def test_a_result_counts_only_from_the_called_device_and_only_once(
    broker: Broker, lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    intruder = ToolPeer(broker, INTRUDER)
    lamp.answer = None
    try:
        rid = "q-other"
        switch.send({"id": rid, "prompt": "[mock call=set_led(on:true)] m7", "use_tools": True})
        call = lamp.wait_calls(1)[-1]
        # another device answers the lamp's call: on its own topic (the ACL allows no other)
        intruder.result({"id": call["id"], "result": "forged"})
        intruder.client.publish(
            f"{PREFIX}/{LAMP}/result", json.dumps({"id": call["id"], "result": "forged2"}), qos=1
        ).wait_for_publish(5)
        time.sleep(0.2)
        lamp.result({"id": call["id"], "result": "real"})
        lamp.result({"id": call["id"], "result": "twice"})
        msgs = switch.wait_raw(rid, 10)
        check(msgs)
        assert tool_contents(model_requests(mock_llm, "m7")[-1]) == ['"real"']
    finally:
        intruder.close()


# --------------------------------------------------------------------------- limits and cancel


def test_the_round_limit_ends_the_request_with_too_many_tool_rounds(
    lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    msgs = ask(switch, "[mock call=set_led(on:true) rounds=9] m8")
    assert msgs[-1]["error"]["code"] == "too_many_tool_rounds"
    assert "2 rounds" in msgs[-1]["error"]["message"]
    assert len(lamp.calls) == 2
    assert len(model_requests(mock_llm, "m8")) == 3


def test_cancel_mid_loop_abandons_the_call(lamp: ToolPeer, switch: Device, mock_llm: Any) -> None:
    lamp.answer = None
    rid = "q-cancel"
    switch.send({"id": rid, "prompt": "[mock call=set_led(on:true)] m9", "use_tools": True})
    call = lamp.wait_calls(1)[-1]
    start = time.monotonic()
    switch.cancel(rid)
    msgs = switch.wait_raw(rid, 5)
    check(msgs)
    assert time.monotonic() - start < 1
    assert msgs[-1]["error"]["code"] == "cancelled"
    lamp.result({"id": call["id"], "result": "late"})
    time.sleep(0.3)
    assert len(model_requests(mock_llm, "m9")) == 1
    assert switch.messages(rid) == msgs  # nothing after the terminal


def test_bridge_tool_timeout(switch: Device, tool_bridge: BridgeProcess, mock_llm: Any) -> None:
    msgs = ask(switch, "[mock call=slow(seconds:5)] m10")
    assert tool_contents(model_requests(mock_llm, "m10")[-1]) == [
        '{"error":"slow did not answer within 800 ms"}'
    ]
    assert msgs[-1]["done"] is True


# --------------------------------------------------------------------------- cards and ACL


def test_a_bad_card_is_refused_with_a_reason_and_breaks_no_other_device(
    broker: Broker, lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    fan = ToolPeer(broker, FAN)
    try:
        verdict = fan.declare({"name": "spin"}, {"name": "spin"})
        assert verdict == {"ok": False, "error": "tools[1].name: spin is declared twice"}
        seen = len(fan.verdicts)
        fan.publish("tools", b'{"tools": [' + b'{"name": "x"},' * 2000 + b"]}", retain=True)
        assert "more than 16384" in fan.wait_verdict(seen)["error"]
        seen = len(fan.verdicts)
        fan.publish("tools", b"\xff{", retain=True)
        assert "UTF-8" in fan.wait_verdict(seen)["error"]
        msgs = ask(switch, "[mock call=set_led(on:true)] m11")
        assert msgs[-1]["done"] is True
        names = [t["function"]["name"] for t in model_requests(mock_llm, "m11")[0]["tools"]]
        assert not any(n.startswith(FAN) for n in names) and f"{LAMP}__set_led" in names
        seen = len(fan.verdicts)
        fan.publish("tools", b"", retain=True)  # withdrawn: the verdict is cleared
        assert fan.wait_verdict(seen) is None
    finally:
        fan.clear()
        fan.close()


def test_acl_a_device_reads_only_its_own_calls_and_writes_only_its_own_tools(
    broker: Broker, lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    spy = ToolPeer(broker, INTRUDER)
    got: list[str] = []
    spy.client.on_message = lambda _c, _u, m: got.append(m.topic)
    spy.client.subscribe([(f"{PREFIX}/{LAMP}/call", 1), (f"{PREFIX}/+/call", 1)])
    # a card for the lamp written by another device never reaches the bridge
    spy.client.publish(
        f"{PREFIX}/{LAMP}/tools", json.dumps({"tools": [{"name": "evil"}]}), qos=1, retain=True
    ).wait_for_publish(5)
    spy.client.publish(
        f"{PREFIX}/{LAMP}/status", '{"online":true,"session":"forged"}', qos=1, retain=True
    ).wait_for_publish(5)
    try:
        msgs = ask(switch, "[mock call=set_led(on:true)] m12")
        assert msgs[-1]["done"] is True
        assert lamp.wait_calls(1)[-1]["session"] == lamp.session
        names = [t["function"]["name"] for t in model_requests(mock_llm, "m12")[0]["tools"]]
        assert f"{LAMP}__evil" not in names
        time.sleep(0.2)
        assert got == []
    finally:
        spy.close()


# --------------------------------------------------------------------------- the commands


def _llm_bridge(*args: str, env: dict[str, str] | None = None, cwd: Any = None) -> Any:
    import os
    import subprocess
    import sys

    from tests.harness import REPO

    base = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    base["PYTHONPATH"] = str(REPO)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], env=base, cwd=cwd, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip


def test_demo_tools_prints_the_call_the_lamp_and_the_answer(tmp_path: Any) -> None:
    result = _llm_bridge("demo", "--tools", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "tool call: lamp/set_led" in err
    assert "lamp: LED ON" in err
    assert "tool result: ok" in err
    assert "tool_rounds=1" in err
    assert result.stdout.strip() == "".join(
        reply_tokens("Turn the lamp on, please.", tool_result='{"on":true}')
    )


@pytest.mark.parametrize(
    ("tools", "fragment"),
    [
        ("not a reference", "is not package.module:function"),
        ("tests.tooltargets:nothere", "has no function nothere"),
        ("no_such_module_zz:f", "cannot import no_such_module_zz"),
    ],
)
def test_a_bad_bridge_tool_stops_the_bridge_with_one_line(
    tmp_path: Any, tools: str, fragment: str
) -> None:
    result = _llm_bridge("run", env={"BRIDGE_TOOLS": tools}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "BRIDGE_TOOLS" in lines[0] and fragment in lines[0], lines


def test_chat_use_tools_prints_the_progress_and_the_answer(
    broker: Broker, lamp: ToolPeer, tmp_path: Any
) -> None:
    url = f"mqtt://{SWITCH}:{broker.users[SWITCH]}@127.0.0.1:{broker.port}"
    prompt = "[mock call=set_led(on:true)] lamp on from the shell m13"
    result = _llm_bridge(
        "chat", prompt, "--device", SWITCH, "--use-tools", "--prefix", PREFIX,
        "--mqtt-url", url, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"[tool call {LAMP}/set_led]" in result.stderr
    assert "[tool result: ok]" in result.stderr
    assert result.stdout.strip() == "".join(reply_tokens(prompt, tool_result='{"on":true}'))


def test_tool_choice_must_name_an_offered_tool(
    lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    msgs = ask(switch, "m15", tool_choice={"type": "function", "function": {"name": "launch"}})
    assert msgs[-1]["error"]["code"] == "bad_request"
    assert "launch" in msgs[-1]["error"]["message"]
    forced = ask(
        switch,
        "[mock call=set_led(on:true)] m16",
        tool_choice={"type": "function", "function": {"name": f"{LAMP}__set_led"}},
    )
    assert forced[-1]["done"] is True and forced[-1]["tool_rounds"] == 1
    first, second = model_requests(mock_llm, "m16")
    assert first["tool_choice"]["function"]["name"] == f"{LAMP}__set_led"
    assert second["tool_choice"] == "auto"  # forced once, then the model may answer


def test_arguments_a_device_could_not_parse_never_reach_it(
    lamp: ToolPeer, switch: Device, mock_llm: Any
) -> None:
    msgs = ask(switch, "[mock call=set_led(on:NaN)+read_temp(x:1) bad_args] m17")
    assert msgs[-1]["done"] is True
    assert (
        tool_contents(model_requests(mock_llm, "m17")[-1])
        == ['{"error":"the arguments are not valid JSON"}'] * 2
    )
    time.sleep(0.2)
    assert lamp.calls == []


def test_without_device_tools_only_the_bridge_s_own_are_offered(
    broker: Broker, start_bridge: Any, mock_llm: Any
) -> None:
    asker = f"tasker{next(_n)}"
    policy = {"default": {"tools": ["bridge/*", f"{LAMP}/*"]}}
    proc = start_bridge(
        BRIDGE_DEVICE_TOOLS="false",
        BRIDGE_TOOLS="tests.tooltargets:get_weather",
        BRIDGE_POLICY=json.dumps(policy),
    )
    peer = Device(broker, asker, proc.prefix)
    try:
        rid = "nodev"
        peer.send({"id": rid, "prompt": "[mock call=get_weather(city:Rome)] m18",
                   "use_tools": True})  # fmt: skip
        msgs = peer.wait_raw(rid, 10)
        check(msgs)
        assert msgs[0]["tool_call"] == {"id": msgs[0]["tool_call"]["id"], "name": "get_weather",
                                        "device": "bridge"}  # fmt: skip
        body = model_requests(mock_llm, "m18")[0]
        assert [t["function"]["name"] for t in body["tools"]] == ["get_weather"]
        assert msgs[-1]["done"] is True
    finally:
        peer.close()
