"""Listen: an utterance streamed on `P/D/listen/R` becomes request R's prompt (protocol v2).

The device publishes request R with `"listen": {...}` and no prompt, then its
microphone's audio as binary frames (docs/protocol.md "Voice") and an end
frame. The frames are assembled as they come, bounded per device by policy
(`listen_seconds`, `listen_bytes`) and overall; lost or reordered frames,
a wrong rate or format, and a stream that stops without its end are refused
with a clear error rather than transcribed as garbage. When the request gets
its slot, `prepare()` waits for the utterance, sends it to the transcription
API as a WAV file, publishes the transcript as a progress message and, unless
the device asked for the transcript only, asks the chat API with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from bridge.core import protocol as p
from bridge.core.errors import ProtocolError
from bridge.core.job import Job
from bridge.core.plugin import Host, Inbound, Plugin
from bridge.core.settings import Settings
from bridge.core.upstream import AudioApi, Upstream
from bridge.plugins import audio as a

log = logging.getLogger("bridge.listen")

MAX_UTTERANCES = 1024
"""Utterances held at once, all devices (each bounded by its device's policy)."""
MAX_TOTAL_BYTES = 64 * 1024 * 1024
"""Audio held at once, all devices."""
MAX_PER_DEVICE = 8
"""Utterances one device may have held at once (so one cannot take every slot)."""


@dataclass
class Utterance:
    """One device's audio for one request id, as it arrives."""

    rate: int = 0
    pcm: bytearray = field(default_factory=bytearray)
    seq: int = 0
    ended: bool = False
    claimed: bool = False
    error: ProtocolError | None = None
    last: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ListenPlugin(Plugin):
    """`listen` on a request: speech to text to prompt (docs/protocol.md "Voice")."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.held: dict[tuple[str, str], Utterance] = {}
        self.total = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def attach(self, host: Host) -> None:
        self.host = host
        # A connection pool of its own: a speaking request holds a chat stream and a
        # speech call at once, which would starve the chat pool at full load.
        self.api = AudioApi(Upstream(host.settings), host.settings)
        host.subscribe(host.topics.device_filter("listen", per_request=True), self._on_frame)

    # -- frames in -------------------------------------------------------------------------

    def _on_frame(self, msg: Inbound) -> None:
        parsed = self.host.topics.parse(msg.topic)
        if parsed is None or msg.retain:
            return
        device, _kind, rid = parsed
        if rid is None or not p.valid_device_id(device) or not p.valid_id(rid):
            return
        key = (device, rid)
        utt = self.held.get(key)
        if utt is None:
            mine = sum(1 for d, _ in self.held if d == device)
            if len(self.held) >= MAX_UTTERANCES or mine >= MAX_PER_DEVICE:
                log.warning("dropped utterance device=%s id=%s: too many held", device, rid)
                return
            utt = self.held[key] = Utterance()
            self._sweep_later()
        if utt.error is not None or utt.ended:
            return
        utt.last = time.monotonic()
        try:
            self._take(device, utt, a.unpack_frame(msg.payload))
        except ProtocolError as exc:
            utt.error = exc
            self._drop_audio(utt)
        except ValueError as exc:
            utt.error = ProtocolError(p.BAD_AUDIO, f"frame {utt.seq}: {exc}")
            self._drop_audio(utt)
        utt.changed.set()

    def _take(self, device: str, utt: Utterance, frame: a.Frame) -> None:
        lim = self.settings.policy.limits(device)
        if frame.seq < utt.seq:
            return  # a second delivery of a frame already taken
        if frame.seq > utt.seq:
            raise ProtocolError(
                p.BAD_AUDIO,
                f"audio frame {frame.seq} came when {utt.seq} was due: lost or reordered audio",
            )
        utt.seq += 1
        if frame.kind == a.END:
            utt.ended = True
            return
        if frame.kind == a.ERROR:
            raise ProtocolError(p.CANCELLED, "the device stopped its utterance")
        if frame.fmt != a.FORMATS["pcm16"]:
            raise ProtocolError(p.BAD_AUDIO, "utterances are pcm16 (format 1)")
        if utt.rate == 0:
            if frame.rate not in p.LISTEN_RATES:
                raise ProtocolError(p.BAD_AUDIO, f"rate {frame.rate} Hz is not supported")
            utt.rate = frame.rate
        elif frame.rate != utt.rate:
            raise ProtocolError(
                p.BAD_AUDIO, f"rate changed from {utt.rate} to {frame.rate} Hz mid-utterance"
            )
        if len(frame.payload) % 2:
            raise ProtocolError(p.BAD_AUDIO, "a pcm16 frame holds an even number of bytes")
        size = len(utt.pcm) + len(frame.payload)
        if size > lim.listen_bytes or size > 2 * utt.rate * lim.listen_seconds:
            raise ProtocolError(
                p.AUDIO_TOO_LONG,
                f"utterance longer than {lim.listen_seconds} s or {lim.listen_bytes} bytes",
            )
        if self.total + len(frame.payload) > MAX_TOTAL_BYTES:
            raise ProtocolError(p.OVERLOADED, "the bridge holds too much audio; try again")
        utt.pcm += frame.payload
        self.total += len(frame.payload)

    def _drop_audio(self, utt: Utterance) -> None:
        self.total -= len(utt.pcm)
        utt.pcm = bytearray()

    def _forget(self, key: tuple[str, str]) -> None:
        utt = self.held.pop(key, None)
        if utt is not None:
            self._drop_audio(utt)

    def _sweep_later(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def _sweep(self) -> None:
        """Forget utterances nobody asked for (no request R came), so memory stays bounded."""
        self._sweeper = None
        now = time.monotonic()
        for key, utt in list(self.held.items()):
            idle = self.settings.policy.limits(key[0]).listen_timeout_ms / 1000
            if not utt.claimed and now - utt.last > max(10.0, 3 * idle):
                self._forget(key)
        if self.held:
            self._sweep_later()

    # -- the request -----------------------------------------------------------------------

    def started(self, job: Job) -> None:
        if job.request.listen is not None:
            key = (job.device, job.rid)
            utt = self.held.get(key)
            if utt is None:
                utt = self.held[key] = Utterance()
            utt.claimed = True

    async def prepare(self, job: Job) -> None:
        spec = job.request.listen
        if spec is None:
            return
        key = (job.device, job.rid)
        try:
            wav, rate = await self._utterance(job, spec)
            text = await self.api.transcribe(wav, language=spec.language)
        finally:
            self._forget(key)
        if not text:
            ms = (len(wav) - 44) * 500 // rate
            raise ProtocolError(p.NO_SPEECH, f"nothing was heard in {ms} ms of audio")
        self.host.emit(job, {"transcript": text})
        job.terminal["transcript"] = text
        if spec.transcript_only:
            job.body = None
        elif job.body is not None:
            job.body.setdefault("messages", []).append({"role": "user", "content": text})

    async def _utterance(self, job: Job, spec: p.ListenSpec) -> tuple[bytes, int]:
        key = (job.device, job.rid)
        timeout = self.settings.policy.limits(job.device).listen_timeout_ms / 1000
        utt = self.held.get(key)
        if utt is None:
            utt = self.held[key] = Utterance(claimed=True)
        utt.last = max(utt.last, time.monotonic() - timeout / 2)
        while utt.error is None and not utt.ended:
            utt.changed.clear()
            left = utt.last + timeout - time.monotonic()
            if left <= 0:
                raise ProtocolError(
                    p.AUDIO_TIMEOUT,
                    f"the utterance stopped without its end frame ({utt.seq} frames in"
                    f" {timeout:g} s)",
                )
            try:
                await asyncio.wait_for(utt.changed.wait(), left)
            except TimeoutError:
                continue
        if utt.error is not None:
            raise utt.error
        if utt.rate and utt.rate != spec.rate:
            raise ProtocolError(
                p.BAD_AUDIO, f"the audio is {utt.rate} Hz; the request declared {spec.rate} Hz"
            )
        if not utt.pcm:
            raise ProtocolError(p.NO_SPEECH, "the utterance holds no audio")
        return a.wav_bytes(bytes(utt.pcm), utt.rate), utt.rate

    def finished(self, job: Job) -> None:
        if job.request.listen is not None:
            self._forget((job.device, job.rid))

    def stopping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
