"""The mock API's voice: `/audio/speech` and `/audio/transcriptions`, offline and testable.

Speech is real (espeak-ng) when it is installed, otherwise a plain tone of a
length that grows with the text. Either way the audio ends with a quiet
*mark*: a chirp, then the text's UTF-8 bytes as tones (one of 16 frequencies
per half byte). The mock's transcription finds every mark in what it is
sent and reads the text back, so a round trip (mock speech -> bridge ->
device -> microphone -> bridge -> mock transcription) is checked word for
word, through resampling to any device rate. Audio without a mark
transcribes as an empty text, as a recogniser hearing silence would; with
`MOCK_LLM_ASR=1` in the environment it is recognised by PocketSphinx (its
English model ships in PyPI's `pocketsphinx`, the optional extra `asr`),
for trying a real microphone against the mock.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import importlib
import os
import shutil
from typing import Any

import numpy as np

from bridge.plugins.audio import PcmConverter, WavReader, wav_bytes

RATE = 24000
"""The mock's native rate, as OpenAI's `pcm` format."""

_CHIRP_S = 0.1
_SYMBOL_S = 0.02
_BASE_HZ = 500.0
_STEP_HZ = 100.0
_AMPLITUDE = 0.2
MAX_MARK_BYTES = 255


def _chirp(rate: int) -> np.ndarray:
    t = np.arange(int(_CHIRP_S * rate)) / rate
    f0, f1 = 600.0, 3000.0
    return np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * _CHIRP_S) * t * t)).astype(np.float32)


def _utf8_prefix(text: str, limit: int) -> bytes:
    data = text.encode()[:limit]
    return data.decode("utf-8", "ignore").encode()


def mark(text: str, rate: int = RATE) -> np.ndarray:
    """The chirp and the text's bytes (a length byte first) as tones, as float samples."""
    data = _utf8_prefix(text, MAX_MARK_BYTES)
    n = int(_SYMBOL_S * rate)
    t = np.arange(n) / rate
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.002 * rate))
    parts = [_chirp(rate)]
    for byte in bytes([len(data)]) + data:
        for nib in (byte >> 4, byte & 15):
            parts.append((np.sin(2 * np.pi * (_BASE_HZ + _STEP_HZ * nib) * t) * ramp).astype(
                np.float32
            ))  # fmt: skip
    return np.concatenate(parts) * _AMPLITUDE


def _nibble(window: np.ndarray, rate: int) -> int:
    spec = np.abs(np.fft.rfft(window * np.hanning(len(window)), 16384))
    freq = float(np.argmax(spec)) * rate / 16384
    return int(min(15, max(0, round((freq - _BASE_HZ) / _STEP_HZ))))


