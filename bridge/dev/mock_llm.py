"""A deterministic OpenAI-compatible chat-completions server for tests and demos.

Why: the bridge, its tests, the demo and the benchmark need an upstream that
answers instantly, costs nothing, gives replies a test can predict
(:func:`reply_tokens`), and misbehaves on request. Faults are chosen per
request by *directives* so they survive anything that forwards only the
prompt: ``[mock key=value ...]`` anywhere in the last user message, or the
HTTP header ``X-Mock: key=value ...`` (the header wins on a shared key).

Directive keys (integers unless noted; a bare key means ``key=1``):

* ``tokens`` reply length in tokens; ``delay_ms`` pause before each streamed
  token (server default ``--delay-ms``); ``first_byte_delay_ms`` wait before
  the response headers.
* ``status`` answer with this HTTP status (400-599) and an OpenAI-style
  error body; ``retry_after`` (text) adds a ``Retry-After`` header;
  ``fail_times=K`` with ``status``: only the first K requests carrying the
  same directives fail (one counter per directive set; add any unknown key,
  e.g. ``run=7``, to start a fresh counter).
* ``cut_after=N`` send N content chunks, then close the connection without
  the terminating zero-length chunk (non-stream: half the body).
  ``cut_after_finish=1`` send the whole reply and its ``finish_reason``, then
  close the connection the same way (no usage chunk, no ``[DONE]``).
* ``malformed_at=N`` the Nth content event's data is not valid JSON
  (non-stream: the body is cut JSON).
* ``error_event_at=N`` after N content chunks send a ``data: {"error":...}``
  event and end the body cleanly without ``[DONE]``; ``event_error_at=N``
  the same as an ``event: error`` SSE event.
* ``hang=1`` send the headers, then nothing until the client goes away.
* ``content_type`` (text) override the response content type.
* ``reasoning=N`` N ``reasoning_content`` deltas before the content;
  ``refusal=1`` reply with ``delta.refusal`` pieces of
  :data:`REFUSAL_TEXT`; ``keepalive=1`` a ``: keep-alive`` comment between
  events.
* ``stamp=1`` every content token is ``f"{time.monotonic_ns()} "`` taken just
  before its chunk is written (for latency benchmarks).
* ``corpus=NAME`` (text) replay ``NAME.sse`` from the corpus directory (the
  repository's ``tests/fixtures/streams`` unless set) byte for byte, split
  at ``transport.chunk_boundaries`` of ``NAME.json`` when it has them;
  ``split=K`` instead writes K-byte slices.
* ``tool=1`` (or a prompt containing "call tool") with ``tools`` in the
  request: stream a call of the first tool with arguments ``{"q": prompt}``.
* ``call=SPEC`` (text) call tools, scripted: SPEC is one call or several
  joined by ``+``, each ``NAME`` or ``NAME(key:value;key:value)`` (a value is
  JSON when it parses, else a string), e.g. ``call=set_led(on:true)+read_temp``.
  NAME is the request's tool of that name, else the only one whose name ends
  with it (``set_led`` finds ``lamp__set_led``), else NAME itself (a tool the
  model invents). ``rounds=N`` (default 1): call them in each of the first N
  rounds (a round is an assistant message with ``tool_calls`` after the last
  user message), then answer. ``bad_args=1``: the arguments are cut JSON;
  ``preamble=1``: the model says :data:`PREAMBLE_TEXT` before its calls.
  Once the conversation ends with ``tool`` messages and no round is left, the
  reply uses them: "Tool said: <content>", several joined by "; ".
* ``echo_auth=P`` with ``status`` or an error event: the error's message
  echoes the request's ``Authorization`` header after P characters of
  padding (to put the key across any cut), as a careless upstream might;
  ``echo_keep=K`` echoes only its first and last K characters, joined by
  "…" (a provider showing a shortened key).

* ``noise=1`` (image generation) a picture of random pixels that does not
  compress; ``url=1`` answer with a URL even without ``response_format``.
* ``images_max_side=N`` every ``image_url`` part must be an inline JPEG that
  decodes, with no side longer than N pixels; otherwise 400 (what the
  bridge's resizing promises).

``POST /v1/audio/speech`` speaks its ``input`` (espeak-ng, or a tone) and
``POST /v1/audio/transcriptions`` reads back what the mock's own speech said
(:mod:`bridge.dev.mock_audio`); speech takes ``status``,
``first_byte_delay_ms``, ``delay_ms``, ``hang`` and ``cut_after``.

Pictures: ``POST /v1/images/generations`` draws :func:`picture` of the
prompt at the asked ``size`` (default 1024x1024), with a ``usage`` as
gpt-image-1 reports it (a token per prompt word, one per 64x64 tile), and answers ``b64_json``,
or with ``response_format: url`` a URL on the mock itself; ``status`` and
``fail_times`` directives in the prompt apply. Every inline image of a chat
request is described in its record (``images``: format, width, height).

Content chunks are the deltas carrying content, refusal or tool-call pieces
(not the role chunk, not reasoning). Counts past the end of the reply apply
at its end (``cut_after``, ``error_event_at``, ``event_error_at``) or never
(``malformed_at``). Without ``stream`` the event directives do not apply.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
from PIL import Image, ImageDraw

__all__ = [
    "FILLER_WORDS",
    "PREAMBLE_TEXT",
    "REFUSAL_TEXT",
    "MockHandle",
    "MockLLM",
    "add_arguments",
    "default_corpus_dir",
    "parse_directives",
    "picture",
    "picture_cells",
    "reasoning_tokens",
    "reply_tokens",
    "run",
    "running_mock",
    "strip_directives",
]

_FILLER = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november"
    " oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
)
FILLER_WORDS: tuple[str, ...] = tuple(_FILLER.split())
"""Words appended after the echo sentence until the requested length."""

REFUSAL_TEXT = "I can't help with that."
"""What ``refusal=1`` streams as ``delta.refusal`` pieces."""

PREAMBLE_TEXT = "Let me check."
"""What ``preamble=1`` says before the tool calls of a ``call=`` round."""

MAX_RECORDED = 1000
MAX_BODY_BYTES = 32 * 1024 * 1024
_READ_SIZE = 65536
_SLICE_PAUSE_S = 0.005
_SPLIT_PAUSE_S = 0.001

_DIRECTIVE_RE = re.compile(r"\[mock(?:\s[^\]]*)?\]")
_CORPUS_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_INT_KEY_NAMES = (
    "tokens delay_ms first_byte_delay_ms status fail_times cut_after malformed_at error_event_at"
    " cut_after_finish event_error_at hang reasoning refusal keepalive stamp split tool"
    " echo_auth echo_keep rounds bad_args preamble"
    " images_max_side noise url"
)
_INT_KEYS = frozenset(_INT_KEY_NAMES.split())


class _BadRequestError(Exception):
    """A request the mock refuses with 400, carrying the message to show."""


# --------------------------------------------------------------------------- replies


def strip_directives(text: str) -> str:
    """Return ``text`` without ``[mock ...]`` directives, whitespace normalised.

    Why: the echo must not depend on the directives, so a test can compute
    the reply of a prompt that carries faults.
    """
    return " ".join(_DIRECTIVE_RE.sub(" ", text).split())


def parse_directives(text: str) -> dict[str, str]:
    """Collect the ``key=value`` pairs of every ``[mock ...]`` in ``text``.

    Also accepts a bare header value (``"status=429 retry_after=1"``, with or
    without the ``[mock ...]`` brackets). Later keys override earlier ones; a
    key without ``=`` means ``key=1``.
    """
    found = _DIRECTIVE_RE.findall(text)
    if not found:
        found = [text]
    out: dict[str, str] = {}
    for block in found:
        body = block
        if body.startswith("[mock"):
            body = body[len("[mock") : -1]
        for item in body.replace(",", " ").split():
            key, sep, value = item.partition("=")
            if key:
                out[key.lower()] = value if sep else "1"
    return out


def _words_to_tokens(words: list[str]) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def reply_tokens(
    prompt: str,
    tokens: int | None = None,
    *,
    images: int = 0,
    tool_result: str | None = None,
) -> list[str]:
    """Return the tokens the mock streams for ``prompt``.

    Why: tests compute the expected text instead of hard-coding it.

    Args:
        prompt: The last user message's text; directives are ignored.
        tokens: Reply length; default just the leading sentence. Shorter
            values cut the sentence, longer ones add :data:`FILLER_WORDS`.
        images: Number of ``image_url`` parts: the reply then starts with
            "I see N image(s)." instead of the echo.
        tool_result: When the conversation ends with a ``tool`` message, its
            content: the reply is then "Tool said: <content>".

    Returns:
        Non-empty tokens, words with a leading space except the first;
        ``"".join(...)`` is the whole reply.
    """
    if tool_result is not None:
        sentence = "Tool said: " + (" ".join(tool_result.split()) or "nothing")
    elif images > 0:
        sentence = f"I see {images} image{'s' if images != 1 else ''}."
    else:
        text = strip_directives(prompt)
        sentence = f"You said: {text}." if text else "You said nothing."
    words = sentence.split()
    if tokens is not None:
        if tokens < len(words):
            words = words[: max(tokens, 0)]
        else:
            words += [FILLER_WORDS[i % len(FILLER_WORDS)] for i in range(tokens - len(words))]
    return _words_to_tokens(words)


def reasoning_tokens(count: int) -> list[str]:
    """Return the ``reasoning_content`` pieces that ``reasoning=count`` streams."""
    return _words_to_tokens(["Thinking"] + [f"step{i}" for i in range(1, count)])[:count]


def default_corpus_dir() -> Path | None:
    """Locate what ``corpus=NAME`` replays: ``$MOCK_LLM_CORPUS_DIR``, else the project's own.

    Why: the project's provider fixtures (``tests/fixtures/streams`` in the
    repository, beside this package) are what its tests and a developer's
    checkout replay, with nothing outside the repository; an installed wheel
    has no tests/, so there it takes ``--corpus-dir`` or the variable.
    """
    env = os.environ.get("MOCK_LLM_CORPUS_DIR")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "streams"
    return candidate if candidate.is_dir() else None


# --------------------------------------------------------------------------- requests


def _tool_names(tools: Any) -> list[str]:
    """The function names of a request's ``tools`` ("" for one without a name)."""
    names: list[str] = []
    if isinstance(tools, list):
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            names.append(name if isinstance(name, str) else "")
    return names


