"""The upstream client: one streamed `POST /chat/completions` to an OpenAI-compatible API.

httpx does HTTP and httpx-sse the event-stream framing; this module maps
everything that can go wrong on the way into the protocol's error codes and
keeps the API key out of every message.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from bridge.core import protocol as p
from bridge.core.capture import Capture, Exchange
from bridge.core.errors import UpstreamError
from bridge.core.netio import AsyncioTransport
from bridge.core.settings import Settings

SECRET_RUN = 8
"""No run of this many consecutive characters of the API key may leave the bridge."""
DETAIL_CHARS = 300
"""How much of an upstream error's text a device gets (a Pico has little memory)."""


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Read `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Redactor:
    """Removes a secret, and every run of `SECRET_RUN` or more of its characters, from a text.

    An upstream may echo the key whole, shortened ("sk-abc…xyz") or cut
    anywhere, so matching only the whole key is not enough; and a text must
    be redacted before it is cut, or the cut leaves a part that no longer
    matches. Each run of the key's characters becomes "***".
    """

    __slots__ = ("_grams", "_secret")

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._grams = frozenset(
            secret[i : i + SECRET_RUN] for i in range(len(secret) - SECRET_RUN + 1)
        )

    def __call__(self, text: str) -> str:
        if not self._secret:
            return text
        text = text.replace(self._secret, "***")
        while True:  # again: a "***" between two runs could join them into a new one
            spans = sorted(
                (i, i + SECRET_RUN) for gram in self._grams for i in _occurrences(text, gram)
            )
            if not spans:
                return text
            out: list[str] = []
            pos = 0
            end = -1
            for start, stop in spans:
                if start > end:  # a run apart from the previous one
                    if end >= 0:
                        out.append("***")
                    out.append(text[pos:start])
                pos = end = max(end, stop)
            out.append("***")
            out.append(text[pos:])
            text = "".join(out)


def _occurrences(text: str, part: str) -> list[int]:
    """Every index where `part` starts in `text`, overlapping ones too."""
    found = []
    i = text.find(part)
    while i >= 0:
        found.append(i)
        i = text.find(part, i + 1)
    return found


def _error_detail(body: bytes, redact: Redactor) -> str:
    """The message of an error body, redacted and then cut to `DETAIL_CHARS`."""
    try:
        obj = json.loads(body)
    except ValueError:
        return redact(body.decode("utf-8", "replace")).strip()[:DETAIL_CHARS]
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or err
    return redact(str(err))[:DETAIL_CHARS]


def _as_chunk(obj: dict[str, Any]) -> str:
    """A non-streamed `chat.completion` (some servers ignore `stream`) as one chunk."""
    choices = []
    for c in obj.get("choices") or []:
        msg = dict(c.get("message") or {})
        if msg.get("tool_calls"):
            msg["tool_calls"] = [dict(tc, index=i) for i, tc in enumerate(msg["tool_calls"])]
        choices.append(
            {"index": c.get("index", 0), "delta": msg, "finish_reason": c.get("finish_reason")}
        )
    return json.dumps({"model": obj.get("model"), "choices": choices, "usage": obj.get("usage")})


class Upstream:
    """The HTTP client for one API, shared by all requests (connection pooling)."""

    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
        self._redact = Redactor(key)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.url = settings.openai_base_url + "/chat/completions"
        if transport is None:
            verify: ssl.SSLContext | bool = True
            if settings.upstream_ca_file is not None:
                verify = ssl.create_default_context(cafile=str(settings.upstream_ca_file))
            transport = AsyncioTransport(
                verify=verify,
                trust_env=False,
                limits=httpx.Limits(
                    max_connections=settings.max_streams + 8,
                    max_keepalive_connections=settings.max_streams + 8,
                ),
            )
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(
                connect=settings.upstream_connect_timeout,
                read=settings.upstream_read_timeout,
                write=settings.upstream_read_timeout,
                pool=settings.upstream_connect_timeout,
            ),
            transport=transport,
            trust_env=False,
        )
        self.capture: Capture | None = None
        if settings.capture_dir is not None:
            self.capture = Capture(
                settings.capture_dir, max_files=settings.capture_max_files,
                max_bytes=settings.capture_max_bytes, redact=self.redact,
            )  # fmt: skip

    async def aclose(self) -> None:
        await self.client.aclose()

    async def models(self) -> list[str]:
        """The ids of the models the API offers (`GET /models`), at most 1000, in its order.

        Raises:
            UpstreamError: when the API cannot be asked or answers something else.
        """
        try:
            resp = await self.client.get(
                self.url.removesuffix("/chat/completions") + "/models",
                headers={"Accept": "application/json"},
            )
        except httpx.TimeoutException as exc:
            raise UpstreamError(p.UPSTREAM_TIMEOUT, _timeout_text(exc)) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(
                p.UPSTREAM_UNREACHABLE, self.redact(f"cannot list the models: {exc}")
            ) from None
        if resp.status_code >= 400:
            detail = _error_detail(resp.content[:8192], self._redact)
            raise UpstreamError(
                p.UPSTREAM_STATUS, f"upstream answered {resp.status_code}: {detail}",
                status=resp.status_code,
            )  # fmt: skip
        try:
            data = resp.json().get("data")
        except (ValueError, AttributeError):
            data = None
        if not isinstance(data, list):
            raise UpstreamError(p.UPSTREAM_PROTOCOL, "the API's model list is not a list")
        ids = (m.get("id") for m in data if isinstance(m, dict))
        return list(dict.fromkeys(i for i in ids if isinstance(i, str) and 0 < len(i) <= 200))[
            :1000
        ]

    def redact(self, text: str) -> str:
        """Remove the API key, whole or any run of `SECRET_RUN` of its characters, from a text.

        Call it on the whole text, before any cut.
        """
        return self._redact(text)

    @asynccontextmanager
    async def stream(
        self, body: dict[str, Any], capture_id: str | None = None
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """`_open`, recorded in the capture folder under `capture_id` when capture is on."""
        if self.capture is None or capture_id is None:
            async with self._open(body) as events:
                yield events
            return
        exchange = self.capture.start(capture_id, self.url, body)
        try:
            async with self._open(body, exchange) as events:
                yield events
        except BaseException as exc:
            exchange.finish(exc)
            raise
        exchange.finish(None)

    @asynccontextmanager
    async def _open(
        self, body: dict[str, Any], exchange: Exchange | None = None
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """Open the stream; yield an iterator of (event, data) pairs.

        Leaving the context closes the HTTP response at once, which is how a
        cancel stops the generation upstream.

        Raises:
            UpstreamError: for any failure, opening or reading.
        """
        try:
            async with self.client.stream("POST", self.url, json=body) as resp:
                if exchange is not None:
                    exchange.opened(resp)
                if resp.status_code >= 400:
                    detail = _error_detail(await self._read_some(resp), self._redact)
                    raise UpstreamError(
                        p.UPSTREAM_STATUS,
                        self.redact(f"upstream answered {resp.status_code}: {detail}"),
                        status=resp.status_code,
                        retry_after=retry_after_seconds(resp.headers),
                    )
                yield self._events(resp)
        except httpx.TimeoutException as exc:
            raise UpstreamError(p.UPSTREAM_TIMEOUT, _timeout_text(exc)) from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.ProxyError) as exc:
            raise UpstreamError(
                p.UPSTREAM_UNREACHABLE,
                self.redact(f"cannot reach the API: {exc or type(exc).__name__}"),
            ) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise UpstreamError(
                p.UPSTREAM_PROTOCOL,
                self.redact(f"the API connection broke: {exc or type(exc).__name__}"),
            ) from None
        except httpx.DecodingError as exc:
            raise UpstreamError(p.UPSTREAM_PROTOCOL, f"undecodable reply: {exc}") from None

    async def _read_some(self, resp: httpx.Response, limit: int = 8192) -> bytes:
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) >= limit:
                break
        return bytes(buf[:limit])

    async def _events(self, resp: httpx.Response) -> AsyncIterator[tuple[str, str]]:
        ctype = resp.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype == "application/json":
            body = await self._read_some(resp, 16 * 1024 * 1024)
            try:
                obj = json.loads(body)
            except ValueError:
                raise UpstreamError(p.UPSTREAM_PROTOCOL, "the API sent malformed JSON") from None
            if isinstance(obj, dict) and obj.get("error") is not None:
                yield "", json.dumps({"error": obj["error"]})
                return
            if not isinstance(obj, dict) or "choices" not in obj:
                raise UpstreamError(p.UPSTREAM_PROTOCOL, "the API sent JSON that is not a reply")
            yield "", _as_chunk(obj)
            yield "", "[DONE]"
            return
        try:
            async for sse in EventSource(resp).aiter_sse():
                yield sse.event, sse.data
        except SSEError as exc:
            raise UpstreamError(p.UPSTREAM_PROTOCOL, f"not an event stream: {exc}") from None


def _timeout_text(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "the API did not accept the connection in time"
    if isinstance(exc, httpx.PoolTimeout):
        return "no connection to the API became free in time"
    return "the API went silent for longer than the read timeout"
