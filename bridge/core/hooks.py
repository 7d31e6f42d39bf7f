"""Extension points of the bridge: policy, state, Home Assistant and metrics plug in here.

A hook sees each request at four moments (admission, start, first piece,
finish) and may subscribe to topics of its own. The service calls hooks
in order; a hook that raises is logged and skipped, never fatal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paho.mqtt.client as paho

    from bridge.core.protocol import ChatRequest
    from bridge.core.service import Bridge, Job


class Refusal(Exception):
    """Raised by `Hooks.admit` to refuse a request with a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Hooks:
    """Base class: every method does nothing, so a hook overrides only what it needs."""

    #: Whether `finished` needs the whole reply text (the fold then keeps it).
    needs_text: bool = False

    def attach(self, bridge: Bridge) -> None:
        """Called once when the bridge is built."""

    def subscriptions(self) -> list[tuple[str, int]]:
        """Extra topic filters this hook wants messages from."""
        return []

    def message(self, msg: paho.MQTTMessage) -> bool:
        """A message on a topic outside the protocol's; return True if it was handled."""
        return False

    def connected(self) -> None:
        """After every (re)connect to the broker."""

    def admit(self, device: str, request: ChatRequest, size: int) -> None:
        """Before a request is queued: raise Refusal to refuse it; may adjust `request`."""

    def refused(self, device: str, code: str) -> None:
        """A request was answered with an error at once (bad, too large, refused, overloaded)."""

    def started(self, job: Job) -> None:
        """A request was accepted (it may still wait for a free stream)."""

    def streaming(self, job: Job) -> None:
        """The first piece of the reply was published (or, unstreamed, the API answered)."""

    def finished(self, job: Job, outcome: str, usage: Any) -> None:
        """The terminal was published; `outcome` is `done` or an error code.

        `job.fold` holds the reply (its text when `needs_text`), or is None when
        the request never reached the API.
        """

    def stopping(self) -> None:
        """The bridge is shutting down, still connected."""
