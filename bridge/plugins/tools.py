"""The tools plugin (protocol v2): the bridge as the device's agent.

Devices declare tools on `P/D/tools` (retained) and their presence on
`P/D/status` (retained, with a last will). A request with `"use_tools": true`
gets its device's own tools and those its policy grants (other devices' and
the bridge's own Python functions); when the model calls one, the bridge
publishes the call on `P/OWNER/call`, waits for `P/OWNER/result` (or runs the
Python function), appends the results and asks the model again, at most
`max_tool_rounds` times. The asking device sees `tool_call` and `tool_result`
progress messages on its reply stream; the terminal carries `tool_rounds`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from bridge.core import protocol as p
from bridge.core.errors import TOO_MANY_TOOL_ROUNDS, ProtocolError
from bridge.core.job import Job
from bridge.core.plugin import Host, Inbound, Plugin
from bridge.core.settings import ConfigError, Settings
from bridge.plugins.pytools import PyToolRunner, ToolLoadError, load_tools
from bridge.plugins.toolcalls import CallBroker, Outcome, new_call_id
from bridge.plugins.toolcards import (
    BRIDGE_OWNER,
    CardError,
    Registry,
    ToolSet,
    ToolSpec,
    loads_strict,
)

log = logging.getLogger("bridge.plugins.tools")

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_NAME = "tools"
# The model's arguments for one call, as it sent them: what a small device is asked to parse.
MAX_ARGUMENT_CHARS = 8192


@dataclass
class _Loop:
    """One request's tool loop: its tools, its limit, how far it got."""

    tools: ToolSet
    limit: int
    rounds: int = 0
    said: list[str] = field(default_factory=list)  # the model's text in this round


