"""Folding a `chat.completion.chunk` stream into the reply a device gets.

Kept apart from the HTTP client so that the rules for what providers send
(see `tests/fixtures/streams/README.md`) are one small, testable piece:
content of choice 0 only, reasoning never, refusals kept, tool-call fragments
joined, the last finish_reason and usage, errors inside the stream.
"""

from __future__ import annotations

import json
from typing import Any

from bridge.core.errors import UPSTREAM_ERROR, UPSTREAM_PROTOCOL, ProtocolError

DELTA = "delta"
REFUSAL = "refusal"


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        msg = err.get("message") or err.get("error") or "error"
        code = err.get("code") or err.get("type")
        text = str(msg)
        return f"{text} ({code})" if code else text
    return str(err)


def _event_object(event: str, data: str) -> dict[str, Any]:
    """The JSON object an event carries; ProtocolError for an error event or data that is
    not an object."""
    try:
        obj = json.loads(data)
    except ValueError:
        if event == "error":
            raise ProtocolError(UPSTREAM_ERROR, data or "error event") from None
        raise ProtocolError(
            UPSTREAM_PROTOCOL, f"malformed event from the API: {data[:80]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError(UPSTREAM_PROTOCOL, "an event from the API is not a JSON object")
    err = obj.get("error")
    if event == "error" or err is not None:
        raise ProtocolError(UPSTREAM_ERROR, _error_text(err if err is not None else obj))
    return obj


class ReplyFold:
    """The reply so far; `feed()` each SSE event, then read the result.

    Args:
        model: the model asked for, reported when the provider names none.
        keep_text: keep the whole text (for `stream: false` and for state);
            when False, memory does not grow with the reply.
    """

    __slots__ = (
        "_parts",
        "_refusal",
        "_tools",
        "chars",
        "done",
        "finish_reason",
        "keep_text",
        "model",
        "opened",
        "usage",
    )

    def __init__(self, model: str, keep_text: bool = False) -> None:
        self.model = model
        self.keep_text = keep_text
        self._parts: list[str] = []
        self._refusal: list[str] = []
        self._tools: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.done = False
        # Characters of content, refusal and tool arguments received: what the
        # budget estimates from when the provider sends no `usage`.
        self.chars = 0
        # Whether the API accepted the call (a stream began): only then was the prompt spent.
        self.opened = False

    def feed(self, event: str, data: str) -> list[tuple[str, str]]:
        """Take one SSE event; return the (kind, text) pieces to publish, in order.

        Raises:
            ProtocolError: for an error event or data that is not JSON.
        """
        if data == "[DONE]":
            self.done = True
            return []
        if not data and event != "error":
            return []
        obj = _event_object(event, data)
        model = obj.get("model")
        if isinstance(model, str) and model:
            self.model = model
        pieces: list[tuple[str, str]] = []
        for choice in obj.get("choices") or ():
            if choice.get("index", 0) == 0:
                self._choice(choice, pieces)
        usage = obj.get("usage")
        if usage is None:
            x_groq = obj.get("x_groq")
            if isinstance(x_groq, dict):
                usage = x_groq.get("usage")
        if usage is not None:
            self.usage = usage
        return pieces

    def _choice(self, choice: dict[str, Any], pieces: list[tuple[str, str]]) -> None:
        delta = choice.get("delta") or choice.get("message")
        if delta:
            self._delta(delta, pieces)
        fr = choice.get("finish_reason")
        if fr is not None:
            self.finish_reason = fr
        if choice.get("usage") is not None:
            self.usage = choice["usage"]

    def _delta(self, delta: dict[str, Any], pieces: list[tuple[str, str]]) -> None:
        content = delta.get("content")
        if isinstance(content, str):
            if content:
                pieces.append((DELTA, content))
                self.chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text")
                    if isinstance(text, str) and text:
                        pieces.append((DELTA, text))
                        self.chars += len(text)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            pieces.append((REFUSAL, refusal))
            self.chars += len(refusal)
            self._refusal.append(refusal)
        calls = delta.get("tool_calls")
        if calls:
            for frag in calls:
                self._tool_fragment(frag)
        if self.keep_text:
            self._parts.extend(text for kind, text in pieces if kind == DELTA)

    def _tool_fragment(self, frag: dict[str, Any]) -> None:
        index = frag.get("index")
        fid = frag.get("id") or ""
        fn = frag.get("function") or {}
        call: dict[str, Any] | None = None
        if index is not None:
            call = next((c for c in self._tools if c["index"] == index), None)
        elif self._tools and not (fid and fid != self._tools[-1]["id"]):
            call = self._tools[-1]
        if call is None:
            call = {"index": index if index is not None else len(self._tools), "id": "",
                    "name": "", "arguments": []}  # fmt: skip
            self._tools.append(call)
        if fid and not call["id"]:
            call["id"] = fid
        name = fn.get("name")
        if name and not call["name"]:
            call["name"] = name
        args = fn.get("arguments")
        if isinstance(args, str):
            call["arguments"].append(args)
            self.chars += len(args)

    @property
    def text(self) -> str:
        """The whole content (only kept when `keep_text`)."""
        return "".join(self._parts)

    @property
    def refusal(self) -> str | None:
        """The whole refusal, or None."""
        return "".join(self._refusal) or None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls in index order, in the OpenAI message shape."""
        return [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": "".join(c["arguments"])},
            }
            for c in sorted(self._tools, key=lambda c: c["index"])
        ]

    @property
    def complete(self) -> bool:
        """Whether the stream ended as a whole reply: `[DONE]` or a finish_reason was seen."""
        return self.done or self.finish_reason is not None
