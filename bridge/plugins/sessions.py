"""Conversations kept by the bridge (protocol v2): `"session": "<id>"` on a request.

A device (a Pico with a few hundred kilobytes of heap) cannot carry a long
conversation in every request; the bridge keeps it instead. Before the first
API call the stored turns of (device, session) are put between the
request's system prompt and its new messages; when the request ends with
`done`, every message the request added (its own, the tool calls and results
a tool loop appended) and the final reply are stored as new turns, and the
oldest turns are dropped to the device's policy (`session_max_turns`,
`session_max_chars`, `session_ttl_s`). The key includes the device id taken
from the topic, so no device can read or continue another's conversation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.core.plugin import Plugin
from bridge.plugins.sessionstore import SESSIONS_FILE, SessionStore, SqliteSessionStore

if TYPE_CHECKING:
    from bridge.core.job import Job
    from bridge.core.plugin import Host
    from bridge.core.settings import Limits, Settings

log = logging.getLogger("bridge.plugins.sessions")

_NAME = "sessions"
#: No stored session grows past this many bytes of JSON, whatever the policy says.
MAX_SESSION_BYTES = 1024 * 1024
_INSTRUCTIONS = ("system", "developer")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

Turn = list[dict[str, Any]]


@dataclass
class Conversation:
    """One stored session: its instructions and its turns (each starts with a user message)."""

    system: list[dict[str, Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def encode(self) -> bytes:
        return _dumps({"v": 1, "system": self.system, "turns": self.turns}).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Conversation | None:
        """A stored session, or None for none or for data this version cannot read."""
        if data is None:
            return None
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("v") != 1:
            return None
        system, turns = obj.get("system"), obj.get("turns")
        if not isinstance(system, list) or not isinstance(turns, list):
            return None
        return cls(system, [t for t in turns if isinstance(t, list) and t])

    def add(self, messages: list[dict[str, Any]]) -> None:
        """Group new messages into turns: a user message starts one; the rest (assistant
        replies, tool calls, tool results) belong to the turn before them."""
        for message in messages:
            if message.get("role") == "user" or not self.turns:
                self.turns.append([message])
            else:
                self.turns[-1].append(message)

    def trim(self, limits: Limits) -> int:
        """Drop the oldest turns past the policy's limits; returns how many were dropped."""
        sizes = [sum(_chars(m) for m in turn) for turn in self.turns]
        total = sum(sizes)
        dropped = 0
        while self.turns and (
            (limits.session_max_turns and len(self.turns) > limits.session_max_turns)
            or (limits.session_max_chars and total > limits.session_max_chars)
        ):
            self.turns.pop(0)
            total -= sizes.pop(0)
            dropped += 1
        while self.turns and len(self.encode()) > MAX_SESSION_BYTES:
            self.turns.pop(0)
            dropped += 1
        return dropped


@dataclass
class _Open:
    """A request's session while it runs: what was stored, and where its own messages start."""

    key: tuple[str, str]
    conversation: Conversation
    start: int


def _chars(message: dict[str, Any]) -> int:
    """A message's size for `session_max_chars`: its text, tool call names and arguments."""
    n = 0
    content = message.get("content")
    if isinstance(content, str):
        n += len(content)
    elif isinstance(content, list):
        n += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {} if isinstance(call, dict) else {}
        n += len(str(function.get("name", ""))) + len(str(function.get("arguments", "")))
    return n


def _storable(message: dict[str, Any]) -> dict[str, Any]:
    """A message as it is kept: parts other than text (an image, a sound) become a short
    note, so a picture sent once is not sent again with every later question."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(part)
        else:
            kind = part.get("type", "part") if isinstance(part, dict) else "part"
            parts.append({"type": "text", "text": f"[{kind}]"})
    return {**message, "content": parts}


class SessionsPlugin(Plugin):
    """Prepends a session's stored turns to a request; stores the new ones on `done`."""

    needs_text = True

    def __init__(self, settings: Settings, store: SessionStore | None = None) -> None:
        self.settings = settings
        self.store: SessionStore = store or SqliteSessionStore(
            settings.data_dir / SESSIONS_FILE,
            max_bytes=settings.session_store_bytes,
            per_device=settings.session_max_per_device,
        )
        self._writing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._closing = False

    def attach(self, host: Host) -> None:
        self.host = host

    async def prepare(self, job: Job) -> None:
        request, body = job.request, job.body
        if request.session is None or body is None:
            return
        key = (job.device, request.session)
        writing = self._writing.get(key)
        if writing is not None:
            await asyncio.wait([writing])  # the previous request's turns come first
        stored = None
        try:
            if request.session_reset:
                await self.store.delete(*key)
            else:
                stored = Conversation.decode(await self.store.get(*key))
        except Exception as exc:  # a broken store costs the history, never the request
            log.error("could not read session device=%s session=%s: %s", key[0], key[1], exc)
        messages: list[dict[str, Any]] = body["messages"]
        n = 0
        while n < len(messages) and messages[n].get("role") in _INSTRUCTIONS:
            n += 1
        head, rest = messages[:n], messages[n:]
        conversation = stored or Conversation()
        if head:
            conversation.system = [_storable(m) for m in head]
        history = [m for turn in conversation.turns for m in turn]
        body["messages"] = [*conversation.system, *history, *rest]
        job.data[_NAME] = _Open(key, conversation, len(conversation.system) + len(history))
        log.debug("session device=%s session=%s: %d stored turns", job.device, key[1],
                  len(conversation.turns))  # fmt: skip

    def finished(self, job: Job) -> None:
        state: _Open | None = job.data.get(_NAME)
        if state is None or job.outcome != "done" or job.body is None or job.fold is None:
            return
        fold = job.fold
        reply: dict[str, Any] = {"role": "assistant", "content": fold.text or fold.refusal or ""}
        if fold.tool_calls:
            reply["tool_calls"] = fold.tool_calls
        conversation = state.conversation
        conversation.add([_storable(m) for m in job.body["messages"][state.start :]])
        conversation.add([reply])
        limits = self.settings.policy.limits(job.device)
        dropped = conversation.trim(limits)
        ttl = limits.session_ttl_s
        expires = time.time() + ttl if ttl else None
        data = conversation.encode()
        if dropped:
            log.debug("session device=%s session=%s: dropped the %d oldest turns",
                      job.device, state.key[1], dropped)  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._put(state.key, data, expires))
        self._writing[state.key] = task
        task.add_done_callback(lambda t: self._wrote(state.key, t))

    async def _put(self, key: tuple[str, str], data: bytes, expires: float | None) -> None:
        await self.store.put(key[0], key[1], data, expires)

    def _wrote(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._writing.get(key) is task:
            del self._writing[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("could not store session device=%s session=%s: %s", key[0], key[1],
                      task.exception())  # fmt: skip
        if self._closing and not self._writing:
            self.store.close()

    def stopping(self) -> None:
        # Turns of requests that ended just before are still being written: close after them.
        self._closing = True
        if not self._writing:
            self.store.close()
