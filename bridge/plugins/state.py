"""Retained state for integrations: `P/D/state` per device, `P/D/event`, `P/bridge/stats`.

A device's state is published (retained) on every change of its status
(`idle`, `thinking`, `streaming`, `error`) and when a reply ends, never per
chunk, so a dashboard that connects late still sees the last reply. The
bridge's own counters (requests, errors, tokens today) go to
`P/bridge/stats`, at most once a second. docs/protocol.md describes both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bridge.core import protocol as p
from bridge.core.plugin import Inbound, Plugin
from bridge.core.topics import Topics

if TYPE_CHECKING:
    from bridge.core.job import Job
    from bridge.core.plugin import Host
    from bridge.core.settings import Settings
    from bridge.plugins.models import ModelsPlugin
    from bridge.plugins.usage import UsagePlugin

log = logging.getLogger("bridge.plugins.state")

IDLE = "idle"
THINKING = "thinking"
STREAMING = "streaming"
ERROR = "error"
STATUSES = (IDLE, THINKING, STREAMING, ERROR)

#: Event types on `P/D/event` (the Home Assistant event entity's `event_types`).
REPLY_COMPLETE = "reply_complete"
EVENT_ERROR = "error"
EVENT_TYPES = (REPLY_COMPLETE, EVENT_ERROR)

#: The reply kept in a retained state is cut here (characters); `truncated` says so.
MAX_STATE_REPLY = 32_768
#: The question kept in a state (characters).
MAX_QUESTION = 1_024
#: Seconds between two publishes of the bridge's counters.
STATS_INTERVAL = 1.0
#: Seconds after the first subscription during which the retained counters are read back.
RESTORE_WINDOW = 0.5


_now_second = -1
_now_text = ""


def now_iso() -> str:
    """The current time, UTC, ISO 8601 to the second: made once a second, since every
    state and event carries it."""
    global _now_second, _now_text  # a one-entry cache of this function
    second = int(time.time())
    if second != _now_second:
        _now_second, _now_text = second, datetime.fromtimestamp(second, UTC).isoformat()
    return _now_text


def _today() -> str:
    return datetime.now().astimezone().date().isoformat()


def _busy(device: str) -> str:
    """The key under which a group's store counts a device's running requests for its
    state: apart from the policy's `max_streams` count (a device id has no `/`)."""
    return f"{device}/state"


def question_of(request: p.ChatRequest) -> str | None:
    """The text a person would call the question: the prompt or the last user message."""
    if request.prompt is not None:
        return request.prompt[:MAX_QUESTION]
    if request.image is not None:  # a picture asked for (docs/protocol.md "Pictures")
        return request.image.prompt[:MAX_QUESTION]
    for msg in reversed(request.messages or []):
        if msg.role != "user":
            continue
        if isinstance(msg.content, str):
            return msg.content[:MAX_QUESTION]
        if isinstance(msg.content, list):
            texts = [part.text for part in msg.content if isinstance(part, p.TextPart)]
            return " ".join(texts)[:MAX_QUESTION]
        return None
    return None


@dataclass
class DeviceState:
    """What `P/D/state` says about one device, plus the requests it has running.

    `reply`, `refusal`, `finish_reason`, `usage`, `model` and `replied_at`
    belong to the last request that ended with `done`; `request_id` and
    `error` to the request the status is about.
    """

    status: str = IDLE
    request_id: str | None = None
    question: str | None = None
    reply: str | None = None
    truncated: bool = False
    refusal: str | None = None
    finish_reason: str | None = None
    usage: Any = None
    model: str | None = None
    error: dict[str, Any] | None = None
    replied_at: str | None = None
    time: str | None = None
    #: request id -> whether its first piece was published (not in the payload).
    active: dict[str, bool] = field(default_factory=dict)
    #: request id -> its question, while it runs (not in the payload).
    questions: dict[str, str | None] = field(default_factory=dict)
    #: whether this process published the state (a retained one is then older).
    published: bool = False
    #: in a worker group: requests of the device other workers run (not in the payload).
    elsewhere: int = 0

    def current_status(self) -> str:
        if self.active:
            return STREAMING if any(self.active.values()) else THINKING
        if self.elsewhere:
            return THINKING  # another worker of the group still serves this device
        return ERROR if self.error else IDLE

    def payload(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "request_id": self.request_id,
            "question": self.question,
            "reply": self.reply,
            "truncated": self.truncated,
            "refusal": self.refusal,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "model": self.model,
            "error": self.error,
            "replied_at": self.replied_at,
            "active": len(self.active),
            "time": self.time,
        }

    def load(self, data: dict[str, Any]) -> None:
        """Take the last reply (and what it said) from a retained state."""
        for key in ("request_id", "question", "reply", "refusal", "finish_reason", "model"):
            value = data.get(key)
            if value is None or isinstance(value, str):
                setattr(self, key, value)
        self.truncated = data.get("truncated") is True
        self.usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        err = data.get("error")
        self.error = err if isinstance(err, dict) else None
        if isinstance(data.get("replied_at"), str):
            self.replied_at = data["replied_at"]
        if data.get("status") in STATUSES:
            self.status = data["status"]


