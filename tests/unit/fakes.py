"""In-memory stand-ins for the unit tests: a link that records what the bridge publishes,
and an API whose answers are `httpx.Response`s built in memory (no socket anywhere)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bridge.core.plugin import Plugin
from bridge.core.service import Bridge
from bridge.core.settings import Settings
from bridge.core.upstream import Upstream


@dataclass
class Sent:
    topic: str
    message: dict[str, Any]
    qos: int
    retain: bool
    properties: Any

    @property
    def terminal(self) -> bool:
        return "done" in self.message or "error" in self.message

    @property
    def code(self) -> str | None:
        error = self.message.get("error")
        return error["code"] if isinstance(error, dict) else None


class FakeLink:
    """What the bridge uses of `MqttLink`, connected, recording every publish."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.connected = asyncio.Event()
        self.connected.set()
        self.subscribed = asyncio.Event()
        self.subscribed.set()
        self.congested = False
        self.unsubscribed: list[str] = []

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 0,
        retain: bool = False,
        properties: Any = None,
        *,
        on_ack: Callable[[], None] | None = None,
    ) -> None:
        self.sent.append(Sent(topic, json.loads(payload), qos, retain, properties))
        if on_ack is not None:
            on_ack()

    async def drained(self) -> None:
        return None

    async def unsubscribe(self, filters: list[str], timeout: float = 2.0) -> bool:
        self.unsubscribed += filters
        return True

    def flush(self) -> None:
        return None

    def ack(self, msg: object) -> None:
        return None

    async def stop(self) -> None:
        return None

    def terminals(self, topic_start: str = "") -> list[Sent]:
        return [s for s in self.sent if s.terminal and s.topic.startswith(topic_start)]


def sse(*chunks: dict[str, Any] | str) -> bytes:
    """An event-stream body: each chunk a `data:` event (a str as it is, e.g. "[DONE]")."""
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return "".join(lines).encode()


def reply_stream(text: str = "Hi there", model: str = "m") -> httpx.Response:
    """A complete streamed reply, as an OpenAI-compatible API sends it."""
    body = sse(
        {"model": model, "choices": [{"index": 0, "delta": {"content": text}}]},
        {"model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"model": model, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                  "total_tokens": 5}},
        "[DONE]",
    )  # fmt: skip
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


#: How the fake API answers a request: a response, or a coroutine that waits for one.
Answer = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def settings(**overrides: Any) -> Settings:
    """Settings from the defaults only (no `.env`), without the journal file."""
    overrides.setdefault("journal", False)
    overrides.setdefault("upstream_retries", 0)
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def bridge(
    answer: Answer | None = None, plugins: list[Plugin] | None = None, **overrides: Any
) -> tuple[Bridge, FakeLink]:
    """A `Bridge` that is never started: its link records, its API answers from memory.

    Build it inside the event loop that runs the test (its tasks belong there).
    """
    s = settings(**overrides)
    transport = httpx.MockTransport(answer or (lambda _r: reply_stream()))
    upstream = Upstream(s, transport=transport)
    b = Bridge(s, upstream=upstream, plugins=plugins)
    link = FakeLink()
    b.link = link  # type: ignore[assignment]
    return b, link


async def settle(b: Bridge) -> None:
    """Wait until every request the bridge holds has published its terminal."""
    tasks = [j.task for j in b.jobs.values() if j.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=5)