class ToolsPlugin(Plugin):
    """Cards, presence, calls and the loop; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry()
        self.calls = CallBroker()
        try:
            tools = load_tools(settings.tool_refs, settings.tool_timeout_ms)
        except ToolLoadError as exc:
            raise ConfigError(f"BRIDGE_TOOLS: {exc}") from None
        self.runner = PyToolRunner(tools)
        self._verdicts: dict[str, bytes] = {}

    def attach(self, host: Host) -> None:
        self.host = host
        t = host.topics
        if self.settings.device_tools:  # else only the bridge's own tools are offered
            host.subscribe(t.device_filter("tools"), self._on_card)
            host.subscribe(t.device_filter("status"), self._on_status)
            host.subscribe(t.device_filter("result"), self._on_result)

    def stopping(self) -> None:
        self.runner.close()

    # --- what devices publish -----------------------------------------------------------

    def _device(self, msg: Inbound, kind: str) -> str | None:
        """The device of a `P/D/kind` message; None for the bridge's own `P/bridge/status`."""
        parsed = self.host.topics.parse(msg.topic)
        if parsed is None:
            return None
        device, got, rest = parsed
        if got != kind or rest is not None or not p.valid_device_id(device):
            return None
        return device

    def _on_card(self, msg: Inbound) -> None:
        device = self._device(msg, "tools")
        if device is None:
            return
        try:
            specs = self.registry.set_card(device, msg.payload)
        except CardError as exc:
            log.warning("refused the tool card of %s: %s", device, exc)
            self._verdict(device, _dumps({"ok": False, "error": str(exc)}).encode())
            return
        if specs is None:
            log.info("device %s withdrew its tools", device)
            self._verdict(device, b"")
        else:
            log.info("device %s declares tools %s", device, ", ".join(s.name for s in specs))
            names = [s.name for s in specs]
            self._verdict(device, _dumps({"ok": True, "tools": names}).encode())

    def _verdict(self, device: str, payload: bytes) -> None:
        """Publish the verdict on a card (retained), when it changed."""
        if self._verdicts.get(device, b"") == payload:
            return
        if payload:
            self._verdicts[device] = payload
        else:
            self._verdicts.pop(device, None)
        self.host.publish(self.host.topics.tools_ack(device), payload, qos=1, retain=True)

    def _on_status(self, msg: Inbound) -> None:
        device = self._device(msg, "status")
        if device is None:
            return
        try:
            self.registry.set_status(device, msg.payload)
        except CardError as exc:
            log.warning("bad status from %s (taken as offline): %s", device, exc)

    def _on_result(self, msg: Inbound) -> None:
        device = self._device(msg, "result")
        if device is not None:
            self.calls.on_result(device, msg.payload)

    # --- the loop -----------------------------------------------------------------------

    async def prepare(self, job: Job) -> None:
        if not job.request.use_tools or job.body is None:
            return
        limits = self.settings.policy.limits(job.device)
        tools = self.registry.tools_for(job.device, limits.tools, self.runner.specs)
        job.data[_NAME] = _Loop(tools, limits.max_tool_rounds)
        if not tools:
            job.body.pop("tool_choice", None)  # nothing to choose from: asked without tools
            return
        job.body["tools"] = tools.definitions()
        choice = job.body.get("tool_choice")
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name")
            if name not in tools.by_name:
                raise ProtocolError(
                    p.BAD_REQUEST, f"tool_choice names {name!r}, not a tool of this request"
                )

    def text(self, job: Job, text: str) -> None:
        # What the model says in a round where it also calls tools goes back with the calls.
        loop: _Loop | None = job.data.get(_NAME)
        if loop is not None:
            loop.said.append(text)

    async def next_round(self, job: Job) -> bool:
        loop: _Loop | None = job.data.get(_NAME)
        fold = job.fold
        if loop is None or fold is None or job.body is None:
            return False
        calls = fold.tool_calls
        if not calls:
            return False
        if not loop.tools:  # none offered: the calls are the device's (as in v1)
            return False
        if loop.rounds >= loop.limit:
            raise ProtocolError(
                TOO_MANY_TOOL_ROUNDS,
                f"the model still called tools after {loop.limit} rounds (max_tool_rounds)",
            )
        loop.rounds += 1
        outcomes = await asyncio.gather(*(self._one(job, loop, call) for call in calls))
        messages = job.body["messages"]
        said = "".join(loop.said) or None
        loop.said.clear()
        messages.append({"role": "assistant", "content": said, "tool_calls": calls})
        for call, outcome in zip(calls, outcomes, strict=True):
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": outcome.content}
            )
        if job.body.get("tool_choice") not in (None, "auto", "none"):
            job.body["tool_choice"] = "auto"  # forced once; now the model may answer
        return True

    async def _one(self, job: Job, loop: _Loop, call: dict[str, Any]) -> Outcome:
        """Run one call the model made; progress on the asking device's reply stream."""
        function = call.get("function") or {}
        exposed = str(function.get("name") or "")
        spec = loop.tools.by_name.get(exposed)
        call_id = new_call_id()
        self.host.emit(
            job,
            {"tool_call": {
                "id": call_id,
                "name": spec.name if spec else exposed[:64],
                "device": spec.owner if spec else None,
            }},
        )  # fmt: skip
        outcome = await self._run(call_id, spec, exposed, function.get("arguments"))
        log.info(
            "tool call device=%s id=%s tool=%s ok=%s",
            job.device, job.rid, spec.ref if spec else exposed[:64], outcome.ok,
            extra={"device": job.device, "request_id": job.rid},
        )  # fmt: skip
        self.host.emit(job, {"tool_result": {"id": call_id, "ok": outcome.ok}})
        return outcome

    async def _run(  # noqa: PLR0911  # one outcome per way a call can end
        self, call_id: str, spec: ToolSpec | None, exposed: str, raw_args: Any
    ) -> Outcome:
        if spec is None:
            return Outcome.failed(f"there is no tool named {exposed[:64]!r}")
        if isinstance(raw_args, str) and len(raw_args) > MAX_ARGUMENT_CHARS:
            return Outcome.failed(f"the arguments are longer than {MAX_ARGUMENT_CHARS} characters")
        try:
            # strict JSON, valid Unicode: what a device can parse (NaN, a lone surrogate: not)
            arguments = loads_strict(str(raw_args).encode()) if raw_args else {}
        except (ValueError, UnicodeEncodeError):
            return Outcome.failed("the arguments are not valid JSON")
        if not isinstance(arguments, dict):
            return Outcome.failed("the arguments must be a JSON object")
        if "\\ud" in str(raw_args).lower() and _surrogate(arguments):
            return Outcome.failed("the arguments hold text that is not valid Unicode")
        if spec.owner == BRIDGE_OWNER:
            return await self.runner.run(spec.name, arguments)
        session = self.registry.session(spec.owner)
        if session is None:
            return Outcome.failed(f"device {spec.owner} is offline")
        topic = self.host.topics.call(spec.owner)

        def send(payload: bytes, expiry: int) -> None:
            self.host.publish(topic, payload, qos=1, expiry=expiry)

        return await self.calls.call(call_id, spec, arguments, session, send)

    async def finishing(self, job: Job) -> None:
        loop: _Loop | None = job.data.get(_NAME)
        if loop is not None:
            job.terminal["tool_rounds"] = loop.rounds


def _surrogate(value: Any) -> bool:
    """Whether a lone UTF-16 surrogate (a `\\ud800` escape) hides in parsed JSON."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False