def _directive_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _scripted_calls(spec: str, names: list[str], bad_args: bool) -> list[tuple[str, str]]:
    """The (name, arguments JSON) of a ``call=`` directive (see the module docstring)."""
    calls: list[tuple[str, str]] = []
    for item in filter(None, spec.split("+")):
        name, _, rest = item.partition("(")
        args: dict[str, Any] = {}
        for pair in filter(None, rest.rstrip(")").split(";")):
            key, _, value = pair.partition(":")
            args[key] = _directive_value(value)
        if name not in names:
            ends = [n for n in names if n and n.endswith(name)]
            if len(ends) == 1:
                name = ends[0]
        text = _dumps(args)
        calls.append((name, text[: len(text) // 2] if bad_args else text))
    return calls


@dataclass
class _Conversation:
    """What the reply depends on, pulled out of the request body."""

    prompt: str
    directive_text: str
    images: int
    tool_result: str | None
    prompt_tokens: int
    tool_rounds: int = 0


def _text_of(content: Any) -> tuple[str, int]:
    """Return the text of a message content and its number of image parts."""
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts: list[str] = []
        images = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                images += 1
        return " ".join(texts), images
    return "", 0


def _conversation(body: dict[str, Any]) -> _Conversation:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _BadRequestError("'messages' must be a list of message objects")
    prompt = ""
    images = 0
    words = 0
    for message in messages:
        text, count = _text_of(message.get("content"))
        words += len(text.split())
        if message.get("role") == "user":
            prompt, images = text, count
    tool_result: str | None = None
    trailing: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        trailing.append(_text_of(message.get("content"))[0])
    if trailing:
        tool_result = "; ".join(reversed(trailing))
    rounds = 0
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        if message.get("role") == "assistant" and message.get("tool_calls"):
            rounds += 1
    directive_text = " ".join(_DIRECTIVE_RE.findall(prompt))
    return _Conversation(
        prompt=prompt,
        directive_text=directive_text,
        images=images,
        tool_result=tool_result,
        prompt_tokens=max(words, 1),
        tool_rounds=rounds,
    )


@dataclass
class _Options:
    """Parsed directives of one request."""

    raw: dict[str, str]
    ints: dict[str, int]
    echo: str | None = None  # the error message that ``echo_auth`` asks for

    def get(self, key: str, default: int = 0) -> int:
        return self.ints.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.ints or key in self.raw


def _options(directives: dict[str, str]) -> _Options:
    ints: dict[str, int] = {}
    for key, value in directives.items():
        if key in _INT_KEYS:
            try:
                ints[key] = int(value)
            except ValueError:
                raise _BadRequestError(
                    f"mock directive {key}={value!r} is not an integer"
                ) from None
            if ints[key] < 0:
                raise _BadRequestError(f"mock directive {key}={value!r} is negative")
    status = ints.get("status")
    if status is not None and not 400 <= status <= 599:
        raise _BadRequestError(f"mock directive status={status} must be 400-599")
    return _Options(raw=directives, ints=ints)


# --------------------------------------------------------------------------- pictures

PICTURE_GRID = 8
"""The generated picture is a PICTURE_GRID x PICTURE_GRID board of coloured cells."""

PICTURE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 255, 255),
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
)
"""Colours every screen format shows exactly (each channel 0 or 255)."""


def picture_cells(prompt: str) -> list[list[tuple[int, int, int]]]:
    """The colour of each cell (row by row) of the picture drawn for ``prompt``.

    Why: a test computes what a device should see instead of trusting the mock.
    """
    digest = hashlib.sha256(strip_directives(prompt).encode()).digest()
    digest += hashlib.sha256(digest).digest()
    return [
        [PICTURE_COLOURS[digest[r * PICTURE_GRID + c] % len(PICTURE_COLOURS)]
         for c in range(PICTURE_GRID)]
        for r in range(PICTURE_GRID)
    ]  # fmt: skip


def picture(prompt: str, width: int, height: int, noise: bool = False) -> Image.Image:
    """The deterministic picture of ``prompt``: :func:`picture_cells` over the whole size.

    With ``noise`` every pixel is random (seeded by the prompt), so the picture
    does not compress: a large one tests that a client streams it.
    """
    if noise:
        seed = hashlib.sha256(strip_directives(prompt).encode()).digest()
        return Image.frombytes("RGB", (width, height), _noise_bytes(seed, width * height * 3))
    im = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(im)
    for r, row in enumerate(picture_cells(prompt)):
        for c, colour in enumerate(row):
            box = (
                c * width // PICTURE_GRID,
                r * height // PICTURE_GRID,
                (c + 1) * width // PICTURE_GRID - 1,
                (r + 1) * height // PICTURE_GRID - 1,
            )
            draw.rectangle(box, fill=colour)
    return im


def _noise_bytes(seed: bytes, size: int) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < size:
        block = hashlib.blake2b(block, digest_size=64).digest()
        out += block
    return bytes(out[:size])


def describe_image(url: str) -> dict[str, Any]:
    """Format and size of an inline ``data:`` image (or why it is not one)."""
    if not url.startswith("data:"):
        return {"url": url[:200]}
    head, _, payload = url.partition(",")
    try:
        raw = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return {"format": im.format, "width": im.width, "height": im.height,
                    "media_type": head[5:].split(";")[0]}  # fmt: skip
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def _image_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                out.append(describe_image(url if isinstance(url, str) else ""))
    return out


# --------------------------------------------------------------------------- bodies


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error_json(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return _dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def _status_error(status: int) -> bytes:
    """OpenAI-style body for an injected ``status``."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = f"HTTP {status}"
    if status == 429:
        return _error_json(
            "Rate limit reached for requests (mock)", "requests", "rate_limit_exceeded"
        )
    if status == 401:
        return _error_json(
            "Incorrect API key provided (mock)", "invalid_request_error", "invalid_api_key"
        )
    if status >= 500:
        return _error_json(f"{phrase} (mock)", "server_error", "server_error")
    return _error_json(f"{phrase} (mock)", "invalid_request_error", f"http_{status}")


@dataclass
class _Reply:
    """What one request is answered with, before framing."""

    tokens: list[str]
    finish: str
    reasoning: list[str]
    refusal: bool
    calls: list[tuple[str, str]]
    round: int = 0

    def call_id(self, index: int) -> str:
        """Unique in a conversation: the first round's ids are ``call_mock_<i>``."""
        return f"call_mock_{index}" if self.round == 0 else f"call_mock_{self.round}_{index}"


@dataclass
class _Event:
    """One SSE event: ready bytes, or a stamp slot built when written."""

    data: bytes
    paced: bool = False
    stamp_suffix: bytes | None = None


@dataclass
class _Stream:
    """A planned streaming reply."""

    events: list[_Event] = field(default_factory=list)
    cut: bool = False  # close the connection after the events, with no HTTP ending


_MOCK_ERROR = _dumps(
    {"error": {"message": "mock error", "type": "server_error", "code": "mock_error"}}
)


def _auth_echo(opts: _Options, auth: str) -> str | None:
    """The error message ``echo_auth``/``echo_keep`` ask for, or None."""
    if "echo_auth" not in opts.ints:
        return None
    keep = opts.get("echo_keep")
    if keep and 2 * keep < len(auth):
        auth = f"{auth[:keep]}\u2026{auth[-keep:]}"
    return f"{'x' * opts.get('echo_auth')}Incorrect API key provided: {auth}"


class MockLLM:
    """The server: one asyncio TCP server speaking HTTP/1.1 through h11.

    Why no framework: the mock must cut connections mid-body, hang after the
    headers and time its writes, which frameworks hide; h11 leaves every byte
    under our control and is already a dependency.

    Attributes:
        requests: The last :data:`MAX_RECORDED` requests received (``method``,
            ``path``, lower-cased ``headers``, JSON ``body`` or None), oldest
            first; also served at ``GET /mock/requests``.
        connections: TCP connections accepted since start.
        peak_connections: Most connections open at once.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        delay_ms: float = 0.0,
        corpus_dir: Path | None = None,
        model: str = "mock-1",
    ) -> None:
        self.api_key = api_key
        self.delay_ms = delay_ms
        self.corpus_dir = corpus_dir if corpus_dir is not None else default_corpus_dir()
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.pictures: dict[str, bytes] = {}
        self.scheme = "http"
        self.connections = 0
        self.peak_connections = 0
        self.port = 0
        self._open = 0
        self._fail_counts: dict[str, int] = {}
        self._next_id = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        """Bind and start serving; return the bound port (useful with ``port=0``)."""
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(
            self._on_connection, host, port, ssl=ssl_context, backlog=4096, limit=_READ_SIZE
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.scheme = "https" if ssl_context is not None else "http"
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Wait until :meth:`stop` is called (the server runs once started)."""
        await self._stopped.wait()

    def clear_requests(self) -> None:
        """Forget the recorded requests (what ``DELETE /mock/requests`` does)."""
        self.requests.clear()

    def reset_fail_counts(self) -> None:
        """Forget the ``fail_times`` counters, so every directive fails afresh."""
        self._fail_counts.clear()

    @property
    def open_connections(self) -> int:
        """TCP connections open now (a client that closes a stream shows here at once)."""
        return self._open

    # ------------------------------------------------------------------ connections

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        self._open += 1
        self.peak_connections = max(self.peak_connections, self._open)
        try:
            await _Connection(self, reader, writer).serve()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancels open connections; ending quietly keeps asyncio
            # from logging each one as an error.
            pass
        finally:
            self._open -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    def record(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        """Keep a request for the tests to read (`requests`), the newest `MAX_RECORDED`."""
        if path.startswith("/mock/requests"):  # picture fetches (/mock/images/) are kept
            return
        self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
        if len(self.requests) > MAX_RECORDED:
            del self.requests[: len(self.requests) - MAX_RECORDED]

    def new_id(self) -> str:
        """A completion id, `chatcmpl-mock000001` and on."""
        self._next_id += 1
        return f"chatcmpl-mock{self._next_id:06d}"

    def should_fail(self, options: _Options) -> bool:
        """Count this request against ``fail_times``; True when it must fail."""
        if "status" not in options.ints:
            return False
        if "fail_times" not in options.ints:
            return True
        key = " ".join(f"{k}={v}" for k, v in sorted(options.raw.items()))
        count = self._fail_counts.get(key, 0) + 1
        self._fail_counts[key] = count
        return count <= options.ints["fail_times"]


class _Connection:
    """One client connection: a keep-alive loop of request/response cycles."""

    def __init__(
        self, mock: MockLLM, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.mock = mock
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_READ_SIZE)
        self.closed = False
        self.head = False

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                if self.conn.they_are_waiting_for_100_continue:
                    self._send(h11.InformationalResponse(status_code=100, headers=[]))
                    await self.writer.drain()
                self.conn.receive_data(await self.reader.read(_READ_SIZE))
                continue
            return event

    async def serve(self) -> None:
        while not self.closed:
            try:
                event = await self._next_event()
                if not isinstance(event, h11.Request):
                    return
                body = bytearray()
                while True:
                    part = await self._next_event()
                    if isinstance(part, h11.Data):
                        body += part.data
                        if len(body) > MAX_BODY_BYTES:
                            await self._error(413, "request body too large", "request_too_large")
                            return
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
            except h11.RemoteProtocolError as exc:
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    with contextlib.suppress(h11.LocalProtocolError):
                        await self._error(400, f"bad HTTP request: {exc}", "bad_request")
                return
            await self._handle(event, bytes(body))
            if self.closed or self.conn.our_state is not h11.DONE:
                return
            if self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    # ------------------------------------------------------------------ sending

    def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)

    def _headers(
        self, content_type: str, extra: list[tuple[str, str]] | None = None
    ) -> list[tuple[str, str]]:
        headers = [("content-type", content_type), ("server", "mock-llm")]
        return headers + (extra or [])

    async def _respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = self._headers(content_type, extra)
        headers.append(("content-length", str(len(body))))
        self._send(h11.Response(status_code=status, headers=headers))
        if not self.head:  # h11 refuses a body in a HEAD response
            self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())
        await self.writer.drain()

    async def _error(
        self, status: int, message: str, code: str | None, type_: str = "invalid_request_error"
    ) -> None:
        await self._respond(status, _error_json(message, type_, code))

    async def _close_now(self) -> None:
        """End the connection after flushing what was written, with no HTTP ending."""
        self.closed = True
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()
        self.writer.close()

    async def _hang(self) -> None:
        """Send nothing more until the client closes its side."""
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()
            while await self.reader.read(_READ_SIZE):
                pass
        self.closed = True

    # ------------------------------------------------------------------ routing

    async def _handle(  # noqa: PLR0911, PLR0912, PLR0915  # one branch and return per route, in order
        self, request: h11.Request, raw_body: bytes
    ) -> None:
        method = request.method.decode("ascii", "replace").upper()
        self.head = method == "HEAD"
        target = request.target.decode("utf-8", "replace")
        path = target.split("?", 1)[0]
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        body: Any = None
        bad_json = False
        if raw_body:
            try:
                body = json.loads(raw_body)
            except (ValueError, UnicodeDecodeError):
                bad_json = True
                body = raw_body.decode("utf-8", "replace")
        self.mock.record(method, target, headers, body)

        if path == "/health" and method in ("GET", "HEAD"):
            await self._respond(200, b"ok", "text/plain")
            return
        if path == "/mock/requests":
            if method == "GET":
                await self._respond(200, _dumps(self.mock.requests).encode())
            elif method == "DELETE":
                self.mock.clear_requests()
                await self._respond(200, b'{"cleared":true}')
            else:
                await self._error(
                    405, f"Method {method} not allowed on {path}", "method_not_allowed"
                )
            return
        if path.startswith("/mock/images/") and method in ("GET", "HEAD"):
            png = self.mock.pictures.get(path.rsplit("/", 1)[-1])
            if png is None:
                await self._error(404, f"no picture at {path}", "not_found")
            else:
                await self._respond(200, png, "image/png")
            return
        known = {
            "/v1/models": "GET",
            "/v1/chat/completions": "POST",
            "/v1/audio/speech": "POST",
            "/v1/audio/transcriptions": "POST",
            "/v1/images/generations": "POST",
        }
        if path not in known:
            await self._error(404, f"Invalid URL ({method} {path})", "not_found")
            return
        if self.mock.api_key is not None:
            auth = headers.get("authorization", "")
            if auth != f"Bearer {self.mock.api_key}":
                await self._error(
                    401,
                    "Incorrect API key provided. You can find your API key in the mock's settings.",
                    "invalid_api_key",
                )
                return
        if method != known[path]:
            await self._error(405, f"Method {method} not allowed on {path}", "method_not_allowed")
            return
        if path == "/v1/models":
            models = {
                "object": "list",
                "data": [
                    {"id": self.mock.model, "object": "model", "created": 0, "owned_by": "mock"}
                ],
            }
            await self._respond(200, _dumps(models).encode())
            return
        if path == "/v1/audio/transcriptions":
            await self._transcription(headers.get("content-type", ""), raw_body)
            return
        if bad_json or not isinstance(body, dict):
            await self._error(400, "We could not parse the JSON body of your request.", "bad_json")
            return
        if path == "/v1/audio/speech":
            await self._speech(body, headers.get("x-mock"))
            return
        try:
            if path == "/v1/images/generations":
                await self._generate(body, headers)
                return
            await self._chat(body, headers.get("x-mock"), headers.get("authorization", ""))
        except _BadRequestError as exc:
            await self._error(400, str(exc), "bad_request")

    # ------------------------------------------------------------------ audio

    async def _speech(self, body: dict[str, Any], header: str | None) -> None:
        """`/audio/speech`: espeak-ng (or a tone) with its mark, streamed in pieces.

        Directives (in `input` or `X-Mock`): `status`, `first_byte_delay_ms`,
        `delay_ms` (between 100 ms pieces of audio), `hang`, `cut_after` (pieces).
        """
        from bridge.dev import mock_audio  # noqa: PLC0415 (numpy only when audio is asked for)

        text = body.get("input")
        directives = parse_directives(text) if isinstance(text, str) else {}
        if header:
            directives.update(parse_directives(header))
        opts = _options(directives)
        if isinstance(text, str):
            body = dict(body, input=strip_directives(text))
        try:
            text, _voice, fmt, speed = mock_audio.check_speech_body(body)
        except ValueError as exc:
            await self._error(400, str(exc), "bad_request")
            return
        if opts.get("first_byte_delay_ms"):
            await asyncio.sleep(opts.get("first_byte_delay_ms") / 1000)
        if self.mock.should_fail(opts):
            await self._respond(opts.get("status"), _status_error(opts.get("status")))
            return
        samples = await mock_audio.speak(text, "en", speed)
        data, ctype = mock_audio.encode(samples, fmt)
        self._send(h11.Response(status_code=200, headers=self._headers(ctype)))
        if opts.get("hang"):
            await self._hang()
            return
        piece = mock_audio.RATE // 10 * 2  # 100 ms of 16-bit audio
        for n, at in enumerate(range(0, len(data), piece)):
            if opts.has("cut_after") and n >= opts.get("cut_after"):
                await self._close_now()
                return
            self._send(h11.Data(data=data[at : at + piece]))
            await self.writer.drain()
            if opts.get("delay_ms"):
                await asyncio.sleep(opts.get("delay_ms") / 1000)
        self._send(h11.EndOfMessage())
        await self.writer.drain()

    async def _transcription(self, content_type: str, raw: bytes) -> None:
        """`/audio/transcriptions`: reads back the marks of the mock's own speech."""
        from bridge.dev import mock_audio  # noqa: PLC0415

        try:
            fields = mock_audio.parse_multipart(content_type, raw)
            if "file" not in fields or not fields["file"][1]:
                raise ValueError("'file' is required")
            model = fields.get("model", (None, b""))[1].decode("utf-8", "replace")
            if not model:
                raise ValueError("'model' is required")
            text, seconds = mock_audio.transcribe(fields["file"][1])
        except ValueError as exc:
            await self._error(400, str(exc), "bad_request")
            return
        fmt = fields.get("response_format", (None, b"json"))[1].decode("utf-8", "replace")
        if fmt == "text":
            await self._respond(200, text.encode(), "text/plain; charset=utf-8")
            return
        out: dict[str, Any] = {"text": text}
        if fmt == "verbose_json":
            out.update(task="transcribe", language="english", duration=seconds)
        await self._respond(200, _dumps(out).encode())

    # ------------------------------------------------------------------ chat

    async def _generate(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        """``/images/generations``: one deterministic picture of the prompt."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _BadRequestError("'prompt' must be a non-empty string")
        size = body.get("size", "auto")
        m = re.fullmatch(r"([1-9][0-9]{1,3})x([1-9][0-9]{1,3})", size) if size != "auto" else None
        if size != "auto" and m is None:
            raise _BadRequestError(f"Invalid value for 'size': {str(size)[:40]!r}")
        width, height = (int(m.group(1)), int(m.group(2))) if m else (1024, 1024)
        if body.get("n", 1) != 1:
            raise _BadRequestError("the mock draws one picture a request (n=1)")
        form = body.get("response_format", "b64_json")
        if form not in ("b64_json", "url"):
            raise _BadRequestError(f"Invalid value for 'response_format': {str(form)[:40]!r}")
        directives = parse_directives(" ".join(_DIRECTIVE_RE.findall(prompt)))
        if headers.get("x-mock"):
            directives.update(parse_directives(headers["x-mock"]))
        opts = _options(directives)
        echo = _auth_echo(opts, headers.get("authorization", ""))
        if opts.get("first_byte_delay_ms"):
            await asyncio.sleep(opts.get("first_byte_delay_ms") / 1000)
        if self.mock.should_fail(opts):
            status = opts.get("status")
            error = _status_error(status)
            if echo is not None:
                error = _error_json(echo, "invalid_request_error", "invalid_api_key")
            await self._respond(status, error)
            return
        out = io.BytesIO()
        picture(prompt, width, height, noise=bool(opts.get("noise"))).save(out, "PNG")
        png = out.getvalue()
        item: dict[str, Any] = {"revised_prompt": strip_directives(prompt)}
        if form == "url" or opts.get("url"):
            name = f"{self.mock.new_id()}.png"
            self.mock.pictures[name] = png
            while len(self.mock.pictures) > 16:
                del self.mock.pictures[next(iter(self.mock.pictures))]
            host = headers.get("host", f"127.0.0.1:{self.mock.port}")
            item["url"] = f"{self.mock.scheme}://{host}/mock/images/{name}"
        else:
            item["b64_json"] = base64.b64encode(png).decode()
        # `usage` as gpt-image-1 reports it: a token per word of the prompt, and one
        # per 64x64 tile of the picture (a stand-in for its real tariff).
        words = len(strip_directives(prompt).split())
        tiles = -(-width // 64) * -(-height // 64)
        usage = {"input_tokens": words, "output_tokens": tiles, "total_tokens": words + tiles}
        result = {"created": int(time.time()), "data": [item], "usage": usage}
        await self._respond(200, _dumps(result).encode())

    async def _chat(  # noqa: PLR0912  # one branch per reply kind the mock plays
        self, body: dict[str, Any], header: str | None, auth: str = ""
    ) -> None:
        conv = _conversation(body)
        directives = parse_directives(conv.directive_text) if conv.directive_text else {}
        if header:
            directives.update(parse_directives(header))
        opts = _options(directives)
        images = _image_parts(body)
        if images and self.mock.requests:
            self.mock.requests[-1]["images"] = images
        if opts.has("images_max_side"):
            limit = opts.get("images_max_side")
            for n, info in enumerate(images, 1):
                ok = info.get("format") == "JPEG" and info.get("media_type") == "image/jpeg"
                if not ok or max(info.get("width", 0), info.get("height", 0)) > limit:
                    raise _BadRequestError(
                        f"image {n} is not an inline JPEG of at most {limit} px: {info}"
                    )
        opts.echo = _auth_echo(opts, auth)

        if opts.get("first_byte_delay_ms"):
            await asyncio.sleep(opts.get("first_byte_delay_ms") / 1000)
        extra: list[tuple[str, str]] = []
        if "retry_after" in opts.raw:
            extra.append(("retry-after", opts.raw["retry_after"]))
        if self.mock.should_fail(opts):
            status = opts.get("status")
            error = _status_error(status)
            if opts.echo is not None:
                error = _error_json(opts.echo, "invalid_request_error", "invalid_api_key")
            await self._respond(status, error, extra=extra)
            return
        stream = bool(body.get("stream", False))
        if "corpus" in opts.raw:
            await self._corpus(opts, extra)
            return
        default_type = "text/event-stream" if stream else "application/json"
        content_type = opts.raw.get("content_type", default_type)
        if opts.get("hang"):
            self._send(h11.Response(status_code=200, headers=self._headers(content_type, extra)))
            await self._hang()
            return
        if stream:
            plan = self._plan_stream(body, conv, opts)
            self._send(h11.Response(status_code=200, headers=self._headers(content_type, extra)))
            await self._write_stream(plan, opts)
        else:
            await self._complete(body, conv, opts, content_type, extra)

    def _reply(self, body: dict[str, Any], conv: _Conversation, opts: _Options) -> _Reply:
        """Decide the reply: content tokens, reasoning, refusal or a tool call."""
        limit = None
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                limit = value if limit is None else min(limit, value)
        tools = body.get("tools")
        names = _tool_names(tools)
        calls: list[tuple[str, str]] = []
        wants_tool = opts.get("tool") or "call tool" in strip_directives(conv.prompt).lower()
        if "call" in opts.raw and conv.tool_rounds < opts.get("rounds", 1):
            calls = _scripted_calls(opts.raw["call"], names, bool(opts.get("bad_args")))
        elif names and wants_tool and conv.tool_result is None:
            calls = [(names[0] or "tool", _dumps({"q": strip_directives(conv.prompt)}))]
        tokens = reply_tokens(
            conv.prompt,
            opts.ints.get("tokens"),
            images=conv.images,
            tool_result=conv.tool_result,
        )
        finish = "stop"
        if limit is not None and len(tokens) > limit:
            tokens = tokens[:limit]
            finish = "length"
        refusal = bool(opts.get("refusal"))
        if refusal:
            tokens = _words_to_tokens(REFUSAL_TEXT.split())
            finish = "stop"
        if calls:
            finish = "tool_calls"
        return _Reply(
            tokens=tokens,
            finish=finish,
            reasoning=reasoning_tokens(opts.get("reasoning")),
            refusal=refusal,
            calls=calls,
            round=conv.tool_rounds,
        )

    def _usage(self, conv: _Conversation, completion: int, reasoning: int) -> dict[str, Any]:
        return {
            "prompt_tokens": conv.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": conv.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }

    def _plan_stream(  # noqa: PLR0912, PLR0915  # each fault directive shapes the plan in turn
        self, body: dict[str, Any], conv: _Conversation, opts: _Options
    ) -> _Stream:
        reply = self._reply(body, conv, opts)
        model = body.get("model") if isinstance(body.get("model"), str) else self.mock.model
        head = _dumps(
            {
                "id": self.mock.new_id(),
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_mock",
            }
        )[:-1]
        prefix = f'data: {head},"choices":[{{"index":0,"delta":'
        suffix = ',"logprobs":null,"finish_reason":null}]}\n\n'

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            tail = suffix if finish is None else suffix.replace("null}]", f'"{finish}"}}]')
            return (prefix + _dumps(delta) + tail).encode()

        plan = _Stream()
        plan.events.append(_Event(chunk({"role": "assistant", "content": ""})))
        for piece in reply.reasoning:
            plan.events.append(_Event(chunk({"reasoning_content": piece}), paced=True))
        content: list[_Event] = []
        if reply.calls:
            if opts.get("preamble"):
                for token in _words_to_tokens(PREAMBLE_TEXT.split()):
                    content.append(_Event(chunk({"content": token}), paced=True))
            for index, (name, args) in enumerate(reply.calls):
                opening = {
                    "index": index,
                    "id": reply.call_id(index),
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                content.append(_Event(chunk({"tool_calls": [opening]}), paced=True))
                step = max(1, -(-len(args) // 4))
                for i in range(0, len(args), step):
                    fragment = {"index": index, "function": {"arguments": args[i : i + step]}}
                    content.append(_Event(chunk({"tool_calls": [fragment]}), paced=True))
        else:
            key = "refusal" if reply.refusal else "content"
            stamp = bool(opts.get("stamp")) and not reply.refusal
            stamp_prefix = (prefix + '{"content":"').encode()
            stamp_suffix = ('"}' + suffix).encode()
            for token in reply.tokens:
                if stamp:
                    content.append(_Event(stamp_prefix, paced=True, stamp_suffix=stamp_suffix))
                else:
                    content.append(_Event(chunk({key: token}), paced=True))
        malformed = opts.get("malformed_at")
        if 0 < malformed <= len(content) and content[malformed - 1].stamp_suffix is None:
            good = content[malformed - 1].data
            content[malformed - 1] = _Event(
                good[: len(good) // 2].rstrip(b"\n") + b"\n\n", paced=True
            )
        completion = len(content) + len(reply.reasoning)

        for key in ("cut_after", "error_event_at", "event_error_at"):
            if opts.has(key):
                plan.events.extend(content[: opts.get(key)])
                if key == "cut_after":
                    plan.cut = True
                else:
                    error = _MOCK_ERROR
                    if opts.echo is not None:
                        error = _error_json(opts.echo, "server_error", "mock_error").decode()
                    frame = "data" if key == "error_event_at" else "event: error\ndata"
                    plan.events.append(_Event(f"{frame}: {error}\n\n".encode()))
                return self._keepalive(plan, opts)

        plan.events.extend(content)
        plan.events.append(_Event(chunk({}, reply.finish)))
        if opts.get("cut_after_finish"):
            plan.cut = True
            return self._keepalive(plan, opts)
        stream_options = body.get("stream_options")
        if isinstance(stream_options, dict) and stream_options.get("include_usage"):
            usage = self._usage(conv, completion, len(reply.reasoning))
            plan.events.append(
                _Event(f"data: {head},{_dumps({'choices': [], 'usage': usage})[1:]}\n\n".encode())
            )
        plan.events.append(_Event(b"data: [DONE]\n\n"))
        return self._keepalive(plan, opts)

    @staticmethod
    def _keepalive(plan: _Stream, opts: _Options) -> _Stream:
        if not opts.get("keepalive"):
            return plan
        events: list[_Event] = []
        for i, event in enumerate(plan.events):
            if i:
                events.append(_Event(b": keep-alive\n\n"))
            events.append(event)
        plan.events = events
        return plan

    async def _write_stream(self, plan: _Stream, opts: _Options) -> None:
        delay = opts.get("delay_ms", -1)
        delay_s = (self.mock.delay_ms if delay < 0 else delay) / 1000
        events = plan.events
        stamped = any(e.stamp_suffix is not None for e in events)
        if delay_s <= 0 and not stamped:
            data = b"".join(e.data for e in events)
            self._send(h11.Data(data=data))
        else:
            for n, event in enumerate(events):
                if event.paced and delay_s > 0:
                    await asyncio.sleep(delay_s)
                if event.stamp_suffix is not None:
                    data = event.data + f"{time.monotonic_ns()} ".encode() + event.stamp_suffix
                else:
                    data = event.data
                self._send(h11.Data(data=data))
                await self.writer.drain()
                if delay_s <= 0 and n % 16 == 15:
                    await asyncio.sleep(0)
        if plan.cut:
            await self._close_now()
            return
        self._send(h11.EndOfMessage())
        await self.writer.drain()

    async def _complete(
        self,
        body: dict[str, Any],
        conv: _Conversation,
        opts: _Options,
        content_type: str,
        extra: list[tuple[str, str]],
    ) -> None:
        reply = self._reply(body, conv, opts)
        delay = opts.get("delay_ms", -1)
        delay_s = (self.mock.delay_ms if delay < 0 else delay) / 1000
        if delay_s > 0:
            await asyncio.sleep(delay_s * len(reply.tokens))
        text = "".join(reply.tokens)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        completion = len(reply.tokens)
        if reply.refusal:
            message["content"] = None
            message["refusal"] = text
        if reply.reasoning:
            message["reasoning_content"] = "".join(reply.reasoning)
        if reply.calls:
            message["content"] = PREAMBLE_TEXT if opts.get("preamble") else None
            message["tool_calls"] = [
                {
                    "id": reply.call_id(index),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                }
                for index, (name, args) in enumerate(reply.calls)
            ]
            completion = 5 * len(reply.calls)
        model = body.get("model") if isinstance(body.get("model"), str) else self.mock.model
        result = {
            "id": self.mock.new_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}
            ],
            "usage": self._usage(conv, completion + len(reply.reasoning), len(reply.reasoning)),
        }
        data = _dumps(result).encode()
        if opts.get("malformed_at"):
            data = data[: len(data) // 2]
        if opts.has("cut_after"):
            headers = [*self._headers(content_type, extra), ("content-length", str(len(data)))]
            self._send(h11.Response(status_code=200, headers=headers))
            self._send(h11.Data(data=data[: len(data) // 2]))
            await self._close_now()
            return
        await self._respond(200, data, content_type, extra)

    async def _corpus(self, opts: _Options, extra: list[tuple[str, str]]) -> None:
        name = opts.raw["corpus"]
        directory = self.mock.corpus_dir
        if not _CORPUS_NAME_RE.match(name) or directory is None:
            await self._error(404, f"mock corpus {name!r} not found", "corpus_not_found")
            return
        path = directory / f"{name}.sse"
        if not path.is_file():
            await self._error(
                404, f"mock corpus {name!r} not found in {directory}", "corpus_not_found"
            )
            return
        data = path.read_bytes()
        offsets: list[int] = []
        pause = _SLICE_PAUSE_S
        split = opts.get("split")
        if split > 0:
            offsets = list(range(split, len(data), split))
            pause = _SPLIT_PAUSE_S
        else:
            meta_path = directory / f"{name}.json"
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                transport = meta.get("transport") if isinstance(meta, dict) else None
                if isinstance(transport, dict):
                    bounds = transport.get("chunk_boundaries")
                    if isinstance(bounds, list):
                        offsets = sorted(
                            b for b in bounds if isinstance(b, int) and 0 < b < len(data)
                        )
        content_type = opts.raw.get("content_type", "text/event-stream")
        self._send(h11.Response(status_code=200, headers=self._headers(content_type, extra)))
        await self.writer.drain()
        start = 0
        for end in [*offsets, len(data)]:
            if end > start:
                if start:
                    await asyncio.sleep(pause)
                self._send(h11.Data(data=data[start:end]))
                await self.writer.drain()
            start = end
        self._send(h11.EndOfMessage())
        await self.writer.drain()


# --------------------------------------------------------------------------- threads


@dataclass
class MockHandle:
    """A mock running in a background thread (see :func:`running_mock`)."""

    server: MockLLM
    port: int
    base_url: str
    loop: asyncio.AbstractEventLoop

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The requests the server recorded."""
        return self.server.requests


@contextlib.contextmanager
def running_mock(  # noqa: PLR0913  # keyword-only: the mock's options, as the CLI's flags
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    api_key: str | None = None,
    delay_ms: float = 0.0,
    corpus_dir: Path | None = None,
    model: str = "mock-1",
) -> Iterator[MockHandle]:
    """Run a :class:`MockLLM` on its own event loop in a daemon thread.

    Why: synchronous tests (and tests whose own loop must not be blocked by
    the server) get a live HTTP endpoint with one ``with`` statement.
    """
    server = MockLLM(api_key=api_key, delay_ms=delay_ms, corpus_dir=corpus_dir, model=model)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mock-llm", daemon=True)
    thread.start()
    try:
        bound = asyncio.run_coroutine_threadsafe(
            server.start(host, port, ssl_context), loop
        ).result(timeout=10)
        scheme = "https" if ssl_context is not None else "http"
        yield MockHandle(
            server=server, port=bound, base_url=f"{scheme}://{host}:{bound}/v1", loop=loop
        )
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mock-llm`` options to ``parser`` (shared with ``llm-bridge mock-llm``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="default pause between streamed tokens"
    )
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=None,
        help="directory of NAME.sse bodies for the corpus= directive"
        " (default: the repository's tests/fixtures/streams)",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status."""
    ssl_context: ssl.SSLContext | None = None
    if args.tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)

    async def main() -> None:
        server = MockLLM(api_key=args.api_key, delay_ms=args.delay_ms, corpus_dir=args.corpus_dir)
        port = await server.start(args.host, args.port, ssl_context)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        scheme = "https" if ssl_context is not None else "http"
        print(f"mock LLM listening on {scheme}://{args.host}:{port}/v1", flush=True)
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m bridge.dev.mock_llm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
