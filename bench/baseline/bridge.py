"""The naive bridge: openai SDK + paho-mqtt, a task per request, a publish per delta.

Configuration (the same variables as our bridge): OPENAI_BASE_URL,
OPENAI_API_KEY, OPENAI_MODEL, BRIDGE_MQTT_URL, BRIDGE_TOPIC_PREFIX,
BRIDGE_CLIENT_ID, BRIDGE_RESPONSE_QOS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from openai import AsyncOpenAI
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

log = logging.getLogger("baseline")


class NaiveBridge:
    """Subscribes to `P/+/req`, streams each request from the API, publishes each delta."""

    def __init__(self) -> None:
        url = urlsplit(os.environ.get("BRIDGE_MQTT_URL", "mqtt://localhost:1883"))
        self.host = url.hostname or "localhost"
        self.port = url.port or 1883
        self.prefix = os.environ.get("BRIDGE_TOPIC_PREFIX", "llm")
        self.model = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
        self.qos = int(os.environ.get("BRIDGE_RESPONSE_QOS", "1"))
        self.status = f"{self.prefix}/bridge/status"
        self.openai = AsyncOpenAI(
            base_url=os.environ.get("OPENAI_BASE_URL"), api_key=os.environ.get("OPENAI_API_KEY")
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        client_id = os.environ.get("BRIDGE_CLIENT_ID", f"naive-{uuid.uuid4().hex[:8]}")
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if url.username:
            self.mqtt.username_pw_set(
                unquote(url.username), unquote(url.password) if url.password else None
            )
        self.mqtt.will_set(self.status, "offline", qos=1, retain=True)
        self.mqtt.on_connect = self.on_connect
        self.mqtt.on_message = self.on_message

    def on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        client.subscribe(f"{self.prefix}/+/req", qos=1)
        client.publish(self.status, "online", qos=1, retain=True)
        log.info("connected")

    def on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: hand the request to the asyncio loop."""
        parts = msg.topic.split("/")
        if len(parts) < 3 or self.loop is None:
            return
        device, payload = parts[-2], bytes(msg.payload)
        self.loop.call_soon_threadsafe(self.start, device, payload)

    def start(self, device: str, payload: bytes) -> None:
        task = self.loop.create_task(self.handle(device, payload))  # type: ignore[union-attr]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        info = self.mqtt.publish(topic, json.dumps(message), qos=self.qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("publish to %s failed: %s", topic, mqtt.error_string(info.rc))

    async def handle(self, device: str, payload: bytes) -> None:
        try:
            req = json.loads(payload)
        except ValueError:
            req = {"prompt": payload.decode("utf-8", "replace")}
        rid = str(req.get("id") or uuid.uuid4().hex[:12])
        topic = f"{self.prefix}/{device}/res/{rid}"
        log.info("request device=%s id=%s", device, rid)
        messages = req.get("messages") or [{"role": "user", "content": req.get("prompt", "")}]
        if req.get("system"):
            messages = [{"role": "system", "content": req["system"]}, *messages]
        seq = 0
        try:
            stream = await self.openai.chat.completions.create(
                model=req.get("model") or self.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            finish, usage, model = None, None, req.get("model") or self.model
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage.model_dump(exclude_none=True)
                for choice in chunk.choices:
                    if choice.delta.content:
                        self.publish(topic, {"seq": seq, "delta": choice.delta.content})
                        seq += 1
                    if choice.finish_reason:
                        finish = choice.finish_reason
            self.publish(
                topic,
                {"seq": seq, "done": True, "finish_reason": finish, "usage": usage, "model": model},
            )
        except Exception as exc:
            log.warning("request device=%s id=%s failed: %s", device, rid, exc)
            self.publish(
                topic, {"seq": seq, "error": {"code": "upstream_error", "message": str(exc)}}
            )
        log.info("finished device=%s id=%s chunks=%d", device, rid, seq)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, stop.set)
        self.mqtt.connect(self.host, self.port)
        self.mqtt.loop_start()
        await stop.wait()
        for task in list(self.tasks):
            task.cancel()
        self.mqtt.publish(self.status, "offline", qos=1, retain=True).wait_for_publish(2)
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
        await self.openai.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(NaiveBridge().run())
    return 0