def read_marks(samples: np.ndarray, rate: int) -> list[str]:
    """Every text marked in `samples` (float mono at `rate`), in order."""
    chirp = _chirp(rate)
    if len(samples) < len(chirp):
        return []
    size = 1 << int(np.ceil(np.log2(len(samples) + len(chirp))))
    corr = np.fft.irfft(np.fft.rfft(samples, size) * np.conj(np.fft.rfft(chirp, size)), size)
    corr = corr[: len(samples) - len(chirp) + 1]
    energy = np.sqrt(np.convolve(samples * samples, np.ones(len(chirp)), "valid"))
    energy = np.maximum(energy, 0.01 * np.sqrt(len(chirp)))  # silence is no match
    score = corr / (energy * np.sqrt(float(np.sum(chirp * chirp))))
    n = int(_SYMBOL_S * rate)
    found: list[tuple[int, str]] = []
    score = score.copy()
    while True:
        at = int(np.argmax(score))
        if score[at] < 0.7:
            break
        start = at + len(chirp)

        def symbol(k: int, base: int = start) -> int:
            lo = base + k * n + n // 8
            return _nibble(samples[lo : lo + n - n // 4], rate)

        if start + 2 * n > len(samples):
            score[max(0, at - len(chirp)) : at + len(chirp)] = 0
            continue
        length = symbol(0) << 4 | symbol(1)
        end = start + (2 + 2 * length) * n
        data = bytearray()
        if end <= len(samples):
            for i in range(length):
                data.append(symbol(2 + 2 * i) << 4 | symbol(3 + 2 * i))
            found.append((at, data.decode("utf-8", "replace")))
        score[max(0, at - len(chirp)) : min(len(score), end)] = 0
    return [text for _, text in sorted(found)]


async def _espeak(text: str, voice: str, speed: float) -> np.ndarray | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        exe, "--stdout", "-v", voice, "-s", str(int(175 * speed)), "--", text,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0 or not out:
        return None
    reader = WavReader()
    raw = reader.feed(out)
    conv = PcmConverter(reader.rate, reader.channels, reader.bits, reader.tag, RATE)
    pcm = conv.feed(raw) + conv.flush()
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


def _tone(text: str) -> np.ndarray:
    """Without espeak-ng: a soft 220 Hz hum of 60 ms a character (at most 20 s)."""
    n = int(min(20.0, 0.06 * max(1, len(text))) * RATE)
    t = np.arange(n) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


async def speak(text: str, voice: str = "en", speed: float = 1.0) -> np.ndarray:
    """Speech for `text` at :data:`RATE`, ending with its mark."""
    spoken = await _espeak(text, voice, speed)
    if spoken is None:
        spoken = _tone(text)
    gap = np.zeros(int(0.05 * RATE), np.float32)
    return np.concatenate([spoken, gap, mark(text), gap])


def _pcm16(samples: np.ndarray) -> bytes:
    return bytes((np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())


def silent_mp3(seconds: float) -> bytes:
    """MPEG-2 layer III frames of silence (24 kHz, 32 kbit/s mono, 24 ms each)."""
    frame = bytes([0xFF, 0xF3, 0x44, 0xC0]) + bytes(92)
    return frame * max(1, round(seconds / 0.024))


def encode(samples: np.ndarray, response_format: str) -> tuple[bytes, str]:
    """The samples in an API response format: (body, content type)."""
    if response_format == "wav":
        return wav_bytes(_pcm16(samples), RATE), "audio/wav"
    if response_format == "pcm":
        return _pcm16(samples), "audio/pcm"
    if response_format == "mp3":
        return silent_mp3(len(samples) / RATE), "audio/mpeg"
    raise ValueError(f"response_format {response_format!r} is not supported by the mock")


SPEECH_FORMATS = ("wav", "pcm", "mp3")


def check_speech_body(body: Any) -> tuple[str, str, str, float]:
    """(input, voice, response_format, speed) from a speech request, or ValueError."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'input' must be a non-empty string")
    if len(text) > 4096:
        raise ValueError("'input' is longer than 4096 characters")
    if not isinstance(body.get("model"), str):
        raise ValueError("'model' is required")
    voice = body.get("voice")
    if not isinstance(voice, str) or not voice:
        raise ValueError("'voice' is required")
    fmt = body.get("response_format", "mp3")
    if fmt not in SPEECH_FORMATS:
        raise ValueError(f"response_format must be one of {', '.join(SPEECH_FORMATS)}")
    speed = body.get("speed", 1.0)
    if not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        raise ValueError("speed must be a number from 0.25 to 4")
    return text, voice, fmt, float(speed)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (file name, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ValueError("the body must be multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ValueError("malformed multipart body")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def recognise(samples: np.ndarray, rate: int) -> str:
    """Real speech recognition with PocketSphinx's US English model, if installed."""
    try:
        decoder_type = importlib.import_module("pocketsphinx").Decoder
    except ImportError:
        return ""
    if rate != 16000:
        conv = PcmConverter(rate, 1, 16, 1, 16000)
        pcm = conv.feed(_pcm16(samples)) + conv.flush()
    else:
        pcm = _pcm16(samples)
    decoder = decoder_type(samprate=16000, loglevel="FATAL")
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return str(hyp.hypstr) if hyp is not None else ""


def transcribe(wav: bytes) -> tuple[str, float]:
    """The marked text in a WAV file, and its duration in seconds; ValueError if not WAV."""
    reader = WavReader()
    raw = reader.feed(wav)
    if not reader.ready:
        raise ValueError("the file is not a complete WAV file")
    conv = PcmConverter(reader.rate, reader.channels, reader.bits, reader.tag, reader.rate)
    samples = np.frombuffer(conv.feed(raw), "<i2").astype(np.float32) / 32768
    seconds = len(samples) / reader.rate
    marks = read_marks(samples, reader.rate)
    if marks:
        return " ".join(marks), seconds
    if os.environ.get("MOCK_LLM_ASR") != "1" or np.max(np.abs(samples), initial=0) < 0.01:
        return "", seconds
    return recognise(samples, reader.rate), seconds
