"""The upstream client: one streamed `POST /chat/completions` to an OpenAI-compatible API.

httpx does HTTP and httpx-sse the event-stream framing; this module maps
everything that can go wrong on the way into the protocol's error codes and
keeps the API key out of every message.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from bridge.core import protocol as p
from bridge.core.capture import Capture, Exchange
from bridge.core.errors import UpstreamError
from bridge.core.netio import ShardedTransport
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
        images_base = settings.openai_images_base_url or settings.openai_base_url
        self.images_url = images_base + "/images/generations"
        images_key = settings.openai_images_api_key
        self._images_key = images_key.get_secret_value() if images_key else key
        self._redact_images = Redactor(self._images_key if self._images_key != key else "")
        self._image_timeout = settings.upstream_total_timeout
        if transport is None:
            verify: ssl.SSLContext | bool = True
            if settings.upstream_ca_file is not None:
                verify = ssl.create_default_context(cafile=str(settings.upstream_ca_file))
            transport = ShardedTransport.open(
                settings.max_streams + 8, verify=verify, trust_env=False,
                keepalive=settings.upstream_keepalive,
            )  # fmt: skip
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
        # The chat call goes to the transport itself (`_open`): these are the headers
        # and the timeouts the client would have added to it.
        self._transport = transport
        self._chat_url = httpx.URL(self.url)
        self._chat_headers = {
            **self.client.headers,
            "Content-Type": "application/json",
        }
        self._chat_timeout = self.client.timeout.as_dict()
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
        """Remove the API keys (the chat API's and the image API's), whole or any run of
        `SECRET_RUN` of their characters, from a text.

        Call it on the whole text, before any cut.
        """
        return self._redact_images(self._redact(text))

    async def generate_image(
        self, prompt: str, *, model: str, size: str, max_bytes: int
    ) -> GeneratedImage:
        """`POST /images/generations` for one picture: its encoded bytes (PNG, JPEG...)
        and the tokens the API says it used (gpt-image-1 does; others may not).

        The API answers with `b64_json` or with a `url`, which is then fetched
        without the API key. Nothing larger than `max_bytes` is read.

        Raises:
            UpstreamError: for any failure, with the protocol's codes.
        """
        body = {"model": model, "prompt": prompt, "size": size, "n": 1}
        headers = {"Accept": "application/json"}
        if self._images_key:
            headers["Authorization"] = f"Bearer {self._images_key}"
        timeout = httpx.Timeout(self._image_timeout, connect=self.client.timeout.connect)
        # base64 is 4/3 of the picture, and the JSON around it is small
        limit = max_bytes * 4 // 3 + 4096
        with self._errors():
            req = self.client.build_request(
                "POST", self.images_url, json=body, headers=headers, timeout=timeout
            )
            resp = await self.client.send(req, stream=True)
            try:
                if resp.status_code >= 400:
                    detail = _error_detail(await self._read_some(resp), self._redact)
                    raise UpstreamError(
                        p.UPSTREAM_STATUS,
                        self.redact(f"image API answered {resp.status_code}: {detail}"),
                        status=resp.status_code,
                        retry_after=retry_after_seconds(resp.headers),
                    )
                raw = await self._read_some(resp, limit + 1)
            finally:
                await resp.aclose()
            if len(raw) > limit:
                raise UpstreamError(
                    p.UPSTREAM_PROTOCOL, f"the image API sent more than {max_bytes} bytes"
                )
            item, usage = _image_item(raw)
            if isinstance(item.get("b64_json"), str):
                try:
                    data = base64.b64decode(item["b64_json"], validate=True)
                except (binascii.Error, ValueError):
                    raise UpstreamError(
                        p.UPSTREAM_PROTOCOL, "the image API sent invalid base64"
                    ) from None
                if len(data) > max_bytes:
                    raise UpstreamError(
                        p.UPSTREAM_PROTOCOL, f"the generated image is larger than {max_bytes} bytes"
                    )
                return GeneratedImage(data, usage)
            url = item.get("url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise UpstreamError(p.UPSTREAM_PROTOCOL, "the image API sent no b64_json or url")
            get = self.client.build_request("GET", url, timeout=timeout)
            get.headers.pop("Authorization", None)  # the key goes to the API, nowhere else
            got = await self.client.send(get, stream=True)
            try:
                if got.status_code >= 400:
                    raise UpstreamError(
                        p.UPSTREAM_STATUS,
                        f"fetching the generated image answered {got.status_code}",
                        status=got.status_code,
                    )
                data = await self._read_some(got, max_bytes + 1)
            finally:
                await got.aclose()
            if len(data) > max_bytes:
                raise UpstreamError(
                    p.UPSTREAM_PROTOCOL, f"the generated image is larger than {max_bytes} bytes"
                )
            return GeneratedImage(data, usage)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """httpx's failures as the protocol's upstream error codes (key redacted)."""
        try:
            yield
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

    @asynccontextmanager
    async def stream(
        self,
        body: dict[str, Any],
        capture_id: str | None = None,
        *,
        sent: Callable[[], None] | None = None,
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """`_open`, recorded in the capture folder under `capture_id` when capture is on."""
        if self.capture is None or capture_id is None:
            async with self._open(body, sent=sent) as events:
                yield events
            return
        exchange = self.capture.start(capture_id, self.url, body)
        try:
            async with self._open(body, exchange, sent=sent) as events:
                yield events
        except BaseException as exc:
            exchange.finish(exc)
            raise
        exchange.finish(None)

    @asynccontextmanager
    async def _open(
        self,
        body: dict[str, Any],
        exchange: Exchange | None = None,
        *,
        sent: Callable[[], None] | None = None,
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """Open the stream; yield an iterator of (event, data) pairs.

        Leaving the context closes the HTTP response at once, which is how a
        cancel stops the generation upstream. `sent` is called once the whole
        request is written to the connection (before the API answers).

        Raises:
            UpstreamError: for any failure, opening or reading.
        """
        extensions: dict[str, Any] = {"timeout": self._chat_timeout}
        if sent is not None:

            async def trace(name: str, _info: dict[str, Any]) -> None:
                if name.endswith("send_request_body.complete"):
                    sent()

            extensions["trace"] = trace
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        # Straight to the transport: the client's layers (auth, redirects, cookies,
        # event hooks, its log line) do nothing for this call and cost about a
        # third of a start's CPU (docs/performance.md, "Fair start").
        request = httpx.Request(
            "POST", self._chat_url, headers=self._chat_headers, content=content,
            extensions=extensions,
        )  # fmt: skip
        with self._errors():
            resp = await self._transport.handle_async_request(request)
            resp.request = request
            try:
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
            finally:
                await resp.aclose()

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


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """A generated picture as the API encoded it, and the tokens it cost (chat-style keys)."""

    data: bytes
    usage: dict[str, Any] | None


def _image_item(raw: bytes) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The first picture of an `/images/generations` answer, and its `usage` as a chat
    reply's (`input_tokens` -> `prompt_tokens`...), or None when the API sent none."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise UpstreamError(p.UPSTREAM_PROTOCOL, "the image API sent malformed JSON") from None
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise UpstreamError(p.UPSTREAM_PROTOCOL, "the image API sent no picture")
    return data[0], _image_usage(obj.get("usage"))


def _image_usage(raw: Any) -> dict[str, Any] | None:
    """The image API's `usage` under a chat reply's names; `Job.add_usage` checks the values."""
    if not isinstance(raw, dict):
        return None
    return {"prompt_tokens": raw.get("input_tokens"), "completion_tokens": raw.get("output_tokens"),
            "total_tokens": raw.get("total_tokens")}  # fmt: skip


def _timeout_text(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "the API did not accept the connection in time"
    if isinstance(exc, httpx.PoolTimeout):
        return "no connection to the API became free in time"
    return "the API went silent for longer than the read timeout"


# --- voice: /audio/speech and /audio/transcriptions (docs/protocol.md "Voice") ------------------


def _map_http_error(exc: httpx.HTTPError, redact: Any) -> UpstreamError:
    """An httpx failure as the protocol's error, as `Upstream.stream` maps it."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(p.UPSTREAM_TIMEOUT, _timeout_text(exc))
    if isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol | httpx.ProxyError):
        return UpstreamError(
            p.UPSTREAM_UNREACHABLE, redact(f"cannot reach the API: {exc or type(exc).__name__}")
        )
    return UpstreamError(
        p.UPSTREAM_PROTOCOL, redact(f"the API connection broke: {exc or type(exc).__name__}")
    )


