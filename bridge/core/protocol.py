"""Protocol v1's messages: the request a device sends, and the replies it gets.

This module is the executable half of `docs/protocol.md`: everything a device
or integration can observe is encoded or validated here, and nothing here
does I/O.
"""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from bridge.core.errors import (  # re-exported: the codes are part of the protocol
    BAD_REQUEST as BAD_REQUEST,
    CANCELLED as CANCELLED,
    IMAGE_TIMEOUT as IMAGE_TIMEOUT,
    INTERNAL as INTERNAL,
    INTERRUPTED as INTERRUPTED,
    OVERLOADED as OVERLOADED,
    TOO_LARGE as TOO_LARGE,
    TOPIC_NOT_ALLOWED as TOPIC_NOT_ALLOWED,
    UPSTREAM_ERROR as UPSTREAM_ERROR,
    UPSTREAM_PROTOCOL as UPSTREAM_PROTOCOL,
    UPSTREAM_STATUS as UPSTREAM_STATUS,
    UPSTREAM_TIMEOUT as UPSTREAM_TIMEOUT,
    UPSTREAM_UNREACHABLE as UPSTREAM_UNREACHABLE,
    ProtocolError as ProtocolError,
)

# Voice (protocol v2, docs/protocol.md "Voice").
BAD_AUDIO = "bad_audio"
AUDIO_TOO_LONG = "audio_too_long"
AUDIO_TIMEOUT = "audio_timeout"
NO_SPEECH = "no_speech"
AUDIO_FORMAT = "audio_format"

# The seq of an `interrupted` terminal sent by a worker that took the place of a dead
# one on another host: it cannot know how far the reply went, so it is above any seq.
SEQ_UNKNOWN = 0xFFFFFFFF
ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SALVAGE_ID_RE = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_\-]{1,64})"')
RESERVED_DEVICE_IDS = frozenset({"bridge"})


def valid_id(value: str) -> bool:
    """Whether a device or request id may stand as one topic level."""
    return ID_RE.fullmatch(value) is not None


def valid_device_id(value: str) -> bool:
    """Whether a device id is valid and not one the bridge keeps for itself."""
    return valid_id(value) and value not in RESERVED_DEVICE_IDS


def new_request_id() -> str:
    """An id for a request that came without one (12 hex digits)."""
    return os.urandom(6).hex()


def salvage_id(payload: bytes) -> str | None:
    """Find a request id at the start of a payload that cannot be parsed whole."""
    m = _SALVAGE_ID_RE.search(payload[:256])
    return m.group(1).decode() if m else None


# --- requests -------------------------------------------------------------------------------

_Strict = ConfigDict(extra="forbid", strict=True)


class _ImageUrl(BaseModel):
    model_config = _Strict
    url: StrictStr = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = _Strict
    type: Literal["text"]
    text: StrictStr


class ImagePart(BaseModel):
    model_config = _Strict
    type: Literal["image_url"]
    image_url: _ImageUrl


class _VideoUrl(BaseModel):
    model_config = _Strict
    url: StrictStr = Field(min_length=1)


class VideoPart(BaseModel):
    """A video (Qwen-VL and others take one; ChatAgent sends it): forwarded as it is."""

    model_config = _Strict
    type: Literal["video_url"]
    video_url: _VideoUrl


class _InputAudio(BaseModel):
    model_config = _Strict
    data: StrictStr = Field(min_length=1)
    format: StrictStr = Field(min_length=1, max_length=16)


class AudioPart(BaseModel):
    """Inline audio for models that hear (base64 `data`, `format` wav or mp3): forwarded."""

    model_config = _Strict
    type: Literal["input_audio"]
    input_audio: _InputAudio


Part = Annotated[TextPart | ImagePart | VideoPart | AudioPart, Field(discriminator="type")]


class _FunctionCall(BaseModel):
    model_config = _Strict
    name: StrictStr
    arguments: StrictStr


class _ToolCall(BaseModel):
    model_config = _Strict
    id: StrictStr
    type: Literal["function"] = "function"
    function: _FunctionCall


class Message(BaseModel):
    """One OpenAI chat message, as a device may send it."""

    model_config = _Strict
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[Part] | None = None
    name: StrictStr | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: StrictStr | None = None


class _FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: StrictStr = Field(min_length=1, max_length=64)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = _Strict
    type: Literal["function"]
    function: _FunctionDef


class _ToolChoiceFunction(BaseModel):
    model_config = _Strict
    name: StrictStr


class _ToolChoice(BaseModel):
    model_config = _Strict
    type: Literal["function"]
    function: _ToolChoiceFunction


Number = StrictInt | StrictFloat

# Picture formats a device may ask for (docs/protocol.md "Pictures", protocol v2).
PICTURE_FORMATS = ("rgb565", "rgb565_be", "mono1", "mono1_vlsb", "gray4", "jpeg", "png")
PictureFormat = Literal["rgb565", "rgb565_be", "mono1", "mono1_vlsb", "gray4", "jpeg", "png"]
RawFormat = Literal["rgb565", "rgb565_be", "mono1", "mono1_vlsb", "gray4"]
_TOPIC_NAME = r"^[^#+\x00]{1,256}$"


