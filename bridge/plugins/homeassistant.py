"""Home Assistant MQTT discovery: every device the bridge knows appears in HA with no YAML.

One retained device-based discovery config per device
(`<ha_prefix>/device/<node>/<D>/config`, with `cmps`), one for the bridge
itself, all available while `P/bridge/status` is `online`. The entities read
the retained `P/D/state`, `P/D/event` and `P/bridge/stats` that
`bridge.plugins.state` publishes; the text entity writes `P/D/ask`, which this plugin
turns into a request for device D. docs/protocol.md describes the topics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from importlib import metadata
from typing import TYPE_CHECKING, Any

from bridge.core import protocol as p
from bridge.core.plugin import Inbound, Plugin
from bridge.core.topics import Topics
from bridge.plugins.state import EVENT_TYPES, StatePlugin

if TYPE_CHECKING:
    from bridge.core.job import Job
    from bridge.core.plugin import Host
    from bridge.core.settings import Settings

log = logging.getLogger("bridge.plugins.homeassistant")

#: Seconds after the subscriptions are granted to let the retained configs and
#: states arrive (the broker sends them at once) before the bridge decides which
#: devices it knows and which configs are stale.
SETTLE = 0.5
#: HA caps an entity's state at 255 characters; the full text is an attribute.
HA_STATE_MAX = 255
REPLY_TEMPLATE = "{{ (value_json.reply or value_json.refusal or '')[:255] }}"
MANUFACTURER = "llm-mqtt-bridge"


def _version() -> str:
    try:
        return metadata.version("llm-mqtt-bridge")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def node_id(prefix: str) -> str:
    """The discovery node id for a topic prefix: HA allows only `A-Z a-z 0-9 _ -`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix)


#: The session of plain-text questions asked through `P/D/ask` (one per device).
ASK_SESSION = "ha"


