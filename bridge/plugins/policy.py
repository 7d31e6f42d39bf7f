"""Per-device policy: allowed models, a `max_tokens` cap, request size, rate, daily budget, streams.

The limits come from the `policy` section of the configuration (`BRIDGE_POLICY`,
or `[policy]` in the config file): `policy.default` for every device, and
`policy.devices.<id>` for the fields one device has differently. A refused
request gets an error terminal with its own code (docs/protocol.md). The
request and token counters live in SQLite in `BRIDGE_DATA_DIR`, so a restart
of the bridge does not hand every device a fresh minute or a fresh day.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.core.errors import ProtocolError
from bridge.core.plugin import Plugin
from bridge.core.settings import PolicyConfig
from bridge.core.shared import use_wal

if TYPE_CHECKING:
    from bridge.core.job import Job
    from bridge.core.plugin import Host
    from bridge.core.protocol import ChatRequest
    from bridge.core.settings import Settings
    from bridge.core.shared import Guarded

log = logging.getLogger("bridge.plugins.policy")

RATE_LIMITED = "rate_limited"
BUDGET_EXCEEDED = "budget_exceeded"
MODEL_NOT_ALLOWED = "model_not_allowed"
TOO_MANY_STREAMS = "too_many_streams"

COUNTERS_FILE = "counters.sqlite3"
_WINDOW = 60.0


def utc_day(now: float) -> str:
    """The UTC date the daily budget is counted in, `YYYY-MM-DD`."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


class Counters:
    """Requests (for the per-minute rate) and tokens (per UTC day) per device, in SQLite."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # timeout: workers of a group open the same file at once (the first sets WAL).
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        use_wal(self.db)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS requests (device TEXT NOT NULL, at REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS requests_by_device ON requests (device, at);
            CREATE TABLE IF NOT EXISTS usage (
                device TEXT NOT NULL,
                day TEXT NOT NULL,
                requests INTEGER NOT NULL DEFAULT 0,
                tokens INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (device, day)
            );
            """
        )

    def close(self) -> None:
        self.db.close()

    def requests_since(self, device: str, since: float) -> list[float]:
        """The times of this device's requests after `since`, oldest first."""
        rows = self.db.execute(
            "SELECT at FROM requests WHERE device = ? AND at > ? ORDER BY at", (device, since)
        )
        return [float(r[0]) for r in rows]

    def add_request(self, device: str, now: float) -> None:
        day = utc_day(now)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO requests VALUES (?, ?)", (device, now))
            self.db.execute("DELETE FROM requests WHERE at < ?", (now - _WINDOW,))
            self.db.execute(
                "INSERT INTO usage (device, day, requests) VALUES (?, ?, 1) "
                "ON CONFLICT (device, day) DO UPDATE SET requests = requests + 1",
                (device, day),
            )

    def add_tokens(self, device: str, tokens: int, now: float) -> None:
        self.db.execute(
            "INSERT INTO usage (device, day, tokens) VALUES (?, ?, ?) "
            "ON CONFLICT (device, day) DO UPDATE SET tokens = tokens + excluded.tokens",
            (device, utc_day(now), tokens),
        )

    def tokens(self, device: str, day: str) -> int:
        row = self.db.execute(
            "SELECT tokens FROM usage WHERE device = ? AND day = ?", (device, day)
        ).fetchone()
        return int(row[0]) if row else 0

    def usage(self, day: str) -> dict[str, tuple[int, int]]:
        """Every device's (requests, tokens) on `day`."""
        rows = self.db.execute("SELECT device, requests, tokens FROM usage WHERE day = ?", (day,))
        return {str(d): (int(r), int(t)) for d, r, t in rows}


