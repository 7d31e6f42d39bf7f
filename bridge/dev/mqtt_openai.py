"""The openai SDK's shape over MQTT: `MqttOpenAI().chat.completions.create(...)`.

For code written against `AsyncOpenAI`: the same call, with the bridge as
transport (the requests go out as a device, through `BridgeClient`):

async with MqttOpenAI("mqtt://kitchen:secret@localhost", "kitchen") as client:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True)
    async for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="")
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.core import protocol as p
from bridge.core.settings import MqttUrl
from bridge.dev.client import PROTOCOL, BridgeClient, BridgeError, error_of

#: The openai `chat.completions.create` parameters the protocol forwards.
FORWARDED = frozenset({*p.SAMPLING_FIELDS, "tools", "tool_choice"})


@dataclass
class FunctionCall:
    name: str | None = None
    arguments: str | None = None


@dataclass
class ToolCall:
    id: str | None = None
    type: str = "function"
    function: FunctionCall = field(default_factory=FunctionCall)
    index: int = 0


@dataclass
class CompletionUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    #: the provider's usage object as it sent it (details included).
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatCompletionMessage:
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


@dataclass
class Choice:
    index: int
    message: ChatCompletionMessage
    finish_reason: str | None


@dataclass
class ChatCompletion:
    id: str
    choices: list[Choice]
    created: int
    model: str | None
    usage: CompletionUsage | None
    object: str = "chat.completion"


@dataclass
class ChoiceDelta:
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


@dataclass
class ChunkChoice:
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None


@dataclass
class ChatCompletionChunk:
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str | None
    usage: CompletionUsage | None = None
    object: str = "chat.completion.chunk"


def _usage(raw: Any) -> CompletionUsage | None:
    if not isinstance(raw, dict):
        return None

    def n(key: str) -> int:
        v = raw.get(key)
        return v if isinstance(v, int) else 0

    return CompletionUsage(n("prompt_tokens"), n("completion_tokens"), n("total_tokens"), raw)


def _tool_calls(raw: Iterable[Any]) -> list[ToolCall] | None:
    calls = [
        ToolCall(
            id=c.get("id"),
            type=c.get("type", "function"),
            function=FunctionCall(
                (c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments")
            ),
            index=i,
        )
        for i, c in enumerate(raw)
        if isinstance(c, dict)
    ]
    return calls or None


class AsyncStream:
    """The chunks of one streamed completion, as the openai SDK's `AsyncStream` yields them.

    The last chunk carries `finish_reason`, the tool calls (whole) and `usage`.
    `close()` (or leaving `async with`) before the end cancels the request.
    """

    def __init__(
        self, events: AsyncGenerator[dict[str, Any], None], rid: str, model: str | None
    ) -> None:
        self._events = events
        self.id = rid
        self.model = model
        self.created = int(time.time())
        self._first = True

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        msg = await self._events.__anext__()
        if "error" in msg:
            await self.close()
            raise error_of(msg)
        delta = ChoiceDelta(role="assistant" if self._first else None)
        self._first = False
        choice = ChunkChoice(0, delta)
        usage = None
        if "delta" in msg:
            delta.content = msg["delta"]
        elif "refusal" in msg:
            delta.refusal = msg["refusal"]
        else:
            self.model = msg.get("model") or self.model
            choice.finish_reason = msg.get("finish_reason")
            delta.tool_calls = _tool_calls(msg.get("tool_calls") or [])
            usage = _usage(msg.get("usage"))
        return ChatCompletionChunk(self.id, [choice], self.created, self.model, usage)

    async def close(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Completions:
    def __init__(self, owner: MqttOpenAI) -> None:
        self._owner = owner

    async def create(
        self,
        *,
        messages: list[dict[str, Any]],
        model: str | None = None,
        stream: bool = False,
        n: int | None = None,
        stream_options: dict[str, Any] | None = None,
        **params: Any,
    ) -> Any:
        """Like `AsyncOpenAI().chat.completions.create`: a `ChatCompletion`, or with
        `stream=True` an `AsyncStream` of `ChatCompletionChunk`.

        `model` may be left out (the bridge's `OPENAI_MODEL`); `stream_options` is
        accepted and not needed (usage always comes in the last chunk); `n` must be 1.

        Raises:
            BridgeError: the request ended with an error (`code` says which).
            TypeError: a parameter the protocol does not forward.
        """
        unknown = set(params) - FORWARDED
        if unknown:
            raise TypeError(f"parameters not supported over the bridge: {sorted(unknown)}")
        if n not in (None, 1):
            raise ValueError("n must be 1: a device gets one reply")
        body: dict[str, Any] = {"messages": messages, "stream": stream, **params}
        if model is not None:
            body["model"] = model
        client = await self._owner.client()
        rid = p.new_request_id()
        events = client.events(request_id=rid, **body)
        if stream:
            return AsyncStream(events, rid, model)
        async with contextlib.aclosing(events) as it:
            async for msg in it:
                if "error" in msg:
                    raise error_of(msg)
                if "done" in msg:
                    message = ChatCompletionMessage(
                        content=msg.get("text"),
                        refusal=msg.get("refusal"),
                        tool_calls=_tool_calls(msg.get("tool_calls") or []),
                    )
                    return ChatCompletion(
                        id=rid,
                        choices=[Choice(0, message, msg.get("finish_reason"))],
                        created=int(time.time()),
                        model=msg.get("model"),
                        usage=_usage(msg.get("usage")),
                    )
        raise BridgeError(PROTOCOL, "the reply ended without a terminal message")


class _Chat:
    def __init__(self, owner: MqttOpenAI) -> None:
        self.completions = _Completions(owner)


class MqttOpenAI:
    """`client.chat.completions.create(model=..., messages=..., stream=...)` over MQTT.

    The async openai SDK's shape (await `create`; `async for` over a stream) with
    the bridge as transport: the requests go out as device `device`, so the
    device's credentials, policy and state apply. Connects on first use.

    Args:
        url: the broker, `mqtt://device:password@host:port`.
        device: the device id.
        prefix, idle_timeout, ca_file: as for `BridgeClient`.
    """

    def __init__(
        self,
        url: str | MqttUrl,
        device: str,
        *,
        prefix: str = "llm",
        idle_timeout: float = 60.0,
        ca_file: Path | None = None,
    ) -> None:
        self._client = BridgeClient(
            url, device, prefix=prefix, idle_timeout=idle_timeout, ca_file=ca_file
        )
        self._connected = False
        self._lock = asyncio.Lock()
        self.chat = _Chat(self)

    async def client(self) -> BridgeClient:
        """The underlying `BridgeClient`, connected."""
        async with self._lock:
            if not self._connected:
                await self._client.connect()
                self._connected = True
        return self._client

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self._client.close()

    async def __aenter__(self) -> MqttOpenAI:
        await self.client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
