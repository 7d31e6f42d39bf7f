"""Tools in MQTT mode on the MicroPython VM (protocol v2, "Tools").

First the device library's own rules against a real Mosquitto (broker/'s ACL),
with the test in the bridge's place: the card and presence on connect, calls
answered while idle, a redelivered call run once, a call past its deadline or
sent to an earlier connection refused. Then the whole stack: the lamp example
(device/examples/lamp/main.py) on one VM, a second VM device asking "turn the
lamp on" through the bridge's granted tools.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bridge.dev.mock_llm import reply_tokens
from tests.device import vmkit
from tests.device.test_tools_direct import run_tool_job
from tests.harness import Broker

_ids = itertools.count()


def mqtt_config(broker: Broker, device: str, prefix: str, **extra: Any) -> dict[str, Any]:
    password = broker.users.get(device) or broker.add_user(device)
    cfg: dict[str, Any] = {
        "mode": "mqtt",
        "device_id": device,
        "prefix": prefix,
        "broker": {"host": "127.0.0.1", "port": broker.port, "user": device,
                   "password": password, "keepalive": 30},
        "reply_timeout_ms": 8000,
        "history": 0,
    }  # fmt: skip
    cfg.update(extra)
    return cfg


class FakeBridge:
    """The bridge's side of the tools topics, as the `bridge` broker user (or, only to
    watch, as `integrations`, which leaves a running bridge's connection alone)."""

    def __init__(self, broker: Broker, prefix: str, device: str, user: str = "bridge") -> None:
        self.base = f"{prefix}/{device}/"
        self.got: list[tuple[str, Any]] = []
        self.cond = threading.Condition()
        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        c.username_pw_set(user, broker.users[user])
        c.on_message = self._on_message
        ready = threading.Event()
        c.on_subscribe = lambda *a: ready.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.subscribe([(self.base + k, 1) for k in ("tools", "status", "result")])
        assert ready.wait(5)
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            kind = msg.topic[len(self.base) :]
            self.got.append((kind, json.loads(msg.payload) if msg.payload else None))
            self.cond.notify_all()

    def wait(self, kind: str, pred: Any = lambda v: True, timeout: float = 10) -> Any:
        with self.cond:
            found: list[Any] = []

            def ok() -> bool:
                found[:] = [v for k, v in self.got if k == kind and pred(v)]
                return bool(found)

            assert self.cond.wait_for(ok, timeout), (kind, self.got)
            return found[-1]

    def of(self, kind: str) -> list[Any]:
        with self.cond:
            return [v for k, v in self.got if k == kind]

    def call(self, call_id: str, name: str, session: str, timeout_ms: int = 5000,
             **arguments: Any) -> None:  # fmt: skip
        body = {"id": call_id, "name": name, "arguments": arguments, "session": session,
                "timeout_ms": timeout_ms}  # fmt: skip
        self.client.publish(self.base + "call", json.dumps(body), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_device_library_runs_calls_once_on_time_and_only_for_this_connection(
    broker: Broker, tmp_path: Path
) -> None:
    device, prefix = f"vmtool{next(_ids)}", "vmtools"
    cfg = mqtt_config(broker, device, prefix)
    fake = FakeBridge(broker, prefix, device)
    gate = tmp_path / "gate"
    served = tmp_path / "served"
    served2 = tmp_path / "served2"
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            card = fake.wait("tools")
            assert [t["name"] for t in card["tools"]] == ["set_led", "read_temp", "broken", "slow"]
            assert card["tools"][3]["timeout_ms"] == 500
            first = fake.wait("status", lambda v: v and v.get("online"))["session"]
            fake.call("a1", "set_led", first, on=True)
            fake.call("a1", "set_led", first, on=True)  # a redelivery: same id
            fake.call("b1", "read_temp", first)
            fake.call("c1", "broken", first)
            fake.call("d1", "nothere", first)
            fake.call("e1", "set_led", "another-session", on=False)
            fake.call("f1", "slow", first, ms=600)
            fake.call("g1", "set_led", first, timeout_ms=100, on=False)  # waits behind f1
            fake.wait("result", lambda v: v["id"] == "g1")
            served.write_text("done")
            # the device goes away (no DISCONNECT): its last will says offline...
            fake.wait("status", lambda v: v == {"online": False})
            # ...and a call made meanwhile waits in its persistent session
            fake.call("h1", "set_led", first, on=False)
            gate.write_text("go")
            second = fake.wait("status", lambda v: v and v.get("session") not in (None, first))
            result["sessions"] = [first, second["session"]]
            fake.wait("result", lambda v: v["id"] == "h1")
            served2.write_text("done")
        except AssertionError as exc:
            result["error"] = exc

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        start, recs, pins = run_tool_job(
            tmp_path,
            cfg,
            ["set_led", "read_temp", "broken", "slow"],
            [
                {"op": "connect"},
                {"op": "serve", "until": str(served)},
                {"op": "drop"},
                {"op": "wait_file", "path": str(gate)},
                {"op": "serve", "until": str(served2)},
            ],
            timeout=60,
        )
        thread.join(10)
        assert "error" not in result, result.get("error")
        results = {r["id"]: r for r in fake.of("result")}
        assert len(fake.of("result")) == 8  # one answer per call id, a1 once
        assert results["a1"] == {"id": "a1", "result": {"on": True}}
        assert results["b1"] == {"id": "b1", "result": {"celsius": 27.6}}
        assert results["c1"] == {"id": "c1", "error": "OSError: sensor unplugged"}
        assert results["d1"]["error"] == "no tool nothere"
        assert results["e1"]["error"].startswith("stale call")
        assert results["f1"] == {"id": "f1", "result": "slept 600 ms"}
        assert results["g1"]["error"].startswith("expired")
        assert results["h1"]["error"].startswith("stale call")
        # what ran: set_led once (a1), never e1, g1 or h1
        assert recs[-1]["runs"] == ["set_led", "read_temp", "broken", "slow"]
        assert pins.splitlines() == ["pin LED 1"]
        print("heap", json.dumps({"start": start, "steps": [r["heap"] for r in recs]}))
    finally:
        fake.close()


def _lamp_online(broker: Broker, prefix: str, device: str, timeout: float = 15) -> None:
    fake = FakeBridge(broker, prefix, device, user="integrations")
    try:
        fake.wait("status", lambda v: v and v.get("online"), timeout)
    finally:
        fake.close()


def test_lamp_example_switched_by_a_second_vm_device_through_the_bridge(
    broker: Broker, start_bridge: Any, mock_llm: Any, tmp_path: Path
) -> None:
    lamp_id, switch_id = f"vmlamp{next(_ids)}", f"vmswitch{next(_ids)}"
    policy = {"devices": {switch_id: {"tools": [f"{lamp_id}/*"]}}}
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy))
    lamp_dir = tmp_path / "lamp"
    lamp_dir.mkdir()
    (lamp_dir / "config.json").write_text(json.dumps(mqtt_config(broker, lamp_id, proc.prefix)))
    pins = lamp_dir / "pins.log"
    lamp = vmkit.start_vm(
        vmkit.DEVICE_DIR / "examples" / "lamp" / "main.py",
        "config.json",
        cwd=lamp_dir,
        env=vmkit.vm_env(STUB_LOG=str(pins)),
    )
    try:
        _lamp_online(broker, proc.prefix, lamp_id)
        on = "[mock call=set_led(on:true)] Turn the lamp on"
        temp = "[mock call=read_temperature] How warm is it at the lamp?"
        _start, recs, _ = run_tool_job(
            tmp_path,
            mqtt_config(broker, switch_id, proc.prefix),
            [],
            [
                {"op": "ask", "prompt": on, "opts": {"use_tools": True}},
                {"op": "ask", "prompt": temp, "opts": {"use_tools": True}},
            ],
        )
        first, second = recs
        assert first["ok"], first
        assert first["text"] == "".join(reply_tokens(on, tool_result='{"on":true}'))
        assert first["tool_rounds"] == 1
        progress = first["progress"]
        assert progress[0]["tool_call"]["name"] == "set_led"
        assert progress[0]["tool_call"]["device"] == lamp_id
        assert progress[1]["tool_result"] == {"id": progress[0]["tool_call"]["id"], "ok": True}
        assert "pin LED 1" in pins.read_text()
        assert second["ok"] and second["text"] == "".join(
            reply_tokens(temp, tool_result='{"celsius":27.6}')
        )
        # the asking example program, as a wall switch with "use_tools": true
        off = "[mock call=set_led(on:false)] Lamp off, please"
        switch_dir = tmp_path / "switch"
        switch_dir.mkdir()
        (switch_dir / "config.json").write_text(json.dumps(mqtt_config(
            broker, switch_id, proc.prefix, use_tools=True, prompts=[off],
            gpio={"led": None, "button": None},
        )))  # fmt: skip
        run = vmkit.run_vm(vmkit.DEVICE_DIR / "main.py", cwd=switch_dir)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"[calling set_led on {lamp_id}]" in run.stdout
        assert "[done]" in run.stdout
        assert "".join(reply_tokens(off, tool_result='{"on":false}')) in run.stdout
        assert "pin LED 0" in pins.read_text()
    finally:
        lamp.send_signal(signal.SIGINT)
        try:
            out, err = lamp.communicate(timeout=10)
        except Exception:
            lamp.kill()
            out, err = lamp.communicate()
    assert "lamp on" in out, out + err
    assert "stopped" in out, out + err
    time.sleep(0.1)


