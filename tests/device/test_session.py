"""The device library's Chat in MQTT mode keeps its conversation in a bridge session
(protocol v2), on the MicroPython VM: each request carries only the new question, the
bridge puts the earlier turns before it, `reset()` starts afresh, and a fixed session id
continues the conversation after a reboot."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from bridge.dev.mock_llm import reply_tokens
from tests.device import vmkit
from tests.harness import Broker, Device

_ids = itertools.count()


def _said(prompt: str) -> str:
    return "".join(reply_tokens(prompt))


def _sent(mock: Any, question: str) -> list[str]:
    """The contents of the messages the bridge sent upstream with `question` last."""
    for req in reversed(mock.requests):
        body = req.get("body")
        if isinstance(body, dict) and body["messages"][-1]["content"] == question:
            return [m["content"] for m in body["messages"]]
    raise AssertionError(f"no upstream request ending with {question!r}")


def _config(broker: Broker, **extra: Any) -> dict[str, Any]:
    device_id = f"vs{next(_ids)}"
    return {
        "mode": "mqtt", "device_id": device_id, "prefix": broker.prefix,
        "broker": {"host": "127.0.0.1", "port": broker.port, "user": device_id,
                   "password": broker.add_user(device_id), "keepalive": 30},
        "reply_timeout_ms": 8000, "history": 4, **extra,
    }  # fmt: skip


def test_chat_uses_a_bridge_session_and_keeps_no_history(
    broker: Broker, bridge: Any, mock_llm: Any, tmp_path: Path
) -> None:
    config = _config(broker, system="Be brief.")
    watch = Device(broker, config["device_id"], user="integrations", subscribe=False)
    try:
        watch.client.subscribe(f"{broker.prefix}/{config['device_id']}/req", qos=1)
        recs = vmkit.run_job(
            tmp_path, config,
            [{"op": "ask", "prompt": "my name is Ada"}, {"op": "stream", "prompt": "who am I"},
             {"op": "reset"}, {"op": "ask", "prompt": "fresh start"},
             {"op": "ask", "prompt": "and then"}],
        )  # fmt: skip
        assert all(r["ok"] for r in recs), recs
        assert recs[1]["text"] == _said("who am I")
        session = recs[0]["session"]
        assert len(session) == 16 and {r["session"] for r in recs} == {session}
        assert all(r["history"] == 0 for r in recs if "history" in r)  # nothing on the heap
        assert _sent(mock_llm, "who am I") == [
            "Be brief.", "my name is Ada", _said("my name is Ada"), "who am I",
        ]  # fmt: skip
        assert _sent(mock_llm, "fresh start") == ["Be brief.", "fresh start"]
        assert _sent(mock_llm, "and then") == [
            "Be brief.", "fresh start", _said("fresh start"), "and then",
        ]  # fmt: skip
        requests = [json.loads(p) for _t, p in watch.raw]
        assert [r["prompt"] for r in requests] == [
            "my name is Ada", "who am I", "fresh start", "and then",
        ]  # fmt: skip
        assert all("messages" not in r and r["session"] == session for r in requests)
        assert [r.get("session_reset", False) for r in requests] == [False, False, True, False]
    finally:
        watch.close()


def test_a_fixed_session_id_continues_after_a_reboot_and_false_keeps_history_on_the_device(
    broker: Broker, bridge: Any, mock_llm: Any, tmp_path: Path
) -> None:
    config = _config(broker, session="kitchen-talk")
    (first,) = vmkit.run_job(tmp_path, config, [{"op": "ask", "prompt": "before reboot"}])
    (second,) = vmkit.run_job(tmp_path, config, [{"op": "ask", "prompt": "after reboot"}])
    assert first["session"] == second["session"] == "kitchen-talk"
    assert _sent(mock_llm, "after reboot") == [
        "before reboot", _said("before reboot"), "after reboot",
    ]  # fmt: skip

    own = _config(broker, session=False)
    recs = vmkit.run_job(tmp_path, own, [{"op": "ask", "prompt": "own one"},
                                         {"op": "ask", "prompt": "own two"}])  # fmt: skip
    assert recs[1]["session"] is None and recs[1]["history"] == 4
    assert _sent(mock_llm, "own two") == ["own one", _said("own one"), "own two"]
