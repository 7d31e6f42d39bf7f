"""Pictures in and out: camera topics and uploads go to the model, generated images to screens.

docs/protocol.md "Pictures (protocol v2)" is the contract. What comes in (the
latest payload of a camera topic, a device's upload in pieces, an inline
`data:` image) is decoded, scaled to `BRIDGE_IMAGE_MAX_SIDE` and re-encoded as
JPEG before it goes upstream; what goes out (`/images/generations`) is
converted to the device's pixel format and published in pieces on
`P/D/image/R`. Decoding and converting run in worker threads, a few at a time,
so a large picture never holds up other devices' replies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paho.mqtt.client import topic_matches_sub

from bridge.core import protocol as p
from bridge.core.errors import ProtocolError, UpstreamError
from bridge.core.plugin import Host, Inbound, Plugin
from bridge.plugins import imaging

if TYPE_CHECKING:
    from bridge.core.job import Job
    from bridge.core.protocol import ChatRequest
    from bridge.core.settings import Settings

log = logging.getLogger("bridge.images")

# Uploads a device may have pending (not yet taken by a request) at once; the
# oldest one nobody waits for makes room for a new one.
UPLOADS_PER_DEVICE = 4
# Pictures decoded or converted at once (each in a worker thread): bounds CPU and memory.
WORKERS = 2
# The most pieces one generated picture may take (a huge picture in tiny pieces would
# queue that many messages at once); and how many are published between two yields
# to the event loop, so other replies keep flowing meanwhile.
MAX_PIECES = 8192
PIECES_PER_YIELD = 16


class PictureError(Exception):
    """A picture a request cannot have; `code` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Upload:
    limit: int
    data: bytearray = field(default_factory=bytearray)
    next_seq: int = 0
    fmt: int = 0
    done: bool = False
    error: PictureError | None = None
    touched: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waited: bool = False


class Uploads:
    """The devices' uploads on `P/D/upload/R`, assembled per (device, request id).

    Every piece is checked as it comes (header, order, size), so an upload that
    breaks a bound stops growing at once and its request gets the error. Bounds:
    each upload its device's limit, all of them together `total_bytes`, at most
    UPLOADS_PER_DEVICE pending per device, and an upload that stops moving for
    `idle_timeout` seconds is dropped.
    """

    def __init__(self, total_bytes: int, idle_timeout: float) -> None:
        self.total_bytes = total_bytes
        self.idle_timeout = idle_timeout
        self.held = 0
        self._uploads: dict[tuple[str, str], _Upload] = {}

    def __len__(self) -> int:
        return len(self._uploads)

    def feed(self, device: str, rid: str, payload: bytes, limit: int) -> None:
        """One piece from the broker (called in the event loop; never raises)."""
        self.expire()
        key = (device, rid)
        up = self._uploads.get(key)
        if up is None:
            if not self._room_for(device):
                log.warning("upload ignored device=%s id=%s: too many pending", device, rid)
                return
            up = self._uploads[key] = _Upload(limit)
        up.touched = time.monotonic()
        if up.done or up.error is not None:
            return
        try:
            seq, kind, fmt, data = imaging.unpack_piece(payload)
        except ValueError as exc:
            self._fail(up, p.BAD_REQUEST, f"upload: {exc}")
            return
        if seq < up.next_seq:
            return  # a second delivery of a piece already taken
        if seq > up.next_seq:
            self._fail(up, p.BAD_REQUEST, f"upload: piece {seq} came after piece {up.next_seq - 1}")
            return
        up.next_seq += 1
        up.fmt = fmt
        if kind == imaging.ERROR:
            why = imaging.error_text(data) or "no reason given"
            self._fail(up, p.BAD_REQUEST, f"the device gave up its upload: {why}")
        elif kind == imaging.END:
            up.done = True
            up.changed.set()
        elif len(up.data) + len(data) > up.limit:
            self._fail(up, p.TOO_LARGE, f"upload is larger than the {up.limit} bytes allowed")
        elif self.held + len(data) > self.total_bytes:
            self._fail(up, p.OVERLOADED, "the bridge holds too many uploads; try again soon")
        else:
            up.data += data
            self.held += len(data)
            up.changed.set()

    def _room_for(self, device: str) -> bool:
        mine = [k for k in self._uploads if k[0] == device]
        if len(mine) < UPLOADS_PER_DEVICE:
            return True
        for key in mine:  # oldest first (dicts keep insertion order)
            if not self._uploads[key].waited:
                self._drop(key)
                return True
        return False

    def _fail(self, up: _Upload, code: str, message: str) -> None:
        up.error = PictureError(code, message)
        self.held -= len(up.data)
        up.data = bytearray()
        up.changed.set()

    def _drop(self, key: tuple[str, str]) -> None:
        up = self._uploads.pop(key, None)
        if up is not None:
            self.held -= len(up.data)

    def expire(self) -> None:
        """Forget uploads nobody waits for that stopped moving `idle_timeout` ago."""
        horizon = time.monotonic() - self.idle_timeout
        for key, up in list(self._uploads.items()):
            if not up.waited and up.touched < horizon:
                self._drop(key)

    async def take(self, device: str, rid: str, limit: int) -> tuple[bytes, int]:
        """The whole upload for request `rid` and its format code, once its END came.

        Raises:
            PictureError: the upload broke a bound, or made no progress for
                `idle_timeout` seconds (`image_timeout`).
        """
        key = (device, rid)
        up = self._uploads.get(key)
        if up is None:
            up = self._uploads[key] = _Upload(limit)
        up.limit = min(up.limit, limit)
        up.waited = True
        try:
            while True:
                if up.error is not None:
                    raise up.error
                if len(up.data) > up.limit:
                    raise PictureError(
                        p.TOO_LARGE, f"upload is larger than the {up.limit} bytes allowed"
                    )
                if up.done:
                    if not up.data:
                        raise PictureError(p.BAD_REQUEST, "the upload is empty")
                    return bytes(up.data), up.fmt
                up.changed.clear()
                left = up.touched + self.idle_timeout - time.monotonic()
                try:
                    async with asyncio.timeout(max(left, 0)):
                        await up.changed.wait()
                except TimeoutError:
                    if time.monotonic() - up.touched >= self.idle_timeout:
                        got = f"{up.next_seq} pieces, no end" if up.next_seq else "nothing"
                        raise PictureError(
                            p.IMAGE_TIMEOUT,
                            f"upload incomplete after {self.idle_timeout:g} s ({got})",
                        ) from None
        finally:
            self._drop(key)