class ImageSource(BaseModel):
    """One picture for the model: the latest on an MQTT topic, or the device's upload.

    An upload is an encoded image file unless `format` says it is a raw frame of
    `width` x `height` pixels."""

    model_config = _Strict
    topic: Annotated[StrictStr, Field(pattern=_TOPIC_NAME)] | None = None
    upload: Literal[True] | None = None
    format: RawFormat | None = None
    width: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    height: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImageSource:
        if (self.topic is None) == (self.upload is None):
            raise ValueError('an image is either {"topic": …} or {"upload": true}')
        raw = (self.format, self.width, self.height)
        if any(v is not None for v in raw) and (self.upload is None or None in raw):
            raise ValueError("a raw upload gives format, width and height together")
        return self


class ImageOut(BaseModel):
    """A picture to generate and send in the device's own pixel format."""

    model_config = _Strict
    prompt: StrictStr = Field(min_length=1, max_length=4000)
    width: Annotated[StrictInt, Field(ge=1, le=2048)]
    height: Annotated[StrictInt, Field(ge=1, le=2048)]
    format: PictureFormat
    piece_bytes: Annotated[StrictInt, Field(ge=64, le=65536)] = 1024
    model: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None


# Fields copied to the upstream body exactly as the device sent them.
SAMPLING_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "reasoning_effort",
)


class SpeakSpec(BaseModel):
    """`speak`: how the reply is spoken (protocol v2); unset fields come from the policy."""

    model_config = _Strict
    format: Literal["pcm16", "wav", "mp3"] | None = None
    rate: Literal[8000, 16000, 22050, 24000] | None = None
    voice: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    lead_ms: Annotated[StrictInt, Field(ge=20, le=60000)] | None = None
    chunk_bytes: Annotated[StrictInt, Field(ge=256, le=65536)] | None = None


LISTEN_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


class ListenSpec(BaseModel):
    """`listen`: the prompt is an utterance the device streams on `P/D/listen/R` (v2)."""

    model_config = _Strict
    rate: Literal[8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000] = 16000
    transcript_only: StrictBool = False
    language: Annotated[StrictStr, Field(min_length=2, max_length=16)] | None = None


