"""A simulated tool device (protocol v2, "Tools"), in Python: for the demo and for scripts.

It does what device/picollm/tools.py does on a Pico: declares its tools
(retained card), says it is online with a new session at every connect (and
offline through its last will), runs each call it receives at most once, only
when it carries the current session and within its `timeout_ms`, and answers
every call on `P/D/result`.

async with ToolDevice("mqtt://lamp:pw@localhost", "lamp") as lamp:
    lamp.tool("set_led", "Turn the lamp on or off",
              {"type": "object", "properties": {"on": {"type": "boolean"}}}, set_led)
    await lamp.connect()
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from bridge.core import protocol as p
from bridge.core.mqtt import MqttLink, Will
from bridge.core.settings import MqttUrl

RECENT = 64


@dataclass
class _Tool:
    fn: Callable[..., Any]
    description: str
    parameters: dict[str, Any]
    timeout_ms: int | None


class ToolDevice:
    """A device that offers tools over MQTT and answers the bridge's calls.

    Args:
        url: the broker, `mqtt://DEVICE:password@host:port`.
        device: the device id.
        on_event: called with ("call", call) when a call arrives and ("ran",
            call, ok, value) when it ran or was refused (for printing).
    """

    def __init__(
        self,
        url: str | MqttUrl,
        device: str,
        *,
        prefix: str = "llm",
        version: int = 5,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        if not p.valid_device_id(device):
            raise ValueError(f"invalid device id {device!r}")
        self.device = device
        self.base = f"{prefix}/{device}/"
        self.tools: dict[str, _Tool] = {}
        self.session = ""
        self.verdict: dict[str, Any] | None = None
        self._verdict = asyncio.Event()
        self.on_event = on_event
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.link = MqttLink(
            url if isinstance(url, MqttUrl) else MqttUrl.parse(url),
            client_id=f"{device}-tools-{os.urandom(4).hex()}",
            on_message=self._on_message,
            subscriptions=[(self.base + "call", 1), (self.base + "tools/ack", 1)],
            will=Will(self.base + "status", b'{"online":false}', qos=1, retain=True),
            on_connect=self._online,
            version=version,
        )

    def tool(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any] | None,
        fn: Callable[..., Any],
        timeout_ms: int | None = None,
    ) -> None:
        """Offer `fn` (plain or async) as tool `name`; register before `connect()`."""
        self.tools[name] = _Tool(
            fn, description, parameters or {"type": "object", "properties": {}}, timeout_ms
        )

    def card(self) -> bytes:
        tools = []
        for name, t in self.tools.items():
            entry: dict[str, Any] = {
                "name": name, "description": t.description, "parameters": t.parameters,
            }  # fmt: skip
            if t.timeout_ms:
                entry["timeout_ms"] = t.timeout_ms
            tools.append(entry)
        return json.dumps({"tools": tools}).encode()

    async def connect(self, timeout: float = 10.0) -> None:
        await self.link.start(timeout=timeout)
        async with asyncio.timeout(timeout):
            await self.link.subscribed.wait()

    async def accepted(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the bridge's verdict on the card (`P/D/tools/ack`) and return it."""
        async with asyncio.timeout(timeout):
            while self.verdict is None:
                await self._verdict.wait()
                self._verdict.clear()
        return self.verdict

    async def close(self) -> None:
        """Say offline (a clean disconnect sends no last will) and disconnect."""
        if self.link.connected.is_set():
            self.link.publish(self.base + "status", b'{"online":false}', qos=1, retain=True)
        for task in list(self._tasks):
            task.cancel()
        await self.link.stop()

    async def __aenter__(self) -> ToolDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _online(self) -> None:
        # A new session at every connect: a call the broker kept for the last one is stale.
        self.session = os.urandom(8).hex()
        self.link.publish(self.base + "tools", self.card(), qos=1, retain=True)
        status = json.dumps({"online": True, "session": self.session})
        self.link.publish(self.base + "status", status, qos=1, retain=True)

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.base + "tools/ack":
            try:
                self.verdict = json.loads(msg.payload) if msg.payload else None
            except ValueError:
                self.verdict = None
            self._verdict.set()
            return
        if msg.topic != self.base + "call":
            return
        try:
            call = json.loads(msg.payload)
            call_id = call["id"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(call_id, str) or call_id in self._recent:
            return  # a redelivery: run (or refused) once already
        self._recent[call_id] = None
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._run(call, time.monotonic()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call: dict[str, Any], arrived: float) -> None:
        if self.on_event is not None:
            self.on_event("call", call)
        timeout: int = call["timeout_ms"] if isinstance(call.get("timeout_ms"), int) else 5000
        tool = self.tools.get(call.get("name", ""))
        ok, value = False, ""
        if call.get("session") != self.session:
            value = "stale call: it was sent before this connection; not run"
        elif tool is None:
            value = f"no tool {call.get('name')!r}"
        elif not isinstance(call.get("arguments"), dict):
            value = "arguments must be an object"
        elif (time.monotonic() - arrived) * 1000 > timeout:
            value = f"expired: not run within its {timeout} ms"
        else:
            try:
                result = tool.fn(**call["arguments"])
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, timeout / 1000)
                ok, value = True, result
            except Exception as exc:
                value = f"{type(exc).__name__}: {exc}"
        if self.on_event is not None:
            self.on_event("ran", call, ok, value)
        body = {"id": call["id"], "result": value} if ok else {"id": call["id"], "error": value}
        try:
            payload = json.dumps(body)
        except (TypeError, ValueError):
            payload = json.dumps({"id": call["id"], "error": "the result is not JSON"})
        self.link.publish(self.base + "result", payload, qos=1)