class Cameras:
    """The latest payload of each camera topic the bridge reads, bounded in bytes.

    A snapshot is kept from its arrival (a retained one arrives when the bridge
    subscribes) until a newer one replaces it or an empty retained message
    clears it; the least recently updated topics go first when `total_bytes`
    is exceeded.
    """

    def __init__(self, max_bytes: int, total_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total_bytes = total_bytes
        self.held = 0
        self._latest: OrderedDict[str, bytes] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[bytes]]] = {}

    def feed(self, topic: str, payload: bytes) -> None:
        """A message on a camera topic (in the event loop; never raises)."""
        old = self._latest.pop(topic, None)
        if old is not None:
            self.held -= len(old)
        if not payload:
            return
        if len(payload) > self.max_bytes:
            log.warning("camera picture on %s ignored: %d bytes", topic, len(payload))
            return
        for fut in self._waiters.pop(topic, []):
            if not fut.done():
                fut.set_result(payload)
        self._latest[topic] = payload
        self.held += len(payload)
        while self.held > self.total_bytes and self._latest:
            _, gone = self._latest.popitem(last=False)
            self.held -= len(gone)

    async def latest(self, topic: str, wait: float) -> bytes:
        """The topic's latest picture at once, else the next one within `wait` seconds."""
        have = self._latest.get(topic)
        if have is not None:
            return have
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(topic, []).append(fut)
        try:
            async with asyncio.timeout(wait):
                return await fut
        except TimeoutError:
            raise PictureError(
                p.IMAGE_TIMEOUT, f"no picture on {topic} within {wait * 1000:g} ms"
            ) from None
        finally:
            waiting = self._waiters.get(topic)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiters[topic]


# --- the request's body ------------------------------------------------------------------------


def add_images(body: dict[str, Any], urls: list[str]) -> None:
    """Append image parts to the conversation's last user message (the question they go with)."""
    messages = body["messages"]
    for message in reversed(messages):
        if message.get("role") == "user":
            break
    else:
        message = {"role": "user", "content": []}
        messages.append(message)
    content = message.get("content")
    if content is None:
        content = []
    elif isinstance(content, str):
        content = [{"type": "text", "text": content}]
    else:
        content = list(content)
    content.extend({"type": "image_url", "image_url": {"url": url}} for url in urls)
    message["content"] = content


