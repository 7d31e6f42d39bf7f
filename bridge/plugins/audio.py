"""Audio helpers for the voice plugins: binary frames, WAV, conversion, sentences, pacing.

Pure parts, no MQTT and no HTTP, so each is unit-tested on its own. The wire
format of the frames is documented in docs/protocol.md ("Voice", protocol v2);
the device library (device/picollm/voice.py) has the same header.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and soxr load with the first conversion, not with the bridge
    import numpy as np

# --- frames on P/D/audio/R and P/D/listen/R -------------------------------------------------

HEADER = struct.Struct("<IBBH")
"""seq (u32), kind (u8), format (u8), rate in Hz (u16); little-endian, 8 bytes."""

DATA = 0
END = 1
ERROR = 2
KINDS = (DATA, END, ERROR)

FORMATS = {"pcm16": 1, "wav": 2, "mp3": 3}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
PCM_RATES = (8000, 16000, 22050, 24000)


@dataclass(frozen=True)
class Frame:
    """One binary audio message, parsed."""

    seq: int
    kind: int
    fmt: int
    rate: int
    payload: bytes


def pack_frame(seq: int, kind: int, fmt: int, rate: int, payload: bytes = b"") -> bytes:
    """The header followed by the payload (raw bytes, never base64)."""
    return HEADER.pack(seq, kind, fmt, rate) + payload


def unpack_frame(data: bytes) -> Frame:
    """Parse a frame; ValueError when it is not one."""
    if len(data) < HEADER.size:
        raise ValueError(f"a frame has an {HEADER.size}-byte header; got {len(data)} bytes")
    seq, kind, fmt, rate = HEADER.unpack_from(data)
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind}")
    return Frame(seq, kind, fmt, rate, bytes(data[HEADER.size :]))


# --- WAV ------------------------------------------------------------------------------------

WAV_STREAMING = 0xFFFFFFFF
"""The RIFF and data sizes of a WAV whose length is not known when it starts."""


def wav_header(
    rate: int, data_bytes: int | None = None, channels: int = 1, bits: int = 16
) -> bytes:
    """A 44-byte PCM WAV header; `data_bytes` None for a stream of unknown length."""
    size = WAV_STREAMING if data_bytes is None else data_bytes
    riff = WAV_STREAMING if data_bytes is None else 36 + data_bytes
    align = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * align, align, bits)
        + b"data"
        + struct.pack("<I", size)
    )


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    """Mono 16-bit PCM as a whole WAV file."""
    return wav_header(rate, len(pcm)) + pcm


class WavReader:
    """Reads a WAV that arrives in pieces: the header first, then sample data as it comes.

    Servers that stream WAV write 0 or 0xFFFFFFFF as the data size, so the data
    chunk is read to the end of the stream when its size cannot be trusted.
    """

    MAX_HEADER = 64 * 1024

    def __init__(self) -> None:
        self._buf = bytearray()
        self.ready = False
        self.tag = 0
        self.channels = 0
        self.rate = 0
        self.bits = 0
        self._left: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Add bytes; return the sample data they complete (may be empty)."""
        if self.ready:
            return self._take(data)
        self._buf += data
        buf = self._buf
        if len(buf) >= 12 and (buf[:4] != b"RIFF" or buf[8:12] != b"WAVE"):
            raise ValueError("not a WAV file")
        pos = 12
        while len(buf) >= pos + 8:
            cid = bytes(buf[pos : pos + 4])
            (size,) = struct.unpack_from("<I", buf, pos + 4)
            if cid == b"data":
                if not self.rate:
                    raise ValueError("WAV data before its fmt chunk")
                self.ready = True
                trusted = 0 < size < WAV_STREAMING
                self._left = size if trusted else None
                rest = bytes(buf[pos + 8 :])
                self._buf = bytearray()
                return self._take(rest)
            if len(buf) < pos + 8 + size:
                break
            if cid == b"fmt ":
                tag, ch, rate, _, _, bits = struct.unpack_from("<HHIIHH", buf, pos + 8)
                if tag == 0xFFFE and size >= 40:  # WAVE_FORMAT_EXTENSIBLE: the sub-format
                    (tag,) = struct.unpack_from("<H", buf, pos + 8 + 24)
                if tag not in (1, 3) or ch < 1 or not 1000 <= rate <= 192000:
                    raise ValueError(f"unsupported WAV (format {tag}, {ch} channels, {rate} Hz)")
                if (tag, bits) not in ((1, 8), (1, 16), (1, 24), (1, 32), (3, 32)):
                    raise ValueError(f"unsupported WAV sample size {bits} bits")
                self.tag, self.channels, self.rate, self.bits = tag, ch, rate, bits
            pos += 8 + size + (size & 1)
        if len(buf) > self.MAX_HEADER:
            raise ValueError("WAV header too long")
        return b""

    def _take(self, data: bytes) -> bytes:
        if self._left is None:
            return data
        out = data[: self._left]
        self._left -= len(out)
        return out


