"""Speak: the reply, sentence by sentence, as paced binary audio on `P/D/audio/R` (protocol v2).

Why here and not on the device: a Pico cannot run text-to-speech, and
pacing needs a clock per device that the bridge alone has. The text streams
as always; each sentence, as soon as it is complete, goes to the speech API
while the next ones are generated, its audio is converted to what the device
plays, cut into frames of at most `audio_chunk_bytes`, and sent no more than
`audio_lead_ms` ahead of real time. A failure of speech never fails the text:
the audio stream ends with an error frame and the terminal says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from bridge.core import protocol as p
from bridge.core.errors import ProtocolError, UpstreamError
from bridge.core.job import Job
from bridge.core.plugin import Host, Plugin
from bridge.core.protocol import ChatRequest
from bridge.core.settings import Settings
from bridge.core.upstream import AudioApi, Upstream
from bridge.plugins import audio as a

log = logging.getLogger("bridge.speech")

KEY = "speech"
BUFFER_BYTES = 256 * 1024
"""Audio converted ahead of the pacer, per request (about 8 s at 16 kHz)."""


class _Spoken:
    """One request's speech: sentences in, paced frames out."""

    def __init__(self, plugin: SpeechPlugin, job: Job, spec: p.SpeakSpec | None) -> None:
        lim = plugin.settings.policy.limits(job.device)
        spec = spec or p.SpeakSpec()
        self.plugin = plugin
        self.device = job.device
        self.topic = plugin.host.topics.audio(job.device, job.rid)
        self.format = spec.format or lim.speak_format
        self.fmt = a.FORMATS[self.format]
        self.rate = spec.rate or lim.speak_rate
        self.voice = spec.voice or lim.speak_voice or None
        self.lead = (spec.lead_ms or lim.audio_lead_ms) / 1000
        self.payload = (spec.chunk_bytes or lim.audio_chunk_bytes) - a.HEADER.size
        self.payload -= self.payload % 2
        self.splitter = a.SentenceSplitter()
        self.sentences: asyncio.Queue[str | None] = asyncio.Queue()
        self.frames: asyncio.Queue[tuple[bytes, float] | None] = asyncio.Queue(
            maxsize=max(4, BUFFER_BYTES // self.payload)
        )
        self.seq = 0
        self.chunks = 0
        self.bytes = 0
        self.ms = 0.0
        self.spoken = 0
        self.first_at: float | None = None
        self.error: dict[str, str] | None = None
        self.ended = False
        self.closed = False
        self.fold: object = None  # the API reply whose text `fed` counts
        self.fed = 0
        self.synth = asyncio.create_task(self._synthesise(), name=f"speech {job.device}/{job.rid}")
        self.send = asyncio.create_task(self._send(), name=f"audio {job.device}/{job.rid}")

    # -- text in ---------------------------------------------------------------------------

    def feed(self, text: str) -> None:
        if self.closed:
            return
        for sentence in self.splitter.feed(text):
            self.sentences.put_nowait(sentence)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        tail = self.splitter.flush()
        if tail:
            self.sentences.put_nowait(tail)
        self.sentences.put_nowait(None)

    # -- synthesis (ahead of the pacer, bounded) --------------------------------------------

    async def _synthesise(self) -> None:
        try:
            if self.format == "wav":
                await self.frames.put((a.wav_header(self.rate), 0.0))
            while (sentence := await self.sentences.get()) is not None:
                async for piece in self._speak(sentence):
                    await self.frames.put(piece)
                self.spoken += 1
        except UpstreamError as exc:
            self.error = {"code": exc.code, "message": exc.message}
        except ValueError as exc:
            self.error = {"code": p.AUDIO_FORMAT, "message": f"the speech API's audio: {exc}"}
        except Exception:
            log.exception("speech failed device=%s topic=%s", self.device, self.topic)
            self.error = {"code": p.INTERNAL, "message": "internal error while speaking"}
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await self.frames.put(None)

    async def _speak(self, sentence: str) -> AsyncIterator[tuple[bytes, float]]:
        api = self.plugin.api
        if self.format == "mp3":
            mp3 = a.Mp3Frames()
            buf, ms = bytearray(), 0.0
            async with api.speech(sentence, voice=self.voice, response_format="mp3") as body:
                async for data in body:
                    for frame, frame_ms in mp3.feed(data):
                        if buf and len(buf) + len(frame) > self.payload:
                            yield bytes(buf), ms
                            buf, ms = bytearray(), 0.0
                        buf += frame
                        ms += frame_ms
            if not mp3.rate and not buf:
                raise ValueError("no MP3 frame in it")
            if buf:
                yield bytes(buf), ms
            return
        reader = a.WavReader()
        conv: a.PcmConverter | None = None
        buf = bytearray()
        async with api.speech(sentence, voice=self.voice, response_format="wav") as body:
            async for data in body:
                raw = reader.feed(data)
                if not reader.ready:
                    continue
                if conv is None:
                    conv = a.PcmConverter(
                        reader.rate, reader.channels, reader.bits, reader.tag, self.rate
                    )
                buf += conv.feed(raw)
                while len(buf) >= self.payload:
                    yield bytes(buf[: self.payload]), a.pcm_ms(self.payload, self.rate)
                    del buf[: self.payload]
        if conv is None:
            raise ValueError("not a complete WAV file")
        buf += conv.flush()
        for at in range(0, len(buf), self.payload):
            piece = bytes(buf[at : at + self.payload])
            yield piece, a.pcm_ms(len(piece), self.rate)

    # -- paced sending ---------------------------------------------------------------------

    async def _send(self) -> None:
        host = self.plugin.host
        qos = self.plugin.settings.response_qos
        rate = self.rate if self.format != "mp3" else 0
        while (item := await self.frames.get()) is not None:
            piece, ms = item
            await self.plugin.pacer.send(self.device, ms / 1000, self.lead)
            host.publish(self.topic, a.pack_frame(self.seq, a.DATA, self.fmt, rate, piece), qos=qos)
            if self.first_at is None:
                self.first_at = asyncio.get_running_loop().time()
            self.seq += 1
            self.chunks += 1
            self.bytes += len(piece)
            self.ms += ms
        self._end(self.error)

    def _end(self, error: dict[str, str] | None) -> None:
        if self.ended:
            return
        self.ended = True
        rate = self.rate if self.format != "mp3" else 0
        kind, body = (a.ERROR, error) if error else (a.END, self.summary())
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.plugin.host.publish(
            self.topic, a.pack_frame(self.seq, kind, self.fmt, rate, payload), qos=1
        )
        self.seq += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "rate": self.rate if self.format != "mp3" else None,
            "bytes": self.bytes,
            "ms": round(self.ms),
            "chunks": self.chunks,
            "sentences": self.spoken,
        }
        if self.error:
            out["error"] = self.error
        return out

    async def finish(self) -> dict[str, Any]:
        self.close()
        await asyncio.gather(self.synth, self.send)
        return self.summary()

    def abort(self, code: str, message: str) -> None:
        """The request ended without `done`: stop speaking, say why in the stream."""
        self.synth.cancel()
        self.send.cancel()
        self._end({"code": code, "message": message})


