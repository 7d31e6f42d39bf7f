"""MQTT mode end to end on the MicroPython VM.

device VM (picollm + umqtt.simple) -> Mosquitto (the project's broker config
and ACL) -> the bridge process -> the mock LLM, and back. Uses the
``broker``, ``mock_llm`` and ``bridge`` fixtures of ``tests/conftest.py``.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.dev.mock_llm import REFUSAL_TEXT, reply_tokens
from bench.procs import TcpProxy
from tests.device import vmkit
from tests.harness import BridgeProcess, Broker, Device, bridge_env, wait_for_status

_ids = itertools.count()


def _text(prompt: str, tokens: int | None = None) -> str:
    return "".join(reply_tokens(prompt, tokens))


def tokens_for(size: int, prompt: str) -> int:
    """The smallest token count whose mock reply is at least `size` characters."""
    n = 10
    while len(_text(prompt, n)) < size:
        n += 10
    return n


@pytest.fixture
def device_config(broker: Broker, bridge: Any) -> dict[str, Any]:
    """An MQTT-mode config for a new device (its own broker user), with the bridge up."""
    device_id = f"vm{next(_ids)}"
    password = broker.add_user(device_id)
    return {
        "mode": "mqtt",
        "device_id": device_id,
        "prefix": broker.prefix,
        "broker": {
            "host": "127.0.0.1",
            "port": broker.port,
            "user": device_id,
            "password": password,
            "keepalive": 30,
        },
        "reply_timeout_ms": 8000,
        "history": 0,
    }


@pytest.fixture
def observer(broker: Broker, device_config: dict[str, Any]) -> Iterator[Device]:
    """A client that records every reply message of the device (as a read-only user: a
    second login as the device would replace the device's connection)."""
    d = Device(broker, device_config["device_id"], user="integrations-watch")
    yield d
    d.close()


def test_normal_reply_stream_ask_and_history(
    device_config: dict[str, Any], observer: Device, mock_llm: Any, tmp_path: Path
) -> None:
    device_config.update(history=2, system="Answer briefly.")
    recs = vmkit.run_job(
        tmp_path,
        device_config,
        [
            {"op": "stream", "prompt": "Why is the sky blue?"},
            {"op": "ask", "prompt": "And at night? [mock tokens=15]"},
            {"op": "stream", "prompt": "No [mock refusal=1]"},
        ],
    )
    first, second, third = recs
    assert first["ok"], first
    assert first["text"] == _text("Why is the sky blue?")
    assert first["pieces"] == len(reply_tokens("Why is the sky blue?"))
    assert first["finish_reason"] == "stop"
    assert first["model"] == "mock-1"
    assert first["usage"]["completion_tokens"] == first["pieces"]
    assert second["ok"] and second["text"] == _text("And at night?", 15)
    assert third["refusal"] is True and third["text"] == REFUSAL_TEXT
    # request ids: random, unique, valid; the bridge saw them in order
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == 3 and all(len(i) == 16 for i in ids)
    for rid in ids:
        observer.wait(rid)  # seq 0.. with no gap and one terminal
    # the second request carried the system prompt and the first turn
    bodies = [
        r["body"]
        for r in mock_llm.requests
        if r["path"].endswith("/chat/completions")
        and isinstance(r.get("body"), dict)
        and r["body"]["messages"][-1]["content"] == "And at night? [mock tokens=15]"
    ]
    assert bodies, "the bridge did not forward the second question"
    assert [m["role"] for m in bodies[-1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert bodies[-1]["messages"][0]["content"] == "Answer briefly."
    assert bodies[-1]["messages"][2]["content"] == _text("Why is the sky blue?")


def test_multi_byte_prompts_and_history_arrive_whole(
    device_config: dict[str, Any], observer: Device, mock_llm: Any, tmp_path: Path
) -> None:
    # umqtt.simple sizes a packet with len(): a str payload with "é", CJK or an
    # emoji would be announced shorter than its UTF-8 bytes, cut by the broker,
    # and its tail read as the next packet. Every prompt here holds more bytes
    # than characters; the history carries multi-byte replies into later requests.
    device_config.update(history=3, system="Réponds en une phrase. 簡潔に")
    prompts = [
        "Pourquoi le ciel est-il bleu, café crème? é",
        "日本語で答えて 🎉",
        "naïve ✓ " + "é" * 150,  # past 127 bytes: the length takes two bytes
        "plain ASCII after them",
    ]
    recs = vmkit.run_job(tmp_path, device_config, [{"op": "ask", "prompt": p} for p in prompts])
    for prompt, rec in zip(prompts, recs, strict=True):
        assert rec["ok"], rec
        assert rec["text"] == _text(prompt), rec
        assert rec["connects"] == 1, rec  # the stream never broke
    for rec in recs:
        assert observer.wait(rec["id"]).terminal.get("done") is True
    # the bridge forwarded the system prompt and the history, every character intact
    bodies = [
        r["body"]
        for r in mock_llm.requests
        if r["path"].endswith("/chat/completions")
        and isinstance(r.get("body"), dict)
        and r["body"]["messages"][-1]["content"] == prompts[-1]
    ]
    assert bodies, "the bridge did not forward the last question"
    msgs = bodies[-1]["messages"]
    assert msgs[0] == {"role": "system", "content": "Réponds en une phrase. 簡潔に"}
    contents = [m["content"] for m in msgs[1:]]
    assert contents == [
        prompts[0], _text(prompts[0]), prompts[1], _text(prompts[1]), prompts[2],
        _text(prompts[2]), prompts[3],
    ]  # fmt: skip


def test_multi_byte_password_connects(broker: Broker, bridge: Any, tmp_path: Path) -> None:
    device_id = f"vm{next(_ids)}"
    password = broker.add_user(device_id, "pässwörd-日本-🔑")
    config = {
        "mode": "mqtt",
        "device_id": device_id,
        "prefix": broker.prefix,
        "broker": {"host": "127.0.0.1", "port": broker.port, "user": device_id,
                   "password": password},
        "reply_timeout_ms": 8000,
        "history": 0,
    }  # fmt: skip
    (rec,) = vmkit.run_job(tmp_path, config, [{"op": "ask", "prompt": "Grüße"}])
    assert rec["ok"] and rec["text"] == _text("Grüße"), rec


def test_long_reply_heap_stays_bounded(device_config: dict[str, Any], tmp_path: Path) -> None:
    p4 = "four kilobytes"
    p16 = "sixteen kilobytes"
    n4, n16 = tokens_for(4096, p4), tokens_for(16384, p16)
    recs = vmkit.run_job(
        tmp_path,
        device_config,
        [
            {"op": "ask", "prompt": "warm up"},
            {"op": "stream", "prompt": f"{p4} [mock tokens={n4}]", "measure": True,
             "keep_text": False},
            {"op": "stream", "prompt": f"{p16} [mock tokens={n16}]", "measure": True,
             "keep_text": False},
        ],
        timeout=60,
    )  # fmt: skip
    _, small, big = recs
    assert small["ok"] and big["ok"]
    assert small["sha256"] == vmkit.sha256_text(_text(p4, n4))
    assert big["sha256"] == vmkit.sha256_text(_text(p16, n16))
    assert big["length"] >= 4 * small["length"] - 100
    grow_small = small["heap_peak"] - small["heap_base"]
    grow_big = big["heap_peak"] - big["heap_base"]
    # one chunk at a time: the peak does not follow the reply's length
    assert grow_small < 8 * 1024, small
    assert grow_big < grow_small + 1024, (small, big)


def test_long_reply_streams_in_a_heap_smaller_than_it(
    device_config: dict[str, Any], tmp_path: Path
) -> None:
    # The library compiled with mpy-cross, a 32 KB reply, a 48 KB heap of which
    # about 33 KB are live before the request: the reply cannot be held whole.
    mpy = vmkit.compile_mpy(tmp_path / "mpy")
    prompt = "thirty-two kilobytes"
    n = tokens_for(32768, prompt)
    (rec,) = vmkit.run_job(
        tmp_path,
        device_config,
        [{"op": "stream", "prompt": f"{prompt} [mock tokens={n}]", "keep_text": False}],
        heapsize="48K",
        env=vmkit.mpy_env(mpy),
        timeout=60,
    )
    assert rec["ok"], rec
    assert rec["length"] >= 32768
    assert rec["sha256"] == vmkit.sha256_text(_text(prompt, n))


def test_error_terminal_raises(device_config: dict[str, Any], tmp_path: Path) -> None:
    recs = vmkit.run_job(
        tmp_path,
        device_config,
        [
            {"op": "stream", "prompt": "x [mock status=400]"},
            {"op": "ask", "prompt": "x [mock tokens=30 error_event_at=4]"},
            {"op": "ask", "prompt": "still working?"},
        ],
    )
    status, midway, after = recs
    assert status["ok"] is False and status["error"] == "LLMError"
    assert status["code"] == "upstream_status" and status["status"] == 400
    assert midway["ok"] is False and midway["code"] == "upstream_error"
    assert after["ok"] and after["text"] == _text("still working?")


def test_timeout_when_nothing_arrives(
    device_config: dict[str, Any], observer: Device, tmp_path: Path
) -> None:
    device_config["reply_timeout_ms"] = 1000
    start = time.monotonic()
    (rec,) = vmkit.run_job(tmp_path, device_config, [{"op": "stream", "prompt": "x [mock hang=1]"}])
    elapsed = time.monotonic() - start
    assert rec["ok"] is False and rec["error"] == "LLMTimeout" and rec["code"] == "timeout"
    assert elapsed < 6
    # the device told the bridge to stop: the request ends as cancelled
    rid, reply = observer.wait_any(timeout=5)
    assert rid == rec["id"]
    assert reply.error_code == "cancelled"


def test_explicit_cancel(device_config: dict[str, Any], observer: Device, tmp_path: Path) -> None:
    (rec,) = vmkit.run_job(
        tmp_path,
        device_config,
        [{"op": "stream", "prompt": "x [mock tokens=500 delay_ms=20]", "cancel_after": 3}],
    )
    assert rec["cancelled"] is True  # the bridge confirmed with a `cancelled` terminal
    assert rec["pieces"] == 3
    _rid, reply = observer.wait_any(timeout=5)
    assert reply.error_code == "cancelled"
    assert len(reply.text.split()) < 500


def test_keyboard_interrupt_cancels(
    device_config: dict[str, Any], observer: Device, tmp_path: Path
) -> None:
    job = tmp_path / "job.json"
    steps = [{"op": "stream", "prompt": "x [mock tokens=500 delay_ms=20]", "mark": True}]
    job.write_text(json.dumps({"config": device_config, "steps": steps}))
    proc = vmkit.start_vm(vmkit.PROGRAMS_DIR / "chat_job.py", str(job), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PIECE"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "INTERRUPTED" in out, out + err
    _rid, reply = observer.wait_any(timeout=5)
    assert reply.error_code == "cancelled"


def test_broker_connection_dropped_mid_reply(
    device_config: dict[str, Any], observer: Device, tmp_path: Path
) -> None:
    proxy = TcpProxy(device_config["broker"]["port"])
    device_config["broker"]["port"] = proxy.port
    prompt = "keep going"
    job = tmp_path / "job.json"
    steps = [{"op": "stream", "prompt": f"{prompt} [mock tokens=60 delay_ms=25]", "mark": True}]
    job.write_text(json.dumps({"config": device_config, "steps": steps}))
    proc = vmkit.start_vm(vmkit.PROGRAMS_DIR / "chat_job.py", str(job), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PIECE"
        proxy.drop()  # the socket dies mid-reply
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    (rec,) = vmkit.parse_records(out)
    assert rec["ok"], out + err
    assert rec["text"] == _text(prompt, 60)  # nothing lost, nothing twice
    assert rec["connects"] >= 2
    assert proxy.accepted >= 2


def test_keepalive_pings_and_reconnect_after_idle(
    device_config: dict[str, Any], tmp_path: Path
) -> None:
    proxy = TcpProxy(device_config["broker"]["port"])
    device_config["broker"].update(port=proxy.port, keepalive=1)
    steps = [
        # 2 s of silence between two chunks: the device pings every 0.5 s
        {"op": "stream", "prompt": "slow [mock tokens=2 delay_ms=1000]"},
        {"op": "sleep", "ms": 1000},  # the test cuts the idle connection meanwhile
        {"op": "ask", "prompt": "after a nap"},
    ]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": device_config, "steps": steps}))
    proc = vmkit.start_vm(vmkit.PROGRAMS_DIR / "chat_job.py", str(job), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        pings = proxy.sent.count(b"\xc0\x00")  # PINGREQ
        proxy.drop()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    slow, _, after = vmkit.parse_records(first + out)
    assert slow["ok"] and slow["text"] == _text("slow", 2), slow
    assert pings >= 2, pings
    assert slow["connects"] == 1
    assert after["ok"] and after["text"] == _text("after a nap"), out + err
    assert after["connects"] == 2  # the request found the socket dead and reconnected


def test_client_id_is_the_device_id(
    device_config: dict[str, Any], broker: Broker, tmp_path: Path
) -> None:
    # No broker.client_id in the config: the client id is the device id, which is
    # also its user name, so a broker with use_username_as_clientid sees no change.
    assert "client_id" not in device_config["broker"]
    dev = device_config["device_id"]
    (rec,) = vmkit.run_job(tmp_path, device_config, [{"op": "ask", "prompt": "who am I"}])
    assert rec["ok"], rec
    log = broker.log_file.read_text()
    assert f" as {dev} (" in log and f"u'{dev}')" in log, log[-2000:]


@pytest.fixture(scope="module")
def username_broker(tmp_path_factory: pytest.TempPathFactory, mock_llm: Any) -> Iterator[Broker]:
    """The project's broker with `use_username_as_clientid true`, and a bridge on it."""
    from tests import harness

    plain = harness.render_config

    def render(**kw: Any) -> str:
        text = plain(**kw)
        if "use_username_as_clientid true" in text:  # broker/ has it already
            return text
        # a listener's own option in Mosquitto 2: one line in each listener block
        return re.sub(r"(?m)^(listener .*)$", r"\1\nuse_username_as_clientid true", text)

    b = Broker(tmp_path_factory.mktemp("username-broker"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "render_config", render)
        b.start()
    assert "use_username_as_clientid true" in (b.dir / "mosquitto.conf").read_text()
    bridge = BridgeProcess(
        tmp_path_factory.mktemp("username-bridge"), bridge_env(b, mock_llm.base_url)
    ).start()
    try:
        wait_for_status(b, b.prefix, "online")
        yield b
    finally:
        bridge.stop()
        b.stop()


def test_device_keeps_its_session_when_the_broker_names_clients_by_user(
    username_broker: Broker, tmp_path: Path
) -> None:
    # The broker takes the user name as client id; the device's persistent session
    # is found again after the socket dies mid-reply: nothing lost, nothing twice.
    dev = f"vm{next(_ids)}"
    password = username_broker.add_user(dev)
    proxy = TcpProxy(username_broker.port)
    config = {
        "mode": "mqtt",
        "device_id": dev,
        "prefix": username_broker.prefix,
        "broker": {"host": "127.0.0.1", "port": proxy.port, "user": dev, "password": password,
                   "keepalive": 30},
        "reply_timeout_ms": 8000,
        "history": 0,
    }  # fmt: skip
    prompt = "by user name"
    job = tmp_path / "job.json"
    steps = [{"op": "stream", "prompt": f"{prompt} [mock tokens=60 delay_ms=25]", "mark": True}]
    job.write_text(json.dumps({"config": config, "steps": steps}))
    proc = vmkit.start_vm(vmkit.PROGRAMS_DIR / "chat_job.py", str(job), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PIECE"
        proxy.drop()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    (rec,) = vmkit.parse_records(out)
    assert rec["ok"], out + err
    assert rec["text"] == _text(prompt, 60)
    assert rec["connects"] >= 2
    log = username_broker.log_file.read_text()
    assert f" as {dev} (" in log and "Client " + dev + " already connected" not in log
    # the option is on: the bridge is named by its user too
    assert re.search(r" as (bridge[\w-]*) \(p\d, c\d, k\d+, u'\1'\)", log), log[-2000:]


def test_main_program_in_mqtt_mode(device_config: dict[str, Any], tmp_path: Path) -> None:
    device_config.update(
        prompts=["Why is the sky blue?", "Is it?"],
        wifi={"ssid": "home", "password": "wifi-secret"},
        gpio={"led": "LED", "button": None},
    )
    (tmp_path / "config.json").write_text(json.dumps(device_config))
    log = tmp_path / "stub.log"
    proc = vmkit.run_vm(
        vmkit.DEVICE_DIR / "main.py", cwd=tmp_path, env=vmkit.vm_env(STUB_LOG=str(log))
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _text("Why is the sky blue?") in proc.stdout
    assert _text("Is it?") in proc.stdout
    assert "[stop," in proc.stdout
    events = log.read_text().splitlines()
    assert "wlan connect home" in events
    assert events.count("pin LED 1") == 2 and events.count("pin LED 0") == 2
    assert "wifi-secret" not in proc.stdout + log.read_text()
    assert device_config["broker"]["password"] not in proc.stdout


def test_main_program_button_and_no_hardware(device_config: dict[str, Any], tmp_path: Path) -> None:
    device_config.update(prompts=["first", "second"], gpio={"led": "LED", "button": 14})
    (tmp_path / "config.json").write_text(json.dumps(device_config))
    log = tmp_path / "stub.log"
    proc = vmkit.run_vm(
        vmkit.DEVICE_DIR / "main.py",
        cwd=tmp_path,
        env=vmkit.vm_env(STUB_LOG=str(log), STUB_PRESSES="2"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "press the button" in proc.stdout
    assert _text("first") in proc.stdout and _text("second") in proc.stdout
    assert proc.stdout.rstrip().endswith("stopped")  # Ctrl-C after the presses
    assert log.read_text().count("pin 14 pressed") == 2
    # no GPIO at all: falls back to asking once
    proc = vmkit.run_vm(
        vmkit.DEVICE_DIR / "main.py", cwd=tmp_path, env=vmkit.vm_env(STUB_NO_PINS="1")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPIO" in proc.stdout
    assert _text("first") in proc.stdout and _text("second") in proc.stdout


def test_seq_handling_unit(tmp_path: Path) -> None:
    """MQTTReply alone, with a stand-in transport: duplicates, gaps, errors, silence."""
    proc = vmkit.run_vm(vmkit.PROGRAMS_DIR / "seq_unit.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = {
        line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2])
        for line in proc.stdout.splitlines()
        if line.startswith("R ")
    }
    req, cancel = "llm/dev/req", "llm/dev/cancel"
    assert r["duplicates"] == {"pieces": ["a", "b"], "finish_reason": "stop", "published": [req]}
    assert r["gap"]["pieces"] == ["a"] and r["gap"]["error"] == "protocol"
    assert "seq 2 after 0" in r["gap"]["message"]
    assert r["no_seq"]["error"] == "protocol"
    assert r["error"]["error"] == "upstream_status" and r["error"]["pieces"] == ["a"]
    assert r["silence"]["error"] == "timeout" and r["silence"]["published"] == [req, cancel]
    assert r["whole_text"]["pieces"] == ["all of it"]


def test_interrupted_terminal_after_a_gap_ends_the_reply_as_interrupted(tmp_path: Path) -> None:
    """docs/protocol.md, Delivery: a device accepts an `interrupted` terminal after a gap
    (chunks lost in a crashed bridge's memory); every other gap stays a protocol error."""
    proc = vmkit.run_vm(vmkit.PROGRAMS_DIR / "seq_unit.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = {
        line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2])
        for line in proc.stdout.splitlines()
        if line.startswith("R ")
    }
    req = "llm/dev/req"
    assert r["gap_interrupted"] == {
        "pieces": ["a"], "error": "interrupted", "message": "the bridge restarted",
        "published": [req],
    }  # fmt: skip
    assert (
        r["interrupted_first"]["pieces"] == [] and r["interrupted_first"]["error"] == "interrupted"
    )
    assert r["interrupted_in_order"]["error"] == "interrupted"
    assert r["interrupted_by_peer"]["error"] == "interrupted"  # seq 4294967295
    assert r["interrupted_by_peer"]["pieces"] == ["a"]
    assert r["interrupted_in_order"]["pieces"] == ["a"]
    for case in ("gap_other_error", "gap_done", "gap_interrupted_not_terminal"):
        assert r[case]["error"] == "protocol", (case, r[case])
        assert r[case]["pieces"] == ["a"], (case, r[case])
        assert "seq 2 after 0" in r[case]["message"], (case, r[case])
