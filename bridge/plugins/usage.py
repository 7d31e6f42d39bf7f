"""Usage and latency statistics (ChatAgent's `UsageStats`), per device and overall.

For each device and for the bridge: requests finished, how many ended with
`done` (the success rate), errors by code, and the time to the first chunk
and the duration (p50, p95) over the last `BRIDGE_STATS_WINDOW` requests.
Memory is fixed: a ring of floats per series, and at most
`BRIDGE_STATE_MAX_DEVICES` devices (the least recently active is forgotten).
The state plugin publishes it (`P/D/state`, `P/bridge/stats`), the metrics
plugin serves it to Prometheus.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from bridge.core.plugin import Plugin

if TYPE_CHECKING:
    from bridge.core.errors import ProtocolError
    from bridge.core.job import Job
    from bridge.core.settings import Settings

_NAME = "usage"
#: Error codes counted per device at most (the protocol's list is shorter; plugins add some).
MAX_CODES = 32


class Ring:
    """The last `size` samples (seconds), for percentiles; fixed memory (8 bytes each)."""

    __slots__ = ("_next", "_values", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._values = array("d")
        self._next = 0

    def add(self, value: float) -> None:
        if len(self._values) < self.size:
            self._values.append(value)
        else:
            self._values[self._next] = value
            self._next = (self._next + 1) % self.size

    def __len__(self) -> int:
        return len(self._values)

    def percentile(self, q: float) -> float | None:
        """The nearest-rank `q` percentile (0-100) of the samples, or None without any."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
        return ordered[int(rank) - 1]

    def summary_ms(self) -> dict[str, float] | None:
        if not self._values:
            return None
        p50, p95 = self.percentile(50), self.percentile(95)
        assert p50 is not None and p95 is not None
        return {"p50": round(p50 * 1000, 1), "p95": round(p95 * 1000, 1)}


class UsageStats:
    """One device's (or the bridge's) counters and latency rings."""

    __slots__ = ("_payload", "done", "duration", "errors", "finished", "ttfc")

    def __init__(self, window: int) -> None:
        self.finished = 0
        self.done = 0
        self.errors: dict[str, int] = {}
        self.ttfc = Ring(window)
        self.duration = Ring(window)
        # Made once per change: a device's state is published at every start and
        # stream, and the percentiles sort the rings.
        self._payload: dict[str, Any] | None = None

    def record(self, outcome: str, ttfc: float | None, duration: float | None) -> None:
        self._payload = None
        self.finished += 1
        if outcome == "done":
            self.done += 1
        elif outcome in self.errors or len(self.errors) < MAX_CODES:
            self.errors[outcome] = self.errors.get(outcome, 0) + 1
        if ttfc is not None:
            self.ttfc.add(ttfc)
        if duration is not None:
            self.duration.add(duration)

    @property
    def success_rate(self) -> float | None:
        return round(self.done / self.finished, 4) if self.finished else None

    def payload(self) -> dict[str, Any]:
        """The `usage_stats` object of `P/D/state` and `P/bridge/stats` (docs/protocol.md);
        the same object until the next `record` (callers only serialize it)."""
        if self._payload is not None:
            return self._payload
        self._payload = {
            "finished": self.finished,
            "done": self.done,
            "success_rate": self.success_rate,
            "errors_by_code": dict(self.errors),
            "ttfc_ms": self.ttfc.summary_ms(),
            "duration_ms": self.duration.summary_ms(),
            "window": self.ttfc.size,
        }
        return self._payload


class UsagePlugin(Plugin):
    """Records every request's outcome and latencies; refusals count as errors."""

    def __init__(self, settings: Settings) -> None:
        self.window = settings.stats_window
        self.max_devices = settings.state_max_devices
        self.overall = UsageStats(self.window)
        self.devices: OrderedDict[str, UsageStats] = OrderedDict()

    def device(self, device: str, *, create: bool = True) -> UsageStats | None:
        """A device's statistics (made when new, when `create`); the least recently
        active device is forgotten past `BRIDGE_STATE_MAX_DEVICES`."""
        stats = self.devices.get(device)
        if stats is not None:
            self.devices.move_to_end(device)
            return stats
        if not create:
            return None
        stats = self.devices[device] = UsageStats(self.window)
        if len(self.devices) > self.max_devices:
            self.devices.popitem(last=False)
        return stats

    def refused(self, device: str, error: ProtocolError) -> None:
        self.overall.record(error.code, None, None)
        # A refusal of an unknown device id makes no entry: inventing ids costs nothing.
        stats = self.device(device, create=False)
        if stats is not None:
            stats.record(error.code, None, None)

    def streaming(self, job: Job) -> None:
        job.data[_NAME] = time.monotonic() - job.started

    def finished(self, job: Job) -> None:
        ttfc = job.data.get(_NAME)
        duration = time.monotonic() - job.started
        self.overall.record(job.outcome, ttfc, duration)
        stats = self.device(job.device)
        assert stats is not None
        stats.record(job.outcome, ttfc, duration)
