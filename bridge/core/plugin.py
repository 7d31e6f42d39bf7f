"""The plugin interface: what a plugin may see of a request, and what the core offers it.

The core calls every plugin at fixed moments of a request's life (admission,
start, preparation, each reply text, each round, finish) and gives it a
`Host`: publish, subscribe a topic filter to a handler, submit a request,
add a progress message to a reply. A plugin that raises is logged and
skipped, never fatal; one that raises `ProtocolError` in `admit` or
`prepare` ends the request with that error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bridge.core.errors import ProtocolError
    from bridge.core.job import Job
    from bridge.core.protocol import ChatRequest
    from bridge.core.settings import Settings
    from bridge.core.shared import Guarded
    from bridge.core.topics import Topics
    from bridge.core.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message on a topic a plugin subscribed to."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: Any = None  #: MQTT v5 properties, when the message had any
    dup: bool = False  #: the broker's DUP flag: this may be a redelivery


Handler = Callable[[Inbound], None]


class Host(Protocol):
    """What the core offers a plugin (the bridge implements it)."""

    settings: Settings
    topics: Topics
    upstream: Upstream
    #: a worker group's shared store (`BRIDGE_GROUP`), or None for a lone bridge
    shared: Guarded | None

    @property
    def accepting(self) -> bool:
        """False while the bridge stops: take no new work."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up now."""
        ...

    async def subscribed(self) -> None:
        """Wait until the broker has granted this connection's subscriptions
        (retained messages on them arrive right after)."""
        ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry: int | None = None,
    ) -> None:
        """Publish a message (dropped with a warning while it cannot be queued); `expiry`:
        seconds after which the broker drops it if undelivered (MQTT v5 only)."""
        ...

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, shared: bool = False
    ) -> None:
        """Route messages matching `topic_filter` to `handler` (from `attach` only).

        `shared`: in a worker group (`BRIDGE_GROUP`) one worker gets each message (for
        topics that start a request); otherwise every worker does, and each ignores what
        belongs to a request it does not hold (`job()` is None).
        """
        ...

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving `topic_filter` (a filter read only for its retained messages),
        now and at later reconnects."""
        ...

    @property
    def leading(self) -> bool:
        """Whether this bridge publishes the group-wide retained messages (stats,
        discovery): always alone, one worker at a time in a group."""
        ...

    def submit(self, device: str, payload: bytes) -> Job | None:
        """Take a request as if device `device` had published it on `P/D/req`."""
        ...

    def emit(self, job: Job, message: dict[str, Any]) -> None:
        """Publish a progress message on the job's reply stream; its `seq` is added."""
        ...

    def job(self, device: str, rid: str) -> Job | None:
        """The running or waiting request `rid` of `device`, if any."""
        ...

    def jobs_running(self) -> tuple[int, int]:
        """(requests streaming from the API, requests waiting for a stream)."""
        ...


class Plugin:
    """Base class: every method does nothing, so a plugin overrides only what it needs."""

    #: Whether `finished` and `next_round` need the reply's whole text (the fold keeps it).
    needs_text: bool = False

    def attach(self, host: Host) -> None:
        """Called once when the bridge is built; subscribe here."""

    def connected(self) -> None:
        """After every (re)connect to the broker."""

    def max_request_bytes(self, device: str) -> int:
        """The largest request this device may send (0: no limit of this plugin's).

        Checked before the payload is parsed, so an oversized request costs nothing.
        """
        return 0

    def admit(self, device: str, request: ChatRequest, size: int) -> None:
        """Before a request is queued: raise ProtocolError to refuse it; may adjust it."""

    def refused(self, device: str, error: ProtocolError) -> None:
        """A request was answered with an error at once (bad, too large, refused, overloaded)."""

    def started(self, job: Job) -> None:
        """A request was accepted (it may still wait for a free stream)."""

    async def prepare(self, job: Job) -> None:
        """It has a stream; before the first API call. May edit `job.body`, or set it
        to None to serve the request without the chat API; raise ProtocolError to end it."""

    def streaming(self, job: Job) -> None:
        """The first piece of the reply was published (or, unstreamed, the API answered)."""

    def text(self, job: Job, text: str) -> None:
        """A piece of reply text was published. Called only on plugins that override it."""

    async def next_round(self, job: Job) -> bool:
        """After a complete API reply: True (with `job.body` extended) to ask again."""
        return False

    async def finishing(self, job: Job) -> None:
        """The reply is complete, before its `done` terminal: add to `job.terminal`."""

    def finished(self, job: Job) -> None:
        """The terminal was published: `job.outcome` is `done` or an error code."""

    def stopping(self) -> None:
        """The bridge is shutting down, still connected."""


def overrides(plugin: Plugin, name: str) -> bool:
    """Whether `plugin` has its own `name` method (the core skips the empty ones)."""
    return getattr(type(plugin), name) is not getattr(Plugin, name)
