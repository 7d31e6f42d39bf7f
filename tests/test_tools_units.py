"""Unit tests of the tools' pure parts: cards, names, grants, the call broker, bridge tools."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from bridge.plugins import toolcards as tc
from bridge.plugins.pytools import (
    PyToolRunner,
    ToolLoadError,
    load_tool,
    make_tool,
    parse_docstring,
)
from bridge.plugins.toolcalls import CallBroker, Outcome, call_message, parse_result
from tests.tooltargets import broken, get_weather, slow


def card(*tools: dict[str, Any]) -> bytes:
    return json.dumps({"tools": list(tools)}).encode()


LED = {
    "name": "set_led",
    "description": "Turn the LED on or off",
    "parameters": {
        "type": "object",
        "properties": {"on": {"type": "boolean"}},
        "required": ["on"],
    },
}


# --------------------------------------------------------------------------- cards


def test_a_good_card_gives_specs_with_defaults() -> None:
    specs = tc.parse_card("lamp", card(LED, {"name": "read_temp", "timeout_ms": 800}))
    assert [s.ref for s in specs] == ["lamp/set_led", "lamp/read_temp"]
    assert specs[0].timeout_ms == tc.DEFAULT_TIMEOUT_MS
    assert specs[1].parameters == {"type": "object", "properties": {}}
    assert specs[1].timeout_ms == 800


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (b"\xff", "not valid UTF-8"),
        (b"[1]", "must be a JSON object"),
        (b'{"tools": 1}', "tools: must be a list"),
        (b'{"tools": [], "x": 1}', "x: unknown field"),
        (card({"name": "bad name"}), "tools[0].name"),
        (card({"name": "a" * 65}), "tools[0].name"),
        (card(LED, LED), "tools[1].name: set_led is declared twice"),
        (card({"name": "t", "colour": 1}), "tools[0].colour: unknown field"),
        (card({"name": "t", "description": 3}), "tools[0].description"),
        (card({"name": "t", "description": "x" * 1025}), "longer than 1024"),
        (card({"name": "t", "parameters": []}), "tools[0].parameters: must be a JSON Schema"),
        (card({"name": "t", "parameters": {"type": "string"}}), '"type": "object"'),
        (card({"name": "t", "timeout_ms": 10}), "tools[0].timeout_ms"),
        (card({"name": "t", "timeout_ms": True}), "tools[0].timeout_ms"),
        (card(*({"name": f"t{i}"} for i in range(33))), "more than 32"),
        (b'{"tools": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "nested too deeply"),
        (b'{"tools": [{"name": "t", "timeout_ms": NaN}]}', "not valid JSON"),
    ],
)
def test_a_bad_card_is_refused_saying_where(payload: bytes, where: str) -> None:
    with pytest.raises(tc.CardError) as info:
        tc.parse_card("lamp", payload)
    assert where in str(info.value)


def test_a_card_too_large_or_too_deep_is_refused() -> None:
    big = card(*({"name": f"t{i}", "description": "x" * 1000} for i in range(20)))
    with pytest.raises(tc.CardError, match="more than 16384"):
        tc.parse_card("lamp", big)
    deep: dict[str, Any] = {"type": "object"}
    node = deep
    for _ in range(10):
        node["properties"] = {"a": {"type": "object"}}
        node = node["properties"]["a"]
    with pytest.raises(tc.CardError, match="nested deeper than 8"):
        tc.parse_card("lamp", card({"name": "t", "parameters": deep}))


def test_a_bad_card_withdraws_the_device_s_earlier_card_only() -> None:
    reg = tc.Registry()
    reg.set_card("lamp", card(LED))
    reg.set_card("fan", card({"name": "spin"}))
    with pytest.raises(tc.CardError):
        reg.set_card("lamp", b"{")
    assert "lamp" not in reg.cards
    assert [s.name for s in reg.cards["fan"]] == ["spin"]
    reg.set_card("fan", b"")
    assert reg.cards == {}


def test_status_sessions() -> None:
    reg = tc.Registry()
    assert reg.session("lamp") is None
    reg.set_status("lamp", b'{"online": true, "session": "s1"}')
    assert reg.session("lamp") == "s1"
    reg.set_status("lamp", b'{"online": false}')
    assert reg.session("lamp") is None
    with pytest.raises(tc.CardError):
        reg.set_status("lamp", b'{"online": true, "session": "no spaces"}')
    assert reg.session("lamp") is None
    with pytest.raises(tc.CardError, match="more than 256"):
        reg.set_status("lamp", b'{"online": true, "session": "s1", "x": "' + b"y" * 300 + b'"}')


# --------------------------------------------------------------------------- names and grants


def test_the_model_sees_each_tool_once_under_a_unique_valid_name() -> None:
    reg = tc.Registry()
    reg.set_card("switch", card({"name": "set_led"}, {"name": "beep"}))
    reg.set_card("lamp", card(LED, {"name": "read_temp"}))
    reg.set_card("x" * 64, card({"name": "y" * 64}))
    weather = tc.ToolSpec("bridge", "set_led", "", {"type": "object"})
    grants = ["lamp/set_led", "bridge/*", f"{'x' * 64}/*", "fan/*"]
    tools = reg.tools_for("switch", grants, [weather])
    names = list(tools.by_name)
    assert names[:2] == ["set_led", "beep"]  # its own first, as declared
    assert tools.by_name["set_led"].owner == "switch"
    assert tools.by_name["lamp__set_led"].ref == "lamp/set_led"
    assert "lamp__read_temp" not in names  # not granted
    assert len(names) == len(set(names)) == 5
    assert all(tc.NAME_RE.match(n) for n in names)
    renamed = [n for n, s in tools.by_name.items() if s.owner in ("bridge", "x" * 64)]
    assert len(renamed) == 2 and all(len(n) <= 64 for n in renamed)
    # stable from one request to the next
    assert list(reg.tools_for("switch", grants, [weather]).by_name) == names
    defs = tools.definitions()
    assert defs[0] == {
        "type": "function",
        "function": {"name": "set_led", "description": "", "parameters": tc.parse_card(
            "switch", card({"name": "set_led"}))[0].parameters},
    }  # fmt: skip


def test_no_grant_no_foreign_tools() -> None:
    reg = tc.Registry()
    reg.set_card("lamp", card(LED))
    assert not reg.tools_for("switch", [], [])
    assert reg.tools_for("switch", ["lamp/read_temp"], []).by_name == {}
    assert tc.valid_grant("lamp/*") and tc.valid_grant("bridge/get_time")
    assert not tc.valid_grant("lamp") and not tc.valid_grant("lamp/a b")
    assert not tc.valid_grant("+/*")


# --------------------------------------------------------------------------- call broker


SPEC = tc.ToolSpec("lamp", "set_led", "", {"type": "object"}, timeout_ms=300)


async def _call(broker: CallBroker, sent: list[bytes], call_id: str = "c1") -> Outcome:
    return await broker.call(call_id, SPEC, {"on": True}, "s1", lambda p, _e: sent.append(p))


def test_result_accepted_once_and_only_from_the_owner() -> None:
    async def main() -> None:
        broker = CallBroker()
        sent: list[bytes] = []
        task = asyncio.create_task(_call(broker, sent))
        await asyncio.sleep(0)
        assert json.loads(sent[0]) == {
            "id": "c1", "name": "set_led", "arguments": {"on": True},
            "session": "s1", "timeout_ms": 300,
        }  # fmt: skip
        assert not broker.on_result("switch", b'{"id":"c1","result":"forged"}')
        assert broker.on_result("lamp", b'{"id":"c1","result":{"on":true}}')
        assert not broker.on_result("lamp", b'{"id":"c1","result":"again"}')
        outcome = await task
        assert outcome == Outcome(True, '{"on":true}')
        assert broker.pending == {} and broker.per_owner == {}

    asyncio.run(main())


def test_an_unanswered_call_times_out_and_a_late_result_is_ignored() -> None:
    async def main() -> None:
        broker = CallBroker()
        start = time.monotonic()
        outcome = await _call(broker, [])
        assert 0.25 < time.monotonic() - start < 1
        assert not outcome.ok and "did not answer within 300 ms" in outcome.content
        assert not broker.on_result("lamp", b'{"id":"c1","result":1}')

    asyncio.run(main())


def test_a_cancelled_call_is_abandoned() -> None:
    async def main() -> None:
        broker = CallBroker()
        task = asyncio.create_task(_call(broker, []))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert broker.pending == {}

    asyncio.run(main())


def test_calls_per_device_are_bounded() -> None:
    async def main() -> None:
        broker = CallBroker(max_per_owner=2)
        tasks = [asyncio.create_task(_call(broker, [], f"c{i}")) for i in range(3)]
        done = await asyncio.wait_for(tasks[2], 1)
        assert not done.ok and "too many tool calls" in done.content
        for t in tasks[:2]:
            t.cancel()
        await asyncio.gather(*tasks[:2], return_exceptions=True)

    asyncio.run(main())


def test_results_parse_errors_and_bounds() -> None:
    assert parse_result(b'{"id":"c","error":"LED broken"}') == (
        "c", Outcome(False, '{"error":"LED broken"}'))  # fmt: skip
    assert not parse_result(b'{"id":"c"}')[1].ok
    big = b'{"id":"c","result":"' + b"x" * 20000 + b'"}'
    call_id, outcome = parse_result(big)
    assert call_id == "c" and not outcome.ok and "more than 16384" in outcome.content
    for bad in (b"{", b"[]", b'{"id": 3}', b'{"id":"a b","result":1}'):
        with pytest.raises(ValueError):
            parse_result(bad)
    assert json.loads(call_message("c", SPEC, {}, "s"))["timeout_ms"] == 300


# --------------------------------------------------------------------------- bridge tools


def test_bridge_tool_schema_from_hints_and_docstring() -> None:
    tool = make_tool(get_weather)
    assert tool.spec.ref == "bridge/get_weather"
    assert tool.spec.description == "Today's weather in a city."
    assert tool.spec.parameters == {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "city": {"type": "string", "description": "the city's name."},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c",
                     "description": "c for Celsius, f for Fahrenheit."},
        },
        "required": ["city"],
    }  # fmt: skip
    doc = "Args:\n    a: x\n        more\nReturns:\n    y"
    assert parse_docstring(doc) == ("", {"a": "x more"})


def test_bridge_tools_run_validate_time_out_and_fail_as_results() -> None:
    runner = PyToolRunner([make_tool(get_weather), make_tool(slow, 200), make_tool(broken)])

    async def main() -> None:
        ok = await runner.run("get_weather", {"city": "Oslo", "unit": "f"})
        assert ok == Outcome(True, '{"city":"Oslo","temp":70}')
        bad = await runner.run("get_weather", {"town": "Oslo"})
        assert not bad.ok and "city" in bad.content and "town: unknown argument" in bad.content
        late = await runner.run("slow", {"seconds": 5})
        assert not late.ok and "within 200 ms" in late.content
        assert (await runner.run("slow", {"seconds": 0})).ok
        failed = await runner.run("broken", {})
        assert failed == Outcome(False, '{"error":"RuntimeError: no sensor"}')

    try:
        asyncio.run(main())
    finally:
        runner.close()


def test_configured_tools_load_by_reference_or_say_why_not() -> None:
    assert load_tool("tests.tooltargets:get_weather").spec.name == "get_weather"
    for ref, why in [
        ("nodots", "package.module:function"),
        ("no_such_module_x:f", "cannot import"),
        ("tests.tooltargets:missing", "has no function"),
    ]:
        with pytest.raises(ToolLoadError, match=why):
            load_tool(ref)

    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(ToolLoadError, match="needs a type hint"):
        make_tool(untyped)


# --------------------------------------------------------------------------- requests and settings


def test_use_tools_is_a_strict_request_field_not_combined_with_tools() -> None:
    from bridge.core import protocol as p
    from bridge.core.errors import ProtocolError

    req = p.parse_request(b'{"prompt": "hi", "use_tools": true}', 1000)
    assert req.use_tools is True
    assert "use_tools" not in req.upstream_body("m", True)
    tools = '[{"type": "function", "function": {"name": "f"}}]'
    for bad in (
        b'{"prompt": "hi", "use_tools": "yes"}',
        b'{"prompt": "hi", "use_tools": true, "tools": ' + tools.encode() + b"}",
    ):
        with pytest.raises(ProtocolError) as info:
            p.parse_request(bad, 1000)
        assert info.value.code == "bad_request"


def test_policy_grants_and_tool_settings_are_checked_at_start() -> None:
    from bridge.core.settings import ConfigError, load_settings

    s = load_settings(
        tools="tests.tooltargets:get_weather, tests.tooltargets:slow",
        policy={"default": {"tools": ["lamp/*", "bridge/get_weather"]},
                "devices": {"sw": {"max_tool_rounds": 2}}},
    )  # fmt: skip
    assert s.tool_refs == ["tests.tooltargets:get_weather", "tests.tooltargets:slow"]
    assert s.policy.limits("sw").tools == ["lamp/*", "bridge/get_weather"]
    assert s.policy.limits("sw").max_tool_rounds == 2
    assert s.policy.limits("other").max_tool_rounds == 4
    for bad, where in [
        ({"policy": {"default": {"tools": ["lamp"]}}}, "is not OWNER/TOOL"),
        ({"policy": {"default": {"tools": ["+/x"]}}}, "is not OWNER/TOOL"),
        ({"policy": {"default": {"max_tool_rounds": 0}}}, "BRIDGE_POLICY"),
        ({"tools": "mypkg.tools"}, "is not package.module:function"),
    ]:
        with pytest.raises(ConfigError, match=where):
            load_settings(**bad)


def test_outcomes_are_always_valid_unicode() -> None:
    assert Outcome.result("a\ud800") == Outcome(
        False, '{"error":"the result holds text that is not valid Unicode"}'
    )
    assert Outcome.failed("x\udfff?").content == '{"error":"x\ufffd?"}'
    call_id, outcome = parse_result(b'{"id":"c","result":"\\ud83d"}')
    assert call_id == "c" and not outcome.ok