class AudioApi:
    """The speech and transcription endpoints: the chat API's, or `OPENAI_AUDIO_BASE_URL`'s.

    Shares the chat client's connection pool and timeouts; a separate key
    (`OPENAI_AUDIO_API_KEY`) goes only to a separate audio host.
    """

    def __init__(self, upstream: Upstream, settings: Settings) -> None:
        self._up = upstream
        self.base = settings.openai_audio_base_url or settings.openai_base_url
        key = settings.openai_audio_api_key or settings.openai_api_key
        self._key = key.get_secret_value() if key else ""
        self._audio_redact = Redactor(self._key)
        self.tts_model = settings.openai_tts_model or settings.openai_model
        self.tts_voice = settings.openai_tts_voice
        self.stt_model = settings.openai_stt_model or settings.openai_model

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def redact(self, text: str) -> str:
        """Both keys (the chat API's and the audio API's) out of a text, before any cut."""
        return self._audio_redact(self._up.redact(text))

    def _detail(self, body: bytes) -> str:
        """An error body's message with both keys out (before the cut, as `_error_detail`)."""
        try:
            obj = json.loads(body)
        except ValueError:
            return self.redact(body.decode("utf-8", "replace")).strip()[:DETAIL_CHARS]
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict):
            err = err.get("message") or err.get("detail") or err
        return self.redact(str(err))[:DETAIL_CHARS]

    @asynccontextmanager
    async def speech(
        self, text: str, *, voice: str | None, response_format: str, model: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """POST /audio/speech; yield the audio bytes as they arrive.

        Raises:
            UpstreamError: for any failure, opening or reading.
        """
        body = {
            "model": model or self.tts_model,
            "input": text,
            "voice": voice or self.tts_voice,
            "response_format": response_format,
        }
        try:
            async with self._up.client.stream(
                "POST", self.base + "/audio/speech", json=body, headers=self._headers("*/*")
            ) as resp:
                if resp.status_code >= 400:
                    detail = self._detail(await self._up._read_some(resp))  # noqa: SLF001  # the API client's bounded body reader
                    raise UpstreamError(
                        p.UPSTREAM_STATUS,
                        self.redact(f"speech API answered {resp.status_code}: {detail}"),
                        status=resp.status_code,
                    )
                yield self._bytes(resp)
        except httpx.HTTPError as exc:
            raise _map_http_error(exc, self.redact) from None

    async def _bytes(self, resp: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise _map_http_error(exc, self.redact) from None

    async def transcribe(
        self, wav: bytes, *, model: str | None = None, language: str | None = None
    ) -> str:
        """POST /audio/transcriptions with a WAV file; return the text.

        Raises:
            UpstreamError: for any failure.
        """
        data = {"model": model or self.stt_model, "response_format": "json"}
        if language:
            data["language"] = language
        try:
            resp = await self._up.client.post(
                self.base + "/audio/transcriptions",
                data=data,
                files={"file": ("speech.wav", wav, "audio/wav")},
                headers=self._headers("application/json"),
            )
        except httpx.HTTPError as exc:
            raise _map_http_error(exc, self.redact) from None
        if resp.status_code >= 400:
            raise UpstreamError(
                p.UPSTREAM_STATUS,
                self.redact(
                    f"transcription API answered {resp.status_code}: {self._detail(resp.content)}"
                ),
                status=resp.status_code,
            )
        ctype = resp.headers.get("content-type", "")
        if ctype.startswith("text/plain"):
            return resp.text.strip()
        try:
            obj = resp.json()
        except ValueError:
            raise UpstreamError(p.UPSTREAM_PROTOCOL, "the transcription is not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UpstreamError(p.UPSTREAM_PROTOCOL, "the transcription has no text")
        return str(obj["text"]).strip()
