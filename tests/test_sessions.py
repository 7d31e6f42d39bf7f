"""Conversations kept by the bridge (`"session"`, protocol v2), end to end: real Mosquitto,
`python -m bridge run` processes, the mock LLM. What the bridge sent upstream is read from
the mock's record of the requests it received."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.dev.mock_llm import reply_tokens
from tests.harness import BridgeProcess, Device, Watcher


def _sent(mock: Any, marker: str) -> list[dict[str, Any]]:
    """The messages of the last upstream request whose last message holds `marker`."""
    for req in reversed(mock.requests):
        body = req.get("body")
        if isinstance(body, dict) and marker in str(body.get("messages", [])[-1:]):
            return list(body["messages"])
    raise AssertionError(f"no upstream request with {marker!r}")


def _said(prompt: str) -> str:
    return "".join(reply_tokens(prompt))


def _ask(dev: Device, rid: str, prompt: str, **fields: Any) -> dict[str, Any]:
    reply = dev.ask({"id": rid, "prompt": prompt, **fields})
    assert reply.terminal.get("done") is True, reply.terminal
    assert reply.text == _said(prompt)
    return reply.terminal


def test_a_session_continues_the_conversation_across_a_bridge_restart(
    start_bridge: Callable[..., BridgeProcess],
    make_device: Callable[..., Device],
    mock_llm: Any,
    tmp_path: Path,
) -> None:
    env = {"BRIDGE_DATA_DIR": str(tmp_path / "data"), "BRIDGE_TOPIC_PREFIX": "sess1",
           "BRIDGE_CLIENT_ID": "bridge-sess1"}  # fmt: skip
    proc = start_bridge(**env)
    dev = make_device("kitchen", prefix="sess1")
    terminal = _ask(dev, "a1", "alpha one", session="s1", system="Be brief.")
    assert "session" not in terminal  # the device reads nothing of it back
    # A request without the session is not part of it, and changes nothing in it.
    _ask(dev, "x1", "unrelated")
    assert _sent(mock_llm, "unrelated") == [{"role": "user", "content": "unrelated"}]
    _ask(dev, "a2", "bravo two", session="s1")
    assert _sent(mock_llm, "bravo two") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "alpha one"},
        {"role": "assistant", "content": _said("alpha one")},
        {"role": "user", "content": "bravo two"},
    ]

    proc.stop()  # at once: the turn just answered is stored before the bridge stops
    start_bridge(**env)
    _ask(dev, "a3", "charlie three", session="s1")
    sent = _sent(mock_llm, "charlie three")
    assert [m["content"] for m in sent] == [
        "Be brief.", "alpha one", _said("alpha one"), "bravo two", _said("bravo two"),
        "charlie three",
    ]  # fmt: skip


def test_session_trimmed_to_policy_turns_and_chars(
    start_bridge: Callable[..., BridgeProcess],
    make_device: Callable[..., Device],
    mock_llm: Any,
    tmp_path: Path,
) -> None:
    policy = {"devices": {"trim-turns": {"session_max_turns": 2},
                          "trim-chars": {"session_max_chars": 60}}}  # fmt: skip
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy), BRIDGE_DATA_DIR=str(tmp_path / "d"))
    turns = make_device("trim-turns", prefix=proc.prefix)
    for i in range(4):
        _ask(turns, f"t{i}", f"turn number {i}", session="s")
    _ask(turns, "t4", "turn number 4", session="s")
    users = [m["content"] for m in _sent(mock_llm, "turn number 4") if m["role"] == "user"]
    assert users == ["turn number 2", "turn number 3", "turn number 4"]

    # "You said: word N." is 17 characters, so a turn is 23 of them: 2 turns fit in 60.
    chars = make_device("trim-chars", prefix=proc.prefix)
    for i in range(3):
        _ask(chars, f"c{i}", f"word {i}", session="s")
    _ask(chars, "c3", "word 3", session="s")
    sent = _sent(mock_llm, "word 3")
    assert [m["content"] for m in sent if m["role"] == "user"] == ["word 1", "word 2", "word 3"]
    assert sum(len(m["content"]) for m in sent[:-1]) <= 60


def test_session_reset_starts_afresh_and_expired_sessions_are_gone(
    start_bridge: Callable[..., BridgeProcess],
    make_device: Callable[..., Device],
    mock_llm: Any,
    tmp_path: Path,
) -> None:
    policy = {"devices": {"brief": {"session_ttl_s": 1}}}
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy), BRIDGE_DATA_DIR=str(tmp_path / "d"))
    dev = make_device(prefix=proc.prefix)
    _ask(dev, "r1", "old topic", session="s", system="Old rules.")
    _ask(dev, "r2", "new topic", session="s", session_reset=True)
    assert _sent(mock_llm, "new topic") == [{"role": "user", "content": "new topic"}]
    _ask(dev, "r3", "follow up", session="s")
    assert [m["content"] for m in _sent(mock_llm, "follow up")] == [
        "new topic", _said("new topic"), "follow up",
    ]  # fmt: skip

    brief = make_device("brief", prefix=proc.prefix)
    _ask(brief, "b1", "soon forgotten", session="s")
    time.sleep(1.3)
    _ask(brief, "b2", "after the ttl", session="s")
    assert _sent(mock_llm, "after the ttl") == [{"role": "user", "content": "after the ttl"}]


def test_another_device_with_the_same_session_id_gets_a_fresh_conversation(
    start_bridge: Callable[..., BridgeProcess],
    make_device: Callable[..., Device],
    mock_llm: Any,
    tmp_path: Path,
) -> None:
    proc = start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "d"))
    owner = make_device(prefix=proc.prefix)
    thief = make_device(prefix=proc.prefix)
    _ask(owner, "o1", "my secret is 4711", session="shared")
    _ask(thief, "t1", "what was the secret", session="shared")
    sent = _sent(mock_llm, "what was the secret")
    assert sent == [{"role": "user", "content": "what was the secret"}]
    # The thief's turns did not enter the owner's conversation either.
    _ask(owner, "o2", "and again", session="shared")
    assert [m["content"] for m in _sent(mock_llm, "and again")] == [
        "my secret is 4711", _said("my secret is 4711"), "and again",
    ]  # fmt: skip


def test_failed_requests_leave_the_session_unchanged_and_bad_fields_are_refused(
    start_bridge: Callable[..., BridgeProcess],
    make_device: Callable[..., Device],
    mock_llm: Any,
    tmp_path: Path,
) -> None:
    proc = start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "d"), BRIDGE_UPSTREAM_RETRIES=0)
    dev = make_device(prefix=proc.prefix)
    _ask(dev, "f1", "kept turn", session="s")
    failed = dev.ask({"id": "f2", "prompt": "lost turn [mock status=400]", "session": "s"})
    assert failed.error_code == "upstream_status"
    _ask(dev, "f3", "next turn", session="s")
    assert [m["content"] for m in _sent(mock_llm, "next turn")] == [
        "kept turn", _said("kept turn"), "next turn",
    ]  # fmt: skip

    for rid, fields in (("b1", {"session": "no/slash"}), ("b2", {"session_reset": True}),
                        ("b3", {"session": "s", "session_reset": "yes"})):  # fmt: skip
        reply = dev.ask({"id": rid, "prompt": "hi", **fields})
        assert reply.error_code == "bad_request", reply.terminal


def test_tool_calls_and_results_are_kept_in_the_session(
    start_bridge: Callable[..., BridgeProcess],
    make_device: Callable[..., Device],
    mock_llm: Any,
    tmp_path: Path,
) -> None:
    """The model calls a device's tool; the device answers in the next request of the
    session with only the tool message: the bridge puts the call before it."""
    proc = start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "d"))
    dev = make_device(prefix=proc.prefix)
    tools = [{"type": "function", "function": {"name": "lamp", "parameters": {}}}]
    first = dev.ask({"id": "k1", "prompt": "please call tool lamp", "session": "s",
                     "tools": tools})  # fmt: skip
    calls = first.terminal["tool_calls"]
    assert calls and calls[0]["function"]["name"] == "lamp"
    result = {"role": "tool", "tool_call_id": calls[0]["id"], "content": "lamp is on"}
    second = dev.ask({"id": "k2", "messages": [result], "session": "s", "tools": tools})
    assert second.text == "Tool said: lamp is on"
    sent = _sent(mock_llm, "lamp is on")
    assert sent[0] == {"role": "user", "content": "please call tool lamp"}
    assert sent[1]["role"] == "assistant" and sent[1]["tool_calls"] == calls
    assert sent[2] == result
    _ask(dev, "k3", "thanks", session="s", tools=tools)
    assert [m["role"] for m in _sent(mock_llm, "thanks")] == [
        "user", "assistant", "tool", "assistant", "user",
    ]  # fmt: skip


def test_home_assistant_ask_box_keeps_a_session_per_device(
    start_bridge: Callable[..., BridgeProcess],
    broker: Any,
    mock_llm: Any,
    tmp_path: Path,
) -> None:
    """Plain text on `P/D/ask` (HA's text entity) continues D's session "ha"; another
    device's ask box has its own."""
    proc = start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "d"))
    # One automation login: the broker makes the user name the client id.
    ha = Watcher(broker, [f"{proc.prefix}/hall/res/+", f"{proc.prefix}/porch/res/+"],
                 user="automation")  # fmt: skip
    try:
        for name, text in (("hall", "my name is Ada"), ("porch", "porch question"),
                           ("hall", "what is my name")):  # fmt: skip
            seen = len(ha.msgs)
            ha.publish(f"{proc.prefix}/{name}/ask", text)
            done = ha.wait_for(
                lambda m, n=name, k=seen: (
                    ha.msgs.index(m) >= k
                    and m.topic.startswith(f"{proc.prefix}/{n}/res/ha-")
                    and "done" in m.json
                )
            )
            rid = done.topic.rsplit("/", 1)[1]
            said = "".join(m.json.get("delta", "") for m in ha.msgs if m.topic.endswith("/" + rid))
            assert said == _said(text)
    finally:
        ha.close()
    assert [m["content"] for m in _sent(mock_llm, "what is my name")] == [
        "my name is Ada", _said("my name is Ada"), "what is my name",
    ]  # fmt: skip
    assert _sent(mock_llm, "porch question") == [{"role": "user", "content": "porch question"}]


def test_llm_bridge_chat_continues_a_session(
    bridge: BridgeProcess, broker: Any, mock_llm: Any
) -> None:
    """`llm-bridge chat --session S` asks within S; `--new-session` starts it afresh."""
    from tests.test_cli import llm_bridge

    broker.add_user("clisess")
    url = broker.url("clisess")
    base = ("--device", "clisess", "--mqtt-url", url, "--session", "talk")
    for prompt, extra in (("cli first", ()), ("cli second", ()), ("cli fresh", ("--new-session",))):
        done = llm_bridge("chat", prompt, *base, *extra)
        assert done.returncode == 0 and done.stdout.strip() == _said(prompt), done.stderr
    assert [m["content"] for m in _sent(mock_llm, "cli second")] == [
        "cli first", _said("cli first"), "cli second",
    ]  # fmt: skip
    assert [m["content"] for m in _sent(mock_llm, "cli fresh")] == ["cli fresh"]