def inline_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The `image_url` objects of the body whose URL is an inline `data:` image."""
    found = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url" and str(
                    part["image_url"].get("url", "")
                ).startswith("data:"):
                    found.append(part["image_url"])
    return found


def vision_jpeg(data: bytes, max_side: int, max_pixels: int) -> str:
    """Any picture as the inline JPEG the model gets (in a worker thread)."""
    try:
        return imaging.data_uri(imaging.for_vision(data, max_side, max_pixels))
    except imaging.ImageError as exc:
        raise PictureError(p.BAD_REQUEST, str(exc)) from None


def raw_vision_jpeg(data: bytes, fmt: str, width: int, height: int, max_side: int) -> str:
    """A raw camera frame (rgb565, gray4...) as the inline JPEG the model gets."""
    try:
        im = imaging.from_screen(data, width, height, fmt)
    except imaging.ImageError as exc:
        raise PictureError(p.BAD_REQUEST, f"upload: {exc}") from None
    return imaging.data_uri(imaging.jpeg_bytes(imaging.fit_within(im, max_side)))


def screen_picture(data: bytes, width: int, height: int, fmt: str, max_pixels: int) -> bytes:
    """A generated picture in the device's format (in a worker thread)."""
    try:
        im = imaging.open_image(data, max_pixels)
    except imaging.ImageError as exc:
        raise PictureError(p.UPSTREAM_PROTOCOL, f"the generated image: {exc}") from None
    return imaging.to_screen(im, width, height, fmt)


# --- the plugin ---------------------------------------------------------------------------------