class ChatRequest(BaseModel):
    """A request on `P/D/req`: unknown fields and wrong types are refused, not coerced."""

    model_config = _Strict
    id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] | None = None
    prompt: StrictStr | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    system: StrictStr | None = None
    model: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    stream: StrictBool = True
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | _ToolChoice | None = None
    chunk_bytes: Annotated[StrictInt, Field(ge=8, le=65536)] | None = None
    chunk_ms: Annotated[StrictInt, Field(ge=1, le=10000)] | None = None
    chunk_sentences: StrictBool = False
    # protocol v2, "Tools": the bridge offers the device's own and granted tools and runs them.
    use_tools: StrictBool = False
    # Conversations kept by the bridge (protocol v2, bridge/plugins/sessions.py).
    session: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] | None = None
    session_reset: StrictBool = False
    # Voice (protocol v2).
    speak: StrictBool | SpeakSpec | None = None
    listen: ListenSpec | None = None
    # Pictures (protocol v2): pictures in (camera topics, an upload), a picture out.
    images: Annotated[list[ImageSource], Field(min_length=1, max_length=4)] | None = None
    image: ImageOut | None = None

    @model_validator(mode="after")
    def _one_input(self) -> ChatRequest:
        if self.image is not None:
            if self.prompt is not None or self.messages is not None or self.images is not None:
                raise ValueError("an image request has no prompt, messages or images")
        elif self.listen is not None:
            if self.prompt is not None:
                raise ValueError("a listen request has no prompt: the utterance is the prompt")
            if self.id is None:
                raise ValueError("a listen request needs an id: its audio goes to listen/<id>")
        elif (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.images is not None and sum(1 for i in self.images if i.upload) > 1:
            raise ValueError("images: at most one upload per request")
        if self.use_tools and self.tools is not None:
            raise ValueError("give tools or use_tools, not both")
        if self.session_reset and self.session is None:
            raise ValueError("session_reset needs a session")
        return self

    @property
    def chunked(self) -> bool:
        """Whether the reply is merged into larger pieces before it is published."""
        return bool(self.chunk_bytes or self.chunk_ms or self.chunk_sentences)

    def upstream_messages(self) -> list[dict[str, Any]]:
        """The conversation as the API expects it, with `system` first."""
        out: list[dict[str, Any]] = []
        if self.system is not None:
            out.append({"role": "system", "content": self.system})
        if self.prompt is not None:
            out.append({"role": "user", "content": self.prompt})
        elif self.messages is not None:  # neither: a `listen` or `image` request
            out.extend(m.model_dump(exclude_none=True) for m in self.messages)
        return out

    def upstream_body(self, default_model: str, include_usage: bool) -> dict[str, Any]:
        """The JSON body for `POST /chat/completions` (always streamed upstream)."""
        body: dict[str, Any] = {
            "model": self.model or default_model,
            "messages": self.upstream_messages(),
            "stream": True,
        }
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        for name in SAMPLING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.tools is not None:
            body["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.tool_choice is not None:
            tc = self.tool_choice
            body["tool_choice"] = tc if isinstance(tc, str) else tc.model_dump()
        return body


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _loads(text: str) -> Any:
    """`json.loads` of standard JSON only: NaN, Infinity and numbers beyond a float are
    refused, since the upstream body (strict JSON) could not carry them."""
    return json.loads(text, parse_constant=_not_a_number, parse_float=_finite)


def _encodable(data: Any) -> bool:
    """Whether every string in `data` is valid Unicode (a lone `\\udXXX` escape is not)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def parse_request(payload: bytes, max_bytes: int) -> ChatRequest:
    """Turn a `P/D/req` payload into a request, or raise ProtocolError saying why.

    A payload whose first non-blank character is `{` is JSON; any other valid
    UTF-8 text is a prompt.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(
            TOO_LARGE,
            f"request is {len(payload)} bytes, more than the {max_bytes} allowed",
            salvage_id(payload),
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(
            BAD_REQUEST, "request is not valid UTF-8", salvage_id(payload)
        ) from None
    stripped = text.strip()
    if not stripped:
        raise ProtocolError(BAD_REQUEST, "request is empty")
    if not stripped.startswith("{"):
        return ChatRequest.model_validate({"prompt": stripped})
    try:
        data = _loads(stripped)
    except RecursionError:
        raise ProtocolError(
            BAD_REQUEST, "request is nested too deeply", salvage_id(payload)
        ) from None
    except ValueError as exc:
        raise ProtocolError(
            BAD_REQUEST, f"request is not valid JSON: {exc}", salvage_id(payload)
        ) from None
    rid = data.get("id") if isinstance(data, dict) else None
    known = rid if isinstance(rid, str) and valid_id(rid) else None
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, "request must be a JSON object")
    if _SURROGATE_ESCAPE_RE.search(stripped) and not _encodable(data):
        raise ProtocolError(
            BAD_REQUEST, "request holds a lone UTF-16 surrogate (\\ud800-\\udfff)", known
        )
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(BAD_REQUEST, _describe(exc), known) from None


def parse_cancel(payload: bytes) -> str | None:
    """The request id named by a `P/D/cancel` payload, or None when there is none."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("{"):
        try:
            data = _loads(text)
        except (ValueError, RecursionError):
            return None
        rid = data.get("id") if isinstance(data, dict) else None
        return rid if isinstance(rid, str) and valid_id(rid) else None
    return text if valid_id(text) else None


# --- replies --------------------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _utf8(text: str) -> bytes:
    """UTF-8 for the wire; a lone UTF-16 surrogate (which an API's JSON may carry, as
    `\\ud83d` without its pair) becomes U+FFFD instead of failing the request."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


def delta_message(seq: int, text: str) -> bytes:
    """`{"seq":n,"delta":"…"}`, built without a dict since it is sent once per chunk."""
    return b'{"seq":%d,"delta":%s}' % (seq, _utf8(_dumps(text)))


def refusal_message(seq: int, text: str) -> bytes:
    """`{"seq":n,"refusal":"…"}`: a piece of the model's refusal."""
    return b'{"seq":%d,"refusal":%s}' % (seq, _utf8(_dumps(text)))


def done_message(  # noqa: PLR0913  # keyword-only: the `done` terminal's fields
    seq: int,
    *,
    finish_reason: str | None,
    usage: Any,
    model: str,
    text: str | None = None,
    refusal: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The terminal message of a request that completed (`extra`: fields plugins add)."""
    msg: dict[str, Any] = {
        "seq": seq,
        "done": True,
        "finish_reason": finish_reason,
        "usage": usage,
        "model": model,
    }
    if text is not None:
        msg["text"] = text
    if refusal:
        msg["refusal"] = refusal
    if tool_calls:
        msg["tool_calls"] = tool_calls
    if extra:
        msg.update(extra)
    return _utf8(_dumps(msg))


def progress_message(seq: int, fields: dict[str, Any]) -> bytes:
    """`{"seq":n,…}`: a message of a reply that is neither text nor its end (a tool call,
    a transcript), added by a plugin."""
    return _utf8(_dumps({"seq": seq, **fields}))


def error_message(seq: int, code: str, message: str, status: int | None = None) -> bytes:
    """The terminal message of a request that failed."""
    err: dict[str, Any] = {"code": code, "message": message}
    if status is not None:
        err["status"] = status
    return _utf8(_dumps({"seq": seq, "error": err}))
