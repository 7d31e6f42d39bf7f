"""A Python client that speaks protocol v1 as a device does: for scripts, tests and `chat`.

async with BridgeClient("mqtt://kitchen:secret@localhost", "kitchen") as llm:
    async for piece in llm.stream("Why is the sky blue?"):
        print(piece, end="", flush=True)

Cancelling the task that runs `ask` or iterates `stream`/`events`, or leaving the
loop early, cancels the request at the bridge (a `P/D/cancel`), which closes the
upstream stream. `bridge.dev.mqtt_openai.MqttOpenAI` is this client shaped like
the openai SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from bridge.core import protocol as p
from bridge.core.errors import ProtocolError
from bridge.core.mqtt import MqttLink
from bridge.core.settings import MqttUrl
from bridge.core.topics import Topics

#: The client's own error codes (beside the protocol's): no message came in time;
#: the reply broke the protocol (a gap in `seq`, a malformed error, no terminal).
TIMEOUT = "timeout"
PROTOCOL = "protocol"


class BridgeError(ProtocolError):
    """The request ended with an error terminal (or never ended in time).

    The protocol's `ProtocolError`, with two codes of the client's own:
    `TIMEOUT` when no message came in time, `PROTOCOL` for a seq gap.
    """

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(code, message, status=status)


@dataclass
class Reply:
    """How a request ended: the terminal `done` message's fields."""

    request_id: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    text: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def error_of(msg: dict[str, Any]) -> BridgeError:
    """The `BridgeError` an error terminal `{"seq":n,"error":{...}}` stands for."""
    err = msg.get("error")
    if not isinstance(err, dict):
        return BridgeError(PROTOCOL, f"malformed error message {msg!r:.200}")
    return BridgeError(str(err.get("code", "?")), str(err.get("message", "")), err.get("status"))


def _reply(rid: str, msg: dict[str, Any]) -> Reply:
    return Reply(
        request_id=rid,
        finish_reason=msg.get("finish_reason"),
        usage=msg.get("usage"),
        model=msg.get("model"),
        text=msg.get("text"),
        refusal=msg.get("refusal"),
        tool_calls=msg.get("tool_calls") or [],
    )