class ImagesPlugin(Plugin):
    """Pictures in (`images`, inline `data:` images) and out (`image`), docs/protocol.md."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.images
        held = settings.image_max_bytes * 4
        self.uploads = Uploads(held, settings.image_upload_timeout)
        self.cameras = Cameras(settings.image_max_bytes, held)
        self._work = asyncio.Semaphore(WORKERS)
        self._host: Host | None = None

    @property
    def host(self) -> Host:
        assert self._host is not None, "attach() first"
        return self._host

    def attach(self, host: Host) -> None:
        self._host = host
        if not self.enabled:
            return
        host.subscribe(host.topics.device_filter("upload", per_request=True), self._on_upload)
        # QoS 0: only the latest picture matters, so the broker need not queue a camera's
        # pictures for the bridge's session while it is away (the retained one still comes).
        for topic_filter in self._camera_filters():
            host.subscribe(topic_filter, self._on_camera, qos=0)

    def _camera_filters(self) -> list[str]:
        """Every filter some device's policy names, except ones reaching the protocol's topics."""
        policy = self.settings.policy
        first = self.settings.topic_prefix.split("/")[0]
        found: dict[str, None] = {}
        for limits in (policy.default, *policy.devices.values()):
            for topic_filter in limits.camera_topics:
                if topic_filter.split("/")[0] in (first, "+", "#"):
                    log.warning("camera filter %r ignored: it could match %s/ topics",
                                topic_filter, first)  # fmt: skip
                    continue
                found[topic_filter] = None
        return list(found)

    def _upload_limit(self, device: str) -> int:
        own = self.settings.policy.limits(device).max_upload_bytes
        cap = self.settings.image_max_bytes
        return min(own, cap) if own else cap

    def _on_upload(self, msg: Inbound) -> None:
        parsed = self.host.topics.parse(msg.topic)
        if parsed is None:
            return
        device, _, rid = parsed
        if rid is None or not p.valid_device_id(device) or not p.valid_id(rid):
            log.warning("upload piece on invalid topic %r ignored", msg.topic[:200])
            return
        self.uploads.feed(device, rid, msg.payload, self._upload_limit(device))

    def _on_camera(self, msg: Inbound) -> None:
        self.cameras.feed(msg.topic, msg.payload)

    # --- requests ---------------------------------------------------------------------------

    def admit(self, device: str, request: ChatRequest, size: int) -> None:
        if request.images is None and request.image is None:
            return
        if not self.enabled:
            raise ProtocolError(p.BAD_REQUEST, "pictures are turned off on this bridge")
        spec = request.image
        if spec is not None:
            size = imaging.screen_size(spec.width, spec.height, spec.format)
            if size > self.settings.image_max_bytes:
                raise ProtocolError(
                    p.TOO_LARGE,
                    f"a {spec.width}x{spec.height} {spec.format} picture is {size} bytes, more "
                    f"than the {self.settings.image_max_bytes} allowed",
                )
            if size > MAX_PIECES * spec.piece_bytes:
                raise ProtocolError(
                    p.BAD_REQUEST,
                    f"a {size}-byte picture takes more than {MAX_PIECES} pieces: "
                    "ask for larger piece_bytes",
                )
        allowed = self.settings.policy.limits(device).camera_topics
        prefix = self.settings.topic_prefix + "/"
        for source in request.images or ():
            topic = source.topic
            if topic is None:
                continue
            if topic.startswith(prefix) or not any(topic_matches_sub(f, topic) for f in allowed):
                raise ProtocolError(
                    p.TOPIC_NOT_ALLOWED, f"device {device} may not read {topic[:200]}"
                )

    async def prepare(self, job: Job) -> None:
        req = job.request
        if job.body is None or not self.enabled:
            return
        try:
            if req.image is not None:
                await self._generate(job)
                return
            inline = inline_parts(job.body)
            if inline:
                await self._reencode(inline)
            if req.images is not None:
                urls = [await self._picture(job, i) for i in range(len(req.images))]
                add_images(job.body, urls)
        except PictureError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    async def _convert(self, fn: Any, *args: Any) -> Any:
        async with self._work:
            return await asyncio.to_thread(fn, *args)

    async def _reencode(self, parts: list[dict[str, Any]]) -> None:
        """Inline `data:` images of `messages`, decoded and re-encoded like any other."""
        s = self.settings
        for part in parts:
            try:
                raw = imaging.decode_data_uri(part["url"])
            except imaging.ImageError as exc:
                raise PictureError(p.BAD_REQUEST, str(exc)) from None
            if raw is not None:
                part["url"] = await self._convert(
                    vision_jpeg, raw, s.image_max_side, s.image_max_pixels
                )

    async def _picture(self, job: Job, index: int) -> str:
        s = self.settings
        assert job.request.images is not None
        source = job.request.images[index]
        if source.topic is not None:
            data = await self.cameras.latest(source.topic, s.image_wait_ms / 1000)
            return str(await self._convert(vision_jpeg, data, s.image_max_side, s.image_max_pixels))
        data, _code = await self.uploads.take(job.device, job.rid, self._upload_limit(job.device))
        if source.format is not None:
            assert source.width is not None and source.height is not None
            return str(
                await self._convert(
                    raw_vision_jpeg, data, source.format, source.width, source.height,
                    s.image_max_side,
                )
            )  # fmt: skip
        return str(await self._convert(vision_jpeg, data, s.image_max_side, s.image_max_pixels))

    async def _generate(self, job: Job) -> None:
        """`/images/generations`, converted for the screen, published in pieces on P/D/image/R."""
        s = self.settings
        spec = job.request.image
        assert spec is not None
        job.body = None  # served here, not by the chat API
        model = spec.model or s.openai_image_model
        attempt = 0
        while True:
            try:
                made = await self.host.upstream.generate_image(
                    spec.prompt, model=model, size=s.image_size, max_bytes=s.image_max_bytes
                )
                break
            except UpstreamError as exc:
                if not exc.retryable or attempt >= s.upstream_retries:
                    raise
                wait = min(s.upstream_retry_base * 2**attempt, s.upstream_retry_max_wait)
                if exc.retry_after is not None:
                    if exc.retry_after > s.upstream_retry_max_wait:
                        raise
                    wait = max(wait, exc.retry_after)
                attempt += 1
                await asyncio.sleep(wait)
        # What the API says the picture cost goes to the device's daily budget, as a
        # chat reply's usage does (an API that reports none costs nothing here).
        job.add_usage(made.usage)
        screen: bytes = await self._convert(
            screen_picture, made.data, spec.width, spec.height, spec.format, s.image_max_pixels
        )
        del made
        topic = self.host.topics.image(job.device, job.rid)
        info: dict[str, object] = {
            "width": spec.width,
            "height": spec.height,
            "format": spec.format,
            "bytes": len(screen),
            "pieces": -(-len(screen) // spec.piece_bytes) + 1,
        }
        messages = imaging.pieces(screen, spec.format, spec.piece_bytes, info)
        for n, message in enumerate(messages, 1):
            self.host.publish(topic, message, qos=1)
            if n % PIECES_PER_YIELD == 0:
                await asyncio.sleep(0)
        job.terminal["model"] = model
        job.terminal["image"] = info