class HomeAssistantPlugin(Plugin):
    """Publishes discovery, re-publishes it when HA comes online, serves the text entity.

    Known devices are those in `BRIDGE_DEVICES`, those that asked, and those
    with a retained `P/D/state`. A discovery config found at the broker for a
    device that is none of these is removed (empty retained); a device whose
    config HA deletes (its "Delete" button) is forgotten, state included.
    """

    def __init__(self, settings: Settings, state: StatePlugin) -> None:
        self.prefix = settings.topic_prefix
        self.ha_prefix = settings.ha_prefix
        self.node = node_id(settings.topic_prefix)
        self.configured = settings.known_devices
        # Plain-text questions from HA continue one conversation per device (protocol v2).
        self.ask_session = ASK_SESSION if settings.sessions else None
        self.state = state
        self.topics = Topics(settings.topic_prefix)
        self.known: set[str] = set()
        self.retained_configs: set[str] = set()
        self.ready = False
        self.host: Host | None = None
        self._settle: asyncio.Task[None] | None = None
        self.origin = {"name": MANUFACTURER, "sw": _version()}
        self._config_re = re.compile(
            re.escape(f"{self.ha_prefix}/device/{self.node}/") + r"([A-Za-z0-9_-]+)/config"
        )

    # --- topics -------------------------------------------------------------------------

    def config_topic(self, device: str) -> str:
        return f"{self.ha_prefix}/device/{self.node}/{device}/config"

    @property
    def bridge_config_topic(self) -> str:
        return self.config_topic("bridge")

    @property
    def birth_topic(self) -> str:
        return f"{self.ha_prefix}/status"

    # --- the discovery payloads ---------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        return {
            "o": self.origin,
            "availability_topic": self.topics.status,
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
        }

    def device_config(self, device: str) -> dict[str, Any]:
        """The device-based discovery config of device D."""
        state = self.topics.state(device)
        uid = f"{self.node}_{device}"
        return {
            "dev": {
                "identifiers": [uid],
                "name": device,
                "manufacturer": MANUFACTURER,
                "model": "LLM device",
                "via_device": f"{self.node}_bridge",
            },
            **self._common(),
            "cmps": {
                "status": {
                    "p": "sensor",
                    "name": "Status",
                    "unique_id": f"{uid}_status",
                    "state_topic": state,
                    "value_template": "{{ value_json.status }}",
                    "icon": "mdi:robot",
                },
                "reply": {
                    "p": "sensor",
                    "name": "Last reply",
                    "unique_id": f"{uid}_reply",
                    "state_topic": state,
                    "value_template": REPLY_TEMPLATE,
                    "json_attributes_topic": state,
                    "icon": "mdi:message-reply-text",
                },
                "event": {
                    "p": "event",
                    "name": "Reply",
                    "unique_id": f"{uid}_event",
                    "state_topic": self.topics.event(device),
                    "event_types": list(EVENT_TYPES),
                    "icon": "mdi:message-flash",
                },
                "ask": {
                    "p": "text",
                    "name": "Ask",
                    "unique_id": f"{uid}_ask",
                    "command_topic": self.topics.ask(device),
                    "min": 1,
                    "max": HA_STATE_MAX,
                    "mode": "text",
                    "icon": "mdi:chat-question",
                },
            },
        }

    def bridge_config(self) -> dict[str, Any]:
        """The bridge as a device: its counters, available while it is online."""
        uid = f"{self.node}_bridge"

        def counter(key: str, name: str, icon: str, **extra: Any) -> dict[str, Any]:
            return {
                "p": "sensor",
                "name": name,
                "unique_id": f"{uid}_{key}",
                "value_template": f"{{{{ value_json.{key} }}}}",
                "icon": icon,
                **extra,
            }

        return {
            "dev": {
                "identifiers": [uid],
                "name": f"LLM bridge ({self.prefix})",
                "manufacturer": MANUFACTURER,
                "model": "MQTT to OpenAI-compatible bridge",
                "sw_version": _version(),
            },
            **self._common(),
            "state_topic": self.topics.stats,
            "cmps": {
                "requests": counter(
                    "requests", "Requests", "mdi:message-processing", state_class="total_increasing"
                ),
                "tokens_today": counter(
                    "tokens_today",
                    "Tokens today",
                    "mdi:counter",
                    state_class="total_increasing",
                    unit_of_measurement="tokens",
                ),
                "errors": counter(
                    "errors", "Errors", "mdi:alert-circle", state_class="total_increasing"
                ),
                "active": counter(
                    "active", "Active requests", "mdi:progress-clock", state_class="measurement"
                ),
            },
        }

    # --- plugin -------------------------------------------------------------------------

    def attach(self, host: Host) -> None:
        self.host = host
        host.subscribe(self.birth_topic, self._on_birth, qos=0)
        host.subscribe(f"{self.ha_prefix}/device/{self.node}/+/config", self._on_config, qos=0)
        host.subscribe(host.topics.device_filter("ask"), self._on_ask, qos=1)

    def connected(self) -> None:
        if self._settle is None or self._settle.done():
            self._settle = asyncio.get_running_loop().create_task(self._after_settle())

    def _on_birth(self, msg: Inbound) -> None:
        if msg.payload.strip().lower() == b"online" and self.ready:
            log.info("Home Assistant is online: publishing discovery again")
            self.publish_all()

    def _on_config(self, msg: Inbound) -> None:
        m = self._config_re.fullmatch(msg.topic)
        if m is None:
            return
        device = m.group(1)
        if device == "bridge" or not p.valid_device_id(device):
            return
        if msg.payload:
            if msg.retain:
                self.retained_configs.add(device)
        else:
            self.retained_configs.discard(device)
            if device in self.known:
                # Our own removals leave `known` first: this one came from someone
                # else, normally Home Assistant's "Delete" of the device.
                self.forget(device, clear_config=False)

    def started(self, job: Job) -> None:
        if self.ready and job.device not in self.known:
            self.publish_device(job.device)

    def stopping(self) -> None:
        if self._settle is not None:
            self._settle.cancel()

    # --- publishing ---------------------------------------------------------------------

    async def _after_settle(self) -> None:
        assert self.host is not None
        await self.host.subscribed()
        await asyncio.sleep(SETTLE)
        self.reconcile()

    def reconcile(self) -> None:
        """Publish discovery for every known device; remove the configs of unknown ones."""
        devices = set(self.configured) | set(self.state.devices)
        devices = {d for d in devices if p.valid_device_id(d)}
        stale = self.retained_configs - devices
        for device in sorted(stale):
            log.info("removing Home Assistant discovery of unknown device %s", device)
            self._publish(self.config_topic(device), b"")
            self.retained_configs.discard(device)
        self.known = devices
        self.ready = True
        self.publish_all()

    def publish_all(self) -> None:
        self._publish(self.bridge_config_topic, self.bridge_config())
        for device in sorted(self.known):
            self.publish_device(device)

    def publish_device(self, device: str) -> None:
        self.known.add(device)
        self._publish(self.config_topic(device), self.device_config(device))

    def forget(self, device: str, *, clear_config: bool = True) -> None:
        """Remove a device from Home Assistant and drop its retained state."""
        self.known.discard(device)
        if clear_config:
            self._publish(self.config_topic(device), b"")
        self.state.forget(device)
        note = " (it is in BRIDGE_DEVICES: it comes back at the next start)"
        log.info("forgot device %s%s", device, note if device in self.configured else "")

    def _publish(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        if self.host is None or not self.host.connected:
            return
        data = (
            payload
            if isinstance(payload, bytes)
            else json.dumps(payload, separators=(",", ":")).encode()
        )
        self.host.publish(topic, data, qos=1, retain=True)

    # --- the text entity ----------------------------------------------------------------

    def _on_ask(self, msg: Inbound) -> None:
        """`P/D/ask`: a question for device D from Home Assistant (or any integration).

        Plain text is the prompt; a JSON object is a whole protocol request.
        The reply goes to `P/D/res/<id>` (ids made here start with `ha-`) and
        into D's state and events like any other. With sessions on, plain-text
        questions continue D's session `ha`, so a conversation from HA has memory.
        A retained question is not asked again at every start.
        """
        host = self.host
        parsed = self.topics.parse(msg.topic)
        text = msg.payload.strip()
        if host is None or parsed is None or msg.retain:
            return
        device = parsed[0]
        if not p.valid_device_id(device) or not text:
            log.warning("ignored ask on %r", msg.topic[:200])
        elif text.startswith(b"{"):
            host.submit(device, msg.payload)
        else:
            try:
                prompt = text.decode()
            except UnicodeDecodeError:
                log.warning("ignored ask for %s: not UTF-8", device)
                return
            body = {"id": f"ha-{os.urandom(5).hex()}", "prompt": prompt}
            if self.ask_session is not None:
                body["session"] = self.ask_session
            host.submit(device, json.dumps(body, ensure_ascii=False).encode())