@dataclass
class Stats:
    """The bridge's counters on `P/bridge/stats`."""

    requests: int = 0
    errors: int = 0
    tokens_total: int = 0
    tokens_today: int = 0
    day: str = field(default_factory=_today)
    restored: bool = False

    def roll(self) -> None:
        today = _today()
        if today != self.day:
            self.day = today
            self.tokens_today = 0


class StatePlugin(Plugin):
    """Publishes `P/D/state` (retained), `P/D/event` and `P/bridge/stats` (retained).

    At start it reads the retained states back: a device whose state still
    says `thinking` or `streaming` lost its request when the bridge stopped,
    and gets `error` with code `interrupted`; the counters continue from the
    retained `P/bridge/stats` (tokens today only if it is still the same day).

    At most `BRIDGE_STATE_MAX_DEVICES` devices are kept in memory: past that,
    the least recently active idle device is forgotten here (its retained
    state stays at the broker), so new device ids cost bounded memory.
    """

    needs_text = True

    def __init__(
        self,
        settings: Settings,
        usage: UsagePlugin | None = None,
        models: ModelsPlugin | None = None,
    ) -> None:
        """`usage` adds `usage_stats` to the states and the counters; `models` adds the
        models each device may ask for to its state."""
        self.usage = usage
        self.models = models
        self.prefix = settings.topic_prefix
        self.topics = Topics(settings.topic_prefix)
        self.worker = settings.client_id
        self.max_devices = settings.state_max_devices
        self.devices: OrderedDict[str, DeviceState] = OrderedDict()
        self.stats = Stats()
        self.started_at = now_iso()
        self.host: Host | None = None
        self._stats_timer: asyncio.TimerHandle | None = None
        self._stats_due = 0.0
        self._day_timer: asyncio.TimerHandle | None = None
        self._restoring: asyncio.Task[None] | None = None
        self._applied = False
        self._last_stats: dict[str, Any] | None = None

    def _token(self, job: Job) -> str:
        return f"{self.worker}/{job.rid}"

    # --- plugin ---------------------------------------------------------------------------

    def attach(self, host: Host) -> None:
        self.host = host
        # In a worker group the counters are the group's, kept in its store, and the
        # leader publishes them (docs/scaling.md).
        self.shared = host.shared
        host.subscribe(host.topics.stats, self._on_stats, qos=0)
        host.subscribe(host.topics.device_filter("state"), self._on_state, qos=0)

    def connected(self) -> None:
        if not self.stats.restored and self._restoring is None:
            self._restoring = asyncio.get_running_loop().create_task(self._restore_window())
        self._publish_stats_soon()

    async def _restore_window(self) -> None:
        """The retained counters come right after the subscription is granted; any
        later ones (after a reconnect) are our own. No counters go out before."""
        assert self.host is not None
        await self.host.subscribed()
        await asyncio.sleep(RESTORE_WINDOW)
        self.stats.restored = True
        self._publish_stats_soon()
        # Read for their retained messages only: every later message on them is a
        # copy of this bridge's (or a peer's) own publish, one per state change.
        for topic_filter in (self.topics.stats, self.topics.device_filter("state")):
            await self.host.unsubscribe(topic_filter)

    def started(self, job: Job) -> None:
        self.stats.requests += 1
        if self.shared is not None:
            self.shared.add_counts({"requests": 1})
            self.shared.open_stream(_busy(job.device), job.rid, self._token(job), self.worker, 0)
        dev = self._device(job.device)
        dev.active[job.rid] = False
        dev.request_id = job.rid
        dev.question = dev.questions[job.rid] = question_of(job.request)
        dev.error = None
        self._changed(job.device, dev)
        self._publish_stats_soon()

    def streaming(self, job: Job) -> None:
        dev = self.devices.get(job.device)
        if dev is None or job.rid not in dev.active:
            return
        dev.active[job.rid] = True
        self._changed(job.device, dev)

    def finished(self, job: Job) -> None:
        outcome, usage = job.outcome, job.reported_usage
        dev = self._device(job.device)
        dev.active.pop(job.rid, None)
        if job.rid in dev.questions:
            dev.question = dev.questions.pop(job.rid)
        now = now_iso()
        fold = job.fold
        event: dict[str, Any]
        if outcome == "done" and fold is not None:
            text = fold.text
            dev.reply = text[:MAX_STATE_REPLY]
            dev.truncated = len(text) > MAX_STATE_REPLY
            dev.refusal = fold.refusal
            dev.finish_reason = fold.finish_reason
            dev.usage = usage
            dev.model = fold.model
            dev.error = None
            dev.replied_at = now
            event = {
                "event_type": REPLY_COMPLETE,
                "request_id": job.rid,
                "text": text,
                "refusal": fold.refusal,
                "finish_reason": fold.finish_reason,
                "usage": usage,
                "model": fold.model,
            }
        else:
            self.stats.errors += 1
            message = job.error.message if job.error is not None else None
            dev.error = {"code": outcome, "message": message}
            event = {
                "event_type": EVENT_ERROR,
                "request_id": job.rid,
                "code": outcome,
                "message": message,
                "usage": usage,
            }
        dev.request_id = job.rid
        self.stats.roll()
        tokens = job.tokens_used
        self.stats.tokens_total += tokens
        self.stats.tokens_today += tokens
        if self.shared is not None:
            error = 0 if outcome == "done" and fold is not None else 1
            self.shared.add_counts(
                {"errors": error, "tokens_total": tokens, f"tokens:{self.stats.day}": tokens}
            )
        if self.shared is not None:
            # A device's requests may run on several workers: it is idle when none runs.
            dev.elsewhere = self.shared.close_stream(_busy(job.device), job.rid, self._token(job))
        self._changed(job.device, dev, force=True)
        event["time"] = now
        self._publish(self.topics.event(job.device), event, retain=False)
        self._publish_stats_soon()

    def stopping(self) -> None:
        if self._restoring is not None:
            self._restoring.cancel()
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        if self._day_timer is not None:
            self._day_timer.cancel()
            self._day_timer = None
        self._publish_stats()

    # --- publishing ---------------------------------------------------------------------

    def _device(self, device: str) -> DeviceState:
        """The device's state, made if new; the least recently active idle ones go first."""
        dev = self.devices.get(device)
        if dev is not None:
            self.devices.move_to_end(device)
            return dev
        dev = self.devices[device] = DeviceState()
        if len(self.devices) > self.max_devices:
            for name, old in self.devices.items():
                if not old.active and name != device:
                    del self.devices[name]
                    break
        return dev

    def forget(self, device: str) -> None:
        """Remove a device's retained state."""
        self.devices.pop(device, None)
        if self.host is not None and self.host.connected:
            self.host.publish(self.topics.state(device), b"", qos=1, retain=True)

    def _changed(self, device: str, dev: DeviceState, *, force: bool = False) -> None:
        status = dev.current_status()
        if status == dev.status and not force and dev.published:
            return
        dev.status = status
        dev.time = now_iso()
        dev.published = True
        payload = dev.payload()
        if self.usage is not None:
            stats = self.usage.device(device, create=False)
            payload["usage_stats"] = stats.payload() if stats is not None else None
        if self.models is not None:
            payload["models"] = self.models.models_for(device)
        self._publish(self.topics.state(device), payload, retain=True)

    def _publish(self, topic: str, payload: dict[str, Any], *, retain: bool) -> None:
        if self.host is None:
            return
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        self.host.publish(topic, data, qos=1, retain=retain)

    def stats_payload(self) -> dict[str, Any]:
        self.stats.roll()
        active = sum(len(d.active) for d in self.devices.values())
        extra = {} if self.usage is None else {"usage_stats": self.usage.overall.payload()}
        st = self.stats
        requests, errors, today, total = st.requests, st.errors, st.tokens_today, st.tokens_total
        if self.shared is not None:
            c = self.shared.counts()
            requests, errors = c.get("requests", 0), c.get("errors", 0)
            today, total = c.get(f"tokens:{st.day}", 0), c.get("tokens_total", 0)
        return {
            **extra,
            "requests": requests,
            "errors": errors,
            "tokens_today": today,
            "tokens_total": total,
            "day": self.stats.day,
            "active": active,
            "devices": len(self.devices),
            "started": self.started_at,
            "time": now_iso(),
        }

    def _publish_stats_soon(self) -> None:
        """Publish the counters now, or at the end of the current interval (coalesced)."""
        if self._stats_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.0, self._stats_due - time.monotonic())
        self._stats_timer = loop.call_later(delay, self._publish_stats)
        self._arm_day_timer(loop)

    def _publish_stats(self) -> None:
        self._stats_timer = None
        self._stats_due = time.monotonic() + STATS_INTERVAL
        if (
            self.stats.restored
            and self.host is not None
            and self.host.connected
            and getattr(self.host, "leading", True)
        ):
            payload = self.stats_payload()
            same = {k: v for k, v in payload.items() if k != "time"}
            if self.shared is None or same != self._last_stats:
                self._publish(self.topics.stats, payload, retain=True)
                self._last_stats = same
        if self.shared is not None and self.host is not None and self.host.accepting:
            # In a group the other workers' requests change the counters too: the
            # leader reads them every interval (and publishes them when they changed).
            self._publish_stats_soon()

    def _arm_day_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """At local midnight `tokens_today` starts again from 0: publish it then."""
        if self._day_timer is not None:
            return
        now = datetime.now().astimezone()
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        seconds = 86_400 - (now - midnight).total_seconds() + 1

        def fire() -> None:
            self._day_timer = None
            self._publish_stats_soon()

        self._day_timer = loop.call_later(seconds, fire)

    # --- retained messages read back ----------------------------------------------------

    def _on_state(self, msg: Inbound) -> None:
        """A retained `P/D/state`: learn the device and its last reply, fix a stale status."""
        device = msg.topic[len(self.prefix) + 1 :].split("/", 1)[0]
        if not msg.retain or not msg.payload or not p.valid_device_id(device):
            return
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        dev = self.devices.get(device)
        if dev is not None and dev.published:
            if dev.reply is None and dev.replied_at is None:
                active, status = dev.active, dev.status
                dev.load(data)
                dev.active, dev.status = active, status
            return
        dev = self._device(device)
        dev.load(data)
        dev.published = False
        # In a group another worker may be serving it now: its own journal answers it.
        if dev.status in (THINKING, STREAMING) and not dev.active and self.shared is None:
            log.info("state: %s was %s when the bridge stopped; now error", device, dev.status)
            dev.error = {
                "code": p.INTERRUPTED,
                "message": "the bridge stopped during the request",
            }
            self._changed(device, dev, force=True)

    def _on_stats(self, msg: Inbound) -> None:
        """The retained counters of the previous run: continue from them (once)."""
        if not msg.retain or not msg.payload or self.stats.restored or self._applied:
            return
        if self.shared is not None:
            return  # a group's counters live in its store
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        self._applied = True

        def count(key: str) -> int:
            value = data.get(key)
            return value if isinstance(value, int) and value >= 0 else 0

        self.stats.requests += count("requests")
        self.stats.errors += count("errors")
        self.stats.tokens_total += count("tokens_total")
        if data.get("day") == self.stats.day:
            self.stats.tokens_today += count("tokens_today")
        self._publish_stats_soon()