class PolicyPlugin(Plugin):
    """Applies `settings.policy` at admission and counts what each device spent.

    The size limit (`too_large`) is applied by the core before parsing
    (`max_request_bytes`); then, in order: model (`model_not_allowed`), requests
    running or waiting (`too_many_streams`), requests in the last 60 s
    (`rate_limited`), tokens this UTC day (`budget_exceeded`). An admitted
    request's `max_tokens` (or `max_completion_tokens`) is lowered to the cap,
    or set to it when the device gave none.
    """

    def __init__(
        self,
        settings: Settings,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.policy: PolicyConfig = settings.policy
        self.clock = clock
        if counters is None and self.policy.counts:
            counters = Counters(Path(settings.data_dir) / COUNTERS_FILE)
        # The group's store (below) takes the counters' place in a worker group.
        self.counters: Counters | Guarded | None = counters
        self.streams: Counter[str] = Counter()
        self._host: Host | None = None
        # In a worker group: the group's store counts streams and requests of
        # every worker (bridge/core/shared.py); None for a bridge alone.
        self.shared: Guarded | None = None
        self.worker = settings.client_id
        self._pending: tuple[str, str, str] | None = None

    def attach(self, host: Host) -> None:
        self._host = host
        shared = host.shared
        if shared is not None:
            self.shared = shared
            # A worker that starts under this id replaces one that died: its streams ended.
            shared.drop_worker(self.worker)
            if self.counters is not None:
                self.counters.close()
                self.counters = shared

    def _running(self, device: str, rid: str | None) -> bool:
        return (
            rid is not None and self._host is not None and self._host.job(device, rid) is not None
        )

    def max_request_bytes(self, device: str) -> int:
        return self.policy.limits(device).max_request_bytes

    def admit(self, device: str, request: ChatRequest, size: int) -> None:
        lim = self.policy.limits(device)
        model = request.model or self.settings.openai_model
        if request.image is not None:  # a picture: the image API's model is what it costs
            model = request.image.model or self.settings.openai_image_model
        if lim.models and model not in lim.models:
            raise ProtocolError(
                MODEL_NOT_ALLOWED,
                f"model {model[:80]!r} is not allowed for this device; "
                f"allowed: {', '.join(lim.models)}",
            )
        # A request reusing the id of one still running replaces it (or is its
        # duplicate delivery): it does not add a stream.
        if lim.max_streams and self.shared is not None:
            token = uuid.uuid4().hex
            key = request.id or token
            running = self.shared.open_stream(device, key, token, self.worker, lim.max_streams)
            if running >= 0:
                raise ProtocolError(
                    TOO_MANY_STREAMS,
                    f"this device already has {running} requests running or "
                    f"waiting (at most {lim.max_streams}); wait for one to finish",
                )
            # submit() runs admit -> started (or refused) in one go: this is that request's.
            self._pending = (device, key, token)
        elif (
            lim.max_streams
            and self.streams[device] >= lim.max_streams
            and not self._running(device, request.id)
        ):
            raise ProtocolError(
                TOO_MANY_STREAMS,
                f"this device already has {self.streams[device]} requests running or "
                f"waiting (at most {lim.max_streams}); wait for one to finish",
            )
        now = self.clock()
        if lim.requests_per_minute and self.counters is not None:
            recent = self.counters.requests_since(device, now - _WINDOW)
            if len(recent) >= lim.requests_per_minute:
                wait = max(recent[-lim.requests_per_minute] + _WINDOW - now, 0.0)
                raise ProtocolError(
                    RATE_LIMITED,
                    f"at most {lim.requests_per_minute} requests a minute; "
                    f"try again in {wait:.0f} s",
                )
        if lim.tokens_per_day and self.counters is not None:
            used = self.counters.tokens(device, utc_day(now))
            if used >= lim.tokens_per_day:
                raise ProtocolError(
                    BUDGET_EXCEEDED,
                    f"this device used {used} of its {lim.tokens_per_day} tokens for today "
                    "(the day ends at 00:00 UTC)",
                )
        if lim.max_tokens:
            if request.max_completion_tokens is not None:
                request.max_completion_tokens = min(request.max_completion_tokens, lim.max_tokens)
            if request.max_tokens is not None or request.max_completion_tokens is None:
                request.max_tokens = min(request.max_tokens or lim.max_tokens, lim.max_tokens)

    def refused(self, device: str, error: ProtocolError) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and self.shared is not None:
            self.shared.close_stream(*pending)

    def started(self, job: Job) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == job.device:
            job.data["policy"] = pending
        self.streams[job.device] += 1
        if self.counters is not None:
            self.counters.add_request(job.device, self.clock())

    def finished(self, job: Job) -> None:
        opened = job.data.get("policy")
        if opened is not None and self.shared is not None:
            self.shared.close_stream(*opened)
        self.streams[job.device] -= 1
        if self.streams[job.device] <= 0:
            del self.streams[job.device]
        # What was consumed, whatever the outcome: the providers' usage of every
        # round and attempt, or an estimate where none came (docs/protocol.md).
        tokens = job.tokens_used
        if tokens and self.counters is not None:
            self.counters.add_tokens(job.device, tokens, self.clock())
        log.debug("device=%s id=%s outcome=%s tokens=%d", job.device, job.rid, job.outcome, tokens)

    def stopping(self) -> None:
        if self.counters is not None:
            self.counters.close()
            self.counters = None
