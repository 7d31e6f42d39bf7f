"""One request in flight: who asked, where its reply goes, how far it got."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from bridge.core import protocol as p

if TYPE_CHECKING:
    from collections.abc import Callable

    from paho.mqtt.properties import Properties

    from bridge.core.chunking import Chunker
    from bridge.core.errors import ProtocolError
    from bridge.core.reply import ReplyFold


class Job:
    """A request from its admission to its one terminal.

    Plugins read it, and may use `body` (before and between API calls),
    `terminal` (fields for the `done` terminal) and `data` (their own
    per-request state, under their name).
    """

    __slots__ = (
        "body",
        "cancel_code",
        "cancel_message",
        "chunker",
        "data",
        "device",
        "digest",
        "error",
        "estimated_chars",
        "fold",
        "outcome",
        "props",
        "request",
        "rid",
        "rounds",
        "seq",
        "slot",
        "started",
        "starting",
        "task",
        "terminal",
        "timer",
        "topic",
        "usage",
    )

    def __init__(  # noqa: PLR0913  # who asked, where the reply goes, what was asked
        self,
        device: str,
        rid: str,
        topic: str,
        request: p.ChatRequest,
        digest: bytes,
        *,
        props: Properties | None = None,
    ) -> None:
        self.device = device
        self.rid = rid
        self.topic = topic
        self.props = props
        self.request = request
        self.digest = digest
        self.body: dict[str, Any] | None = None
        self.fold: ReplyFold | None = None
        self.seq = 0
        self.outcome = "done"
        self.error: ProtocolError | None = None
        self.rounds = 0
        self.usage: dict[str, int] | None = None
        # Characters sent to or received from the API for which no `usage` came
        # (a failed attempt, a cancelled stream): the budget estimates them.
        self.estimated_chars = 0
        self.terminal: dict[str, Any] = {}
        self.data: dict[str, Any] = {}
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.cancel_code = p.CANCELLED
        self.cancel_message = "cancelled by the device"
        self.chunker: Chunker | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.slot = -1
        # Ends this request's part in the bridge's fair start (set while it is being
        # started: from its admission or its slot to its first call written upstream).
        self.starting: Callable[[], None] | None = None

    @property
    def tokens_used(self) -> int:
        """Tokens the request consumed: every round's `usage`, plus an estimate of one
        token per 4 characters for what was sent or received without one."""
        used = self.usage.get("total_tokens", 0) if self.usage is not None else 0
        return used + (self.estimated_chars + 3) // 4

    @property
    def reported_usage(self) -> Any:
        """The `usage` a device is told: the provider's own for one API reply, else the sum."""
        if self.rounds <= 1 and self.fold is not None:
            return self.fold.usage
        return self.usage

    def add_usage(self, usage: Any) -> None:
        """Add one API reply's `usage` to the request's total (every round counts)."""
        if not isinstance(usage, dict):
            return
        total = self.usage if self.usage is not None else {}
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                total[key] = total.get(key, 0) + value
        if total:
            if "total_tokens" not in total:
                total["total_tokens"] = total.get("prompt_tokens", 0) + total.get(
                    "completion_tokens", 0
                )
            self.usage = total