class BridgeClient:
    """Ask the bridge as device `device`; one connection, any number of requests.

    Args:
        url: the broker, `mqtt://user:pass@host:port` (the user is normally the device id).
        device: the device id in the topics.
        prefix: the topic prefix.
        idle_timeout: seconds without any message before a request fails with `timeout`.
        ca_file: CA for `mqtts://`.
    """

    def __init__(  # noqa: PLR0913  # keyword-only options, each defaulted
        self,
        url: str | MqttUrl,
        device: str,
        *,
        prefix: str = "llm",
        idle_timeout: float = 60.0,
        ca_file: Path | None = None,
        version: int = 5,
    ) -> None:
        if not p.valid_device_id(device):
            raise ValueError(f"invalid device id {device!r}")
        self.device = device
        self.topics = Topics(prefix)
        self.idle_timeout = idle_timeout
        self.last: Reply | None = None
        #: called with each progress message of a `use_tools` request (protocol v2):
        #: `{"seq":…,"tool_call":{…}}`, `{"seq":…,"tool_result":{…}}`
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        #: called with each audio frame on `P/D/audio/R` (protocol v2, "Voice"): the
        #: device's one connection hears its speech too (its user name is its client id)
        self.on_audio: Callable[[str, bytes], None] | None = None
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._pictures: dict[str, _Picture] = {}
        self.link = MqttLink(
            url if isinstance(url, MqttUrl) else MqttUrl.parse(url),
            client_id=f"{device}-{os.urandom(4).hex()}",
            on_message=self._on_message,
            subscriptions=[
                (self.topics.res_filter(device), 1),
                (self.topics.device(device, "image", "+"), 1),
                (self.topics.device(device, "audio", "+"), 1),
            ],
            ca_file=ca_file,
            version=version,
        )

    async def __aenter__(self) -> BridgeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe to this device's replies."""
        await self.link.start(timeout=timeout)
        async with asyncio.timeout(timeout):
            await self.link.subscribed.wait()

    async def close(self) -> None:
        await self.link.stop()

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        rid = msg.topic.rsplit("/", 1)[-1]
        if msg.topic == self.topics.image(self.device, rid):
            picture = self._pictures.get(rid)
            if picture is not None:
                picture.feed(bytes(msg.payload))
            return
        if msg.topic == self.topics.audio(self.device, rid):
            if self.on_audio is not None:
                self.on_audio(rid, bytes(msg.payload))
            return
        queue = self._queues.get(rid)
        if queue is None:
            return
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(data, dict):
            queue.put_nowait(data)

    async def events(
        self, prompt: str | None = None, *, request_id: str | None = None, **fields: Any
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Send a request and yield its reply messages in `seq` order, terminal last.

        Duplicates are dropped; a gap raises BridgeError(`protocol`). Leaving
        early, or being cancelled, cancels the request at the bridge.
        """
        rid = request_id or p.new_request_id()
        body: dict[str, Any] = {"id": rid, **fields}
        if prompt is not None:
            body["prompt"] = prompt
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues[rid] = queue
        finished = False
        try:
            await self.link.subscribed.wait()
            self.link.publish(self.topics.req(self.device), json.dumps(body), qos=1)
            expected = 0
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        msg = await queue.get()
                except TimeoutError:
                    raise BridgeError(
                        TIMEOUT, f"no reply message for {self.idle_timeout:g} s"
                    ) from None
                seq = msg.get("seq")
                if not isinstance(seq, int) or seq < expected:
                    continue
                if seq > expected:
                    raise BridgeError(PROTOCOL, f"message {expected} is missing (got {seq})")
                expected += 1
                if "done" in msg or "error" in msg:
                    finished = True
                yield msg
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and self.link.connected.is_set():
                with contextlib.suppress(ConnectionError):
                    self.link.publish(
                        self.topics.cancel(self.device), json.dumps({"id": rid}), qos=1
                    )

    async def stream(self, prompt: str | None = None, **fields: Any) -> AsyncIterator[str]:
        """Yield the reply's pieces (refusal pieces too) as they arrive.

        When it ends, `self.last` holds the terminal's fields.

        Raises:
            BridgeError: on an error terminal.
        """
        rid = fields.pop("request_id", None) or p.new_request_id()
        # aclosing: leaving this generator early closes `events` at once, which
        # cancels the request at the bridge (not whenever the garbage is collected).
        async with contextlib.aclosing(self.events(prompt, request_id=rid, **fields)) as events:
            async for msg in events:
                if "delta" in msg:
                    yield msg["delta"]
                elif "refusal" in msg:
                    yield msg["refusal"]
                elif "error" in msg:
                    raise error_of(msg)
                elif "done" in msg:
                    self.last = _reply(rid, msg)
                elif self.on_progress is not None:
                    self.on_progress(msg)

    async def ask(self, prompt: str | None = None, **fields: Any) -> str:
        """The whole reply text (streamed by the bridge, joined here)."""
        return "".join([piece async for piece in self.stream(prompt, **fields)])

    async def image(
        self, prompt: str, width: int, height: int, fmt: str, **fields: Any
    ) -> tuple[dict[str, Any], bytes]:
        """Ask for a picture for a `width` x `height` screen in `fmt` (docs/protocol.md
        "Pictures"); return the terminal's `image` and the bytes received in pieces.

        Raises:
            BridgeError: on an error terminal, or pieces that do not add up.
        """
        rid = fields.pop("request_id", None) or p.new_request_id()
        picture = self._pictures[rid] = _Picture()
        spec = {"prompt": prompt, "width": width, "height": height, "format": fmt, **fields}
        try:
            terminal: dict[str, Any] = {}
            async with contextlib.aclosing(self.events(request_id=rid, image=spec)) as events:
                async for msg in events:
                    if "error" in msg:
                        raise error_of(msg)
                    terminal = msg
            # The pieces travel on their own topic: the end piece may come just after.
            async with asyncio.timeout(self.idle_timeout):
                await picture.ended.wait()
            if picture.error:
                raise BridgeError("protocol", picture.error)
            info = terminal.get("image") or {}
            got, sent = len(picture.data), info.get("bytes")
            if got != sent:
                raise BridgeError("protocol", f"got {got} bytes, the bridge sent {sent}")
            return info, bytes(picture.data)
        except TimeoutError:
            raise BridgeError("timeout", "the picture's end piece never came") from None
        finally:
            self._pictures.pop(rid, None)


class _Picture:
    """The pieces of one picture on `P/D/image/R`, in order (docs/protocol.md "Pictures")."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.next = 0
        self.error = ""
        self.ended = asyncio.Event()

    def feed(self, payload: bytes) -> None:
        # here, not at the top: the chat client need not load Pillow and numpy
        from bridge.plugins.imaging import DATA, ERROR, unpack_piece  # noqa: PLC0415

        if self.ended.is_set():
            return
        try:
            seq, kind, _fmt, data = unpack_piece(payload)
        except ValueError as exc:
            self.error = str(exc)
            self.ended.set()
            return
        if seq < self.next:
            return
        if seq > self.next:
            self.error = f"piece {self.next} is missing (got {seq})"
            self.ended.set()
            return
        self.next += 1
        if kind == DATA:
            self.data += data
        else:
            if kind == ERROR:
                self.error = data.decode("utf-8", "replace")
            self.ended.set()
