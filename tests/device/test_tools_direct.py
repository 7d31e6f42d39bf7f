"""Tools in direct mode on the MicroPython VM: the device runs the model's calls itself.

The same registered tools as in MQTT mode, in a loop on the device with the
same `max_tool_rounds`, against the mock LLM over HTTPS (scripted with
`[mock call=...]`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.dev.mock_llm import PREAMBLE_TEXT, reply_tokens
from tests.device import vmkit
from tests.device.test_direct import direct_config


def run_tool_job(
    tmp_path: Path,
    config: dict[str, Any],
    tools: list[str],
    steps: list[dict[str, Any]],
    *,
    timeout: float = 30,
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Run tests/device/vm/tool_job.py; its START record, STEP records and the stub's pin log."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": config, "tools": tools, "steps": steps}))
    log = tmp_path / "pins.log"
    proc = vmkit.run_vm(
        vmkit.PROGRAMS_DIR / "tool_job.py",
        str(job),
        timeout=timeout,
        cwd=tmp_path,
        env=vmkit.vm_env(STUB_LOG=str(log)),
    )
    records = vmkit.parse_records(proc.stdout)
    if proc.returncode != 0 or len(records) != len(steps):
        raise AssertionError(
            f"VM exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}"
        )
    start = vmkit.parse_records(proc.stdout, "START ")[0]
    return start, records, log.read_text() if log.exists() else ""


def _tool_contents(request: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request["body"]["messages"] if m["role"] == "tool"]


def test_direct_mode_runs_the_device_s_tools_and_answers_with_their_results(
    tls_mock: Any, certs: dict[str, Path], tmp_path: Path
) -> None:
    prompt = "[mock call=set_led(on:true)+read_temp preamble] lamp on please"
    tls_mock.server.clear_requests()
    _start, recs, pins = run_tool_job(
        tmp_path,
        direct_config(tls_mock.base_url, certs["ca"], history=0),
        ["set_led", "read_temp", "broken"],
        [{"op": "ask", "prompt": prompt, "opts": {"use_tools": True}}],
    )
    rec = recs[0]
    assert rec["ok"], rec
    assert rec["runs"] == ["set_led", "read_temp"]
    assert "pin LED 1" in pins
    first, second = tls_mock.requests[-2:]
    offered = [t["function"]["name"] for t in first["body"]["tools"]]
    assert offered == ["set_led", "read_temp", "broken"]
    assert "use_tools" not in first["body"]
    contents = _tool_contents(second)
    assert [json.loads(c) for c in contents] == [{"on": True}, {"celsius": 27.6}]
    assert rec["text"] == PREAMBLE_TEXT + "".join(
        reply_tokens(prompt, tool_result="; ".join(contents))
    )
    said = [m for m in second["body"]["messages"] if m["role"] == "assistant"]
    assert said[0]["content"] == PREAMBLE_TEXT
    assert rec["tool_rounds"] == 1
    assert [next(iter(m)) for m in rec["progress"]] == [
        "tool_call", "tool_result", "tool_call", "tool_result"
    ]  # fmt: skip
    assert rec["progress"][0]["tool_call"]["name"] == "set_led"
    assert all(m["tool_result"]["ok"] for m in rec["progress"][1::2])
    # usage summed over both calls to the model
    usages = [r["body"] for r in (first, second)]
    assert len(usages) == 2 and rec["usage"]["total_tokens"] > 0


def test_direct_mode_errors_are_results_and_the_round_limit_holds(
    tls_mock: Any, certs: dict[str, Path], tmp_path: Path
) -> None:
    tls_mock.server.clear_requests()
    _start, recs, pins = run_tool_job(
        tmp_path,
        direct_config(tls_mock.base_url, certs["ca"], history=0, max_tool_rounds=2),
        ["set_led", "broken"],
        [
            {"op": "ask", "prompt": "[mock call=broken+nothere+set_led(on:7)] x",
             "opts": {"use_tools": True}},
            {"op": "ask", "prompt": "[mock call=set_led(on:true) rounds=9] again",
             "opts": {"use_tools": True}},
        ],
    )  # fmt: skip
    errors = [json.loads(c) for c in _tool_contents(tls_mock.requests[1])]
    assert errors == [
        {"error": "OSError: sensor unplugged"},
        {"error": "no tool nothere"},
        {"on": 7},  # the tool does not check its argument
    ]
    assert recs[0]["ok"] and recs[0]["tool_rounds"] == 1
    assert [m["tool_result"]["ok"] for m in recs[0]["progress"][1::2]] == [False, False, True]
    limit = recs[1]
    assert not limit["ok"] and limit["code"] == "too_many_tool_rounds", limit
    assert limit["runs"].count("set_led") == 1 + 2  # the first ask's, then two rounds
    assert pins.count("pin LED 1") == 3