class PcmConverter:
    """Samples of any PCM WAV layout in, mono signed 16-bit little-endian at `out_rate` out.

    soxr resamples in a stream, so a sentence is converted while it downloads.
    """

    def __init__(self, in_rate: int, channels: int, bits: int, tag: int, out_rate: int) -> None:
        import soxr  # type: ignore[import-untyped]  # noqa: PLC0415  # no type information

        self.channels = channels
        self.width = bits // 8
        self.tag = tag
        self._frame = channels * self.width
        self._rest = b""
        self._rs = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="float32", quality="HQ"
        )  # fmt: skip

    def _floats(self, raw: bytes) -> np.ndarray:
        import numpy as np  # noqa: PLC0415

        x: np.ndarray
        w = self.width
        if self.tag == 3:
            x = np.frombuffer(raw, "<f4").astype(np.float32)
        elif w == 1:
            x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
        elif w == 2:
            x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
        elif w == 3:
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            v = np.where(v & 0x800000, v - 0x1000000, v)
            x = v.astype(np.float32) / 8388608
        else:
            x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
        if self.channels > 1:
            x = x.reshape(-1, self.channels).mean(axis=1)
        return x

    @staticmethod
    def _int16(x: np.ndarray) -> bytes:
        import numpy as np  # noqa: PLC0415

        return bytes((np.clip(x, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes())

    def feed(self, raw: bytes) -> bytes:
        data = self._rest + raw
        whole = len(data) - len(data) % self._frame
        self._rest = data[whole:]
        if not whole:
            return b""
        x = self._floats(data[:whole])
        if self._rs is not None:
            x = self._rs.resample_chunk(x)
        return self._int16(x)

    def flush(self) -> bytes:
        import numpy as np  # noqa: PLC0415

        if self._rs is None:
            return b""
        return self._int16(self._rs.resample_chunk(np.zeros(0, np.float32), last=True))


def pcm_ms(nbytes: int, rate: int) -> float:
    """Milliseconds of mono 16-bit PCM."""
    return nbytes * 500.0 / rate


# --- MP3 frames (passed through; parsed only to know their duration) -------------------------

_MP3_BITRATES = {
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),  # MPEG-1 layer III
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),  # MPEG-2 / 2.5
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


class Mp3Frames:
    """Cuts an MP3 byte stream at frame boundaries and tells each frame's duration.

    Pacing needs the duration of what is sent; MP3 is sent as the API made it.
    ID3 tags and bytes between frames go along with the next frame.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.rate = 0

    def feed(self, data: bytes) -> list[tuple[bytes, float]]:
        """Add bytes; return the complete (frame bytes, milliseconds) found."""
        self._buf += data
        out: list[tuple[bytes, float]] = []
        buf = self._buf
        start = 0
        pos = 0
        while len(buf) - pos >= 4:
            if buf[pos] != 0xFF or (buf[pos + 1] & 0xE0) != 0xE0:
                pos += 1
                continue
            version = (buf[pos + 1] >> 3) & 3
            layer = (buf[pos + 1] >> 1) & 3
            bri = buf[pos + 2] >> 4
            sri = (buf[pos + 2] >> 2) & 3
            pad = (buf[pos + 2] >> 1) & 1
            if version == 1 or layer != 1 or bri in (0, 15) or sri == 3:
                pos += 1
                continue
            rate = _MP3_RATES[version][sri]
            kbps = _MP3_BITRATES[3 if version == 3 else 2][bri]
            samples = 1152 if version == 3 else 576
            length = samples // 8 * kbps * 1000 // rate + pad
            if len(buf) - pos < length:
                break
            self.rate = rate
            out.append((bytes(buf[start : pos + length]), samples * 1000.0 / rate))
            pos += length
            start = pos
        del buf[:start]
        if len(buf) > 1 << 20:  # no frame in a megabyte: not MP3
            raise ValueError("not an MP3 stream")
        return out

    def flush(self) -> bytes:
        rest, self._buf = bytes(self._buf), bytearray()
        return rest


# --- sentences ------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?:[.!?\u2026]+[\"')\]]*(?=\s)|[\u3002\uff01\uff1f]+|\n)\s*")
_CLAUSE_END = re.compile(r"[,;:\u3001\uff0c\uff1b]\s+")


class SentenceSplitter:
    """Cuts streamed text into pieces worth one speech call each.

    A piece ends at a sentence end; the first one may end at a clause (after
    `first_clause` characters), so the first sound comes sooner; a piece never
    exceeds `max_chars` (cut at a space when there is one).
    """

    def __init__(self, first_clause: int = 24, max_chars: int = 280) -> None:
        self._buf = ""
        self.first_clause = first_clause
        self.max_chars = max_chars
        self.count = 0

    def feed(self, text: str) -> list[str]:
        buf = self._buf + text
        out: list[str] = []
        while True:
            m = _SENTENCE_END.search(buf)
            cut = m.end() if m else 0
            if not cut and self.count == 0 and len(buf) >= self.first_clause:
                c = _CLAUSE_END.search(buf, self.first_clause - 1)
                cut = c.end() if c else 0
            if not cut and len(buf) > self.max_chars:
                space = buf.rfind(" ", 0, self.max_chars)
                cut = space + 1 if space > 0 else self.max_chars
            if not cut:
                break
            piece, buf = buf[:cut].strip(), buf[cut:]
            if piece:
                out.append(piece)
                self.count += 1
        self._buf = buf
        return out

    def flush(self) -> str | None:
        piece, self._buf = self._buf.strip(), ""
        if piece:
            self.count += 1
            return piece
        return None


# --- pacing ---------------------------------------------------------------------------------


class Pacer:
    """Keeps each device's audio at most `lead` seconds ahead of real time.

    The model of a device: it plays what it gets at once, back to back, so the
    audio it holds at time t is `until - t`, where `until` is when all it got
    will have played. Before a piece of duration d goes out the pacer waits
    until `until + d - now <= lead`; a device whose buffer holds `lead` of
    audio never overflows, and one that gets audio `lead` ahead never starves
    while the API keeps up. One clock per device, shared by its requests.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def ahead(self, device: str) -> float:
        """Seconds of audio the device holds now, by the model."""
        return max(0.0, self._until.get(device, 0.0) - self.now())

    async def send(self, device: str, seconds: float, lead: float) -> None:
        """Wait until a piece of `seconds` may go out, then count it as sent."""
        wait = self._until.get(device, 0.0) + seconds - lead - self.now()
        if wait > 0:
            await asyncio.sleep(wait)
        now = self.now()
        self._until[device] = max(self._until.get(device, 0.0), now) + seconds

    def forget(self, device: str) -> None:
        """Drop an idle device's clock (bounded memory)."""
        if self._until.get(device, 0.0) <= self.now():
            self._until.pop(device, None)
