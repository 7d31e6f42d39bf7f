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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from bridge.core import protocol as p
from bridge.core.errors import UpstreamError
from bridge.core.netio import AsyncioTransport
from bridge.core.settings import Settings


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


def _error_detail(body: bytes) -> str:
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:300]
    return str(err)[:300]


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
        self._secret = key
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

    async def aclose(self) -> None:
        await self.client.aclose()

    def redact(self, text: str) -> str:
        """Remove the API key from a text that may echo it."""
        return text.replace(self._secret, "***") if self._secret else text

    @asynccontextmanager
    async def stream(
        self, body: dict[str, Any], *, sent: Callable[[], None] | None = None
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """Open the stream; yield an iterator of (event, data) pairs.

        Leaving the context closes the HTTP response at once, which is how a
        cancel stops the generation upstream. `sent` is called once the whole
        request is written to the connection (before the API answers).

        Raises:
            UpstreamError: for any failure, opening or reading.
        """
        extensions: dict[str, Any] | None = None
        if sent is not None:

            async def trace(name: str, _info: dict[str, Any]) -> None:
                if name.endswith("send_request_body.complete"):
                    sent()

            extensions = {"trace": trace}
        try:
            async with self.client.stream(
                "POST", self.url, json=body, extensions=extensions
            ) as resp:
                if resp.status_code >= 400:
                    detail = _error_detail(await self._read_some(resp))
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