class SpeechPlugin(Plugin):
    """`speak` on a request: the reply spoken, paced per device (docs/protocol.md "Voice")."""

    needs_text = True  # to speak what chunking still holds at the end, and unstreamed replies

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pacer = a.Pacer()
        self.live: set[_Spoken] = set()

    def attach(self, host: Host) -> None:
        self.host = host
        # A connection pool of its own: a speaking request holds a chat stream and a
        # speech call at once, which would starve the chat pool at full load.
        self.api = AudioApi(Upstream(host.settings), host.settings)

    def started(self, job: Job) -> None:
        speak = job.request.speak
        if speak is None or speak is False:
            return
        spoken = _Spoken(self, job, speak if isinstance(speak, p.SpeakSpec) else None)
        job.data[KEY] = spoken
        self.live.add(spoken)

    def text(self, job: Job, text: str) -> None:
        spoken: _Spoken | None = job.data.get(KEY)
        if spoken is not None:
            if spoken.fold is not job.fold:
                spoken.fold, spoken.fed = job.fold, 0
            spoken.fed += len(text)
            spoken.feed(text)

    async def finishing(self, job: Job) -> None:
        spoken: _Spoken | None = job.data.get(KEY)
        if spoken is None:
            return
        # What was not published yet (held by chunking, or the whole text of an
        # unstreamed reply) is spoken too.
        fold = job.fold
        if fold is not None and fold.text:
            fed = spoken.fed if spoken.fold is fold else 0
            spoken.feed(fold.text[fed:])
        elif fold is not None and fold.refusal and not spoken.fed:
            spoken.feed(fold.refusal)  # a refusal is said too, so a listener knows why
        job.terminal["audio"] = await spoken.finish()

    def finished(self, job: Job) -> None:
        spoken: _Spoken | None = job.data.pop(KEY, None)
        if spoken is None:
            return
        self.live.discard(spoken)
        if not spoken.ended:
            err = job.error
            code = err.code if err is not None else p.CANCELLED
            spoken.abort(code, err.message if err is not None else "the reply ended")
        self.pacer.forget(job.device)

    def stopping(self) -> None:
        for spoken in list(self.live):
            spoken.abort(p.INTERRUPTED, "the bridge is shutting down")
        self.live.clear()


class VoiceOffPlugin(Plugin):
    """`BRIDGE_VOICE` off: `speak` and `listen` are refused rather than silently ignored."""

    def admit(self, device: str, request: ChatRequest, size: int) -> None:
        if request.speak not in (None, False) or request.listen is not None:
            raise ProtocolError(p.BAD_REQUEST, "this bridge does not serve voice (BRIDGE_VOICE)")
