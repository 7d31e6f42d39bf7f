"""Capture of upstream exchanges for debugging (`BRIDGE_CAPTURE_DIR`, off by default).

When a reply looks wrong, a user wants to see exactly what the provider sent:
one JSON file per API call, named by time, device and request id, holds the
request body, the response status and headers, the raw bytes of the event
stream as received, and timings. The API key is replaced by `***`
everywhere (it is never in the body; the Authorization header is not
recorded). The folder is bounded: at most `BRIDGE_CAPTURE_MAX_FILES` files
and `BRIDGE_CAPTURE_MAX_BYTES` bytes (the oldest go first), each file at
most a quarter of the bytes (the stream is cut, `"truncated": true`). When
off, the upstream layer makes no capture object at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("bridge.capture")

#: At most this many (milliseconds, bytes) arrival records per exchange.
MAX_ARRIVALS = 4096
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_SKIP_HEADERS = frozenset({"authorization", "proxy-authorization", "set-cookie", "cookie"})


class Capture:
    """The capture folder: makes one `Exchange` per API call and keeps the folder bounded."""

    def __init__(
        self, folder: Path, *, max_files: int, max_bytes: int, redact: Callable[[str], str]
    ) -> None:
        self.folder = folder
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.per_file = max(1024, max_bytes // 4)
        self.redact = redact
        folder.mkdir(parents=True, exist_ok=True)
        self._files: deque[tuple[str, int]] = deque()
        self.total = 0
        for path in sorted(folder.glob("capture-*.json")):
            size = path.stat().st_size
            self._files.append((path.name, size))
            self.total += size
        self._seq = 0
        self._trim()

    def start(self, capture_id: str, url: str, body: dict[str, Any]) -> Exchange:
        """A new exchange: the request about to be sent."""
        self._seq = (self._seq + 1) % 1_000_000
        return Exchange(self, capture_id, url, body, self._seq)

    def write(self, name: str, data: bytes) -> None:
        path = self.folder / name
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write capture %s: %s", name, exc)
            return
        self._files.append((name, len(data)))
        self.total += len(data)
        self._trim()

    def _trim(self) -> None:
        while self._files and (len(self._files) > self.max_files or self.total > self.max_bytes):
            name, size = self._files.popleft()
            self.total -= size
            (self.folder / name).unlink(missing_ok=True)


class Exchange:
    """One API call as it happens: the request, then the raw response bytes and their times."""

    def __init__(
        self, capture: Capture, capture_id: str, url: str, body: dict[str, Any], seq: int
    ) -> None:
        self.capture = capture
        self.id = capture_id
        self.url = url
        self.body = body
        self.seq = seq
        self.wall = datetime.now(UTC)
        self.t0 = time.monotonic()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.t_headers: float | None = None
        self.t_first: float | None = None
        self.raw = bytearray()
        self.size = 0
        self.arrivals: list[tuple[float, int]] = []
        self.truncated = False

    def _ms(self, t: float | None) -> float | None:
        return None if t is None else round((t - self.t0) * 1000, 2)

    def opened(self, resp: httpx.Response) -> None:
        """The response headers came: record them and tap the body's raw bytes."""
        self.t_headers = time.monotonic()
        self.status = resp.status_code
        self.headers = {k: v for k, v in resp.headers.items() if k.lower() not in _SKIP_HEADERS}
        assert isinstance(resp.stream, httpx.AsyncByteStream)
        resp.stream = _Tap(resp.stream, self)

    def received(self, chunk: bytes) -> None:
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
        self.size += len(chunk)
        if len(self.arrivals) < MAX_ARRIVALS:
            self.arrivals.append((round((now - self.t0) * 1000, 2), len(chunk)))
        room = self.capture.per_file - len(self.raw)
        if room <= 0 or len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.raw += chunk

    def finish(self, error: BaseException | None) -> None:
        """The exchange ended (completely, with an error, or cancelled): write its file."""
        redact = self.capture.redact
        request: Any = self.body
        text = json.dumps(self.body, ensure_ascii=False)
        if len(text) > self.capture.per_file // 2:
            request, self.truncated = text[: self.capture.per_file // 2], True
        record = {
            "id": self.id,
            "started": self.wall.isoformat(timespec="milliseconds"),
            "url": self.url,
            "request": request,
            "status": self.status,
            "headers": self.headers,
            "timings_ms": {
                "headers": self._ms(self.t_headers),
                "first_byte": self._ms(self.t_first),
                "end": self._ms(time.monotonic()),
            },
            "bytes": self.size,
            "arrivals": self.arrivals,
            "sse": self.raw.decode("utf-8", "replace"),
            "truncated": self.truncated,
            "error": None if error is None else f"{type(error).__name__}: {error}",
        }
        data = redact(json.dumps(record, ensure_ascii=False, indent=1)).encode()
        stamp = self.wall.strftime("%Y%m%dT%H%M%S.%f")
        name = f"capture-{stamp}-{self.seq:06d}-{_UNSAFE.sub('_', self.id)[:140]}.json"
        self.capture.write(name, data)


class _Tap(httpx.AsyncByteStream):
    """The response's byte stream, copied into the exchange as it is read."""

    def __init__(self, inner: httpx.AsyncByteStream, exchange: Exchange) -> None:
        self.inner = inner
        self.exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.exchange.received(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()