def test_device_tool_topics_are_the_bridges(tmp_path: Path) -> None:
    from bridge.core.topics import Topics

    script = tmp_path / "topics.py"
    script.write_text(
        "import json\n"
        "from picollm.topics import Topics\n"
        "t = Topics('home/llm', 'lamp-1')\n"
        "print(json.dumps([n.decode() for n in "
        "(t.tools(), t.tools_ack(), t.presence(), t.call(), t.result())]))\n"
    )
    proc = vmkit.run_vm(script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    b = Topics("home/llm")
    assert json.loads(proc.stdout) == [
        b.tools("lamp-1"), b.tools_ack("lamp-1"), b.presence("lamp-1"), b.call("lamp-1"),
        b.result("lamp-1"),
    ]  # fmt: skip


def test_a_tool_device_comes_back_after_a_broker_restart_with_a_new_session(
    tmp_path: Path,
) -> None:
    own = Broker(tmp_path / "broker").start()  # restarted here: not the shared one
    try:
        device = "vmrestart"
        cfg = mqtt_config(own, device, "vmtools", connect_timeout_ms=1500)
        job = tmp_path / "job.json"
        steps = [{"op": "serve", "ms": 9000}]
        job.write_text(json.dumps({"config": cfg, "tools": ["set_led"], "steps": steps}))
        vm = vmkit.start_vm(vmkit.PROGRAMS_DIR / "tool_job.py", str(job), cwd=tmp_path)
        try:
            fake = FakeBridge(own, "vmtools", device)
            first = fake.wait("status", lambda v: v and v.get("online"))["session"]
            fake.close()
            own.restart()
            fake = FakeBridge(own, "vmtools", device)
            second = fake.wait(
                "status", lambda v: v and v.get("online") and v["session"] != first, 15
            )["session"]
            fake.call("r1", "set_led", second, on=True)
            assert fake.wait("result", lambda v: v["id"] == "r1") == {
                "id": "r1", "result": {"on": True}
            }  # fmt: skip
            fake.close()
        finally:
            vm.kill()
            vm.communicate()
    finally:
        own.stop()
