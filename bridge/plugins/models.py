"""The models the API offers, on `P/bridge/models` (retained, protocol v2).

Asked (`GET /models`) when the bridge first connects and every hour after,
so a device or Home Assistant can offer a choice; each device's state says
which of them its policy allows (`models_for`). A failed listing is retried
with backoff and leaves the last retained list as it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bridge.core.errors import ProtocolError
from bridge.core.plugin import Plugin

if TYPE_CHECKING:
    from bridge.core.plugin import Host
    from bridge.core.settings import Settings

log = logging.getLogger("bridge.plugins.models")

#: Seconds between two listings.
REFRESH = 3600.0
#: Seconds before the first retry of a failed listing (doubling up to REFRESH).
RETRY = 15.0


class ModelsPlugin(Plugin):
    """Lists the API's models and publishes them (retained) on `P/bridge/models`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.available: list[str] | None = None  #: None until the API has answered once
        self._task: asyncio.Task[None] | None = None

    def attach(self, host: Host) -> None:
        self.host = host

    def connected(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh())
        elif self.available is not None:
            self._publish()

    def stopping(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def models_for(self, device: str) -> list[str]:
        """The models `device` may ask for: its policy's `models`, else all the API lists
        (else just the default model, until the API has answered)."""
        allowed = self.settings.policy.limits(device).models
        if allowed:
            return list(allowed)
        return list(self.available) if self.available else [self.settings.openai_model]

    async def _refresh(self) -> None:
        wait = RETRY
        while True:
            try:
                self.available = await self.host.upstream.models()
            except ProtocolError as exc:
                log.warning("could not list the API's models (again in %.0f s): %s",
                            wait, exc.message)  # fmt: skip
                await asyncio.sleep(wait)
                wait = min(wait * 2, REFRESH)
                continue
            wait = RETRY
            self._publish()
            await asyncio.sleep(REFRESH)

    def _publish(self) -> None:
        if self.available is None or not self.host.connected:
            return
        payload = {
            "models": self.available,
            "default": self.settings.openai_model,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        self.host.publish(self.host.topics.models, data, qos=1, retain=True)
