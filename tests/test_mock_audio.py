"""The mock API's `/audio/speech` and `/audio/transcriptions`: speech that says what it
said, read back through any device rate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from bridge.dev.mock_llm import running_mock
from bridge.plugins import audio as a


@pytest.fixture(scope="module")
def api() -> Iterator[Any]:
    with running_mock() as handle:
        yield handle


def _speech(api: Any, text: str, fmt: str = "wav", **extra: Any) -> httpx.Response:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt, **extra}
    return httpx.post(api.base_url + "/audio/speech", json=body, timeout=30)


def _transcribe(api: Any, wav: bytes, **data: str) -> httpx.Response:
    return httpx.post(
        api.base_url + "/audio/transcriptions",
        data={"model": "whisper-1", **data},
        files={"file": ("a.wav", wav, "audio/wav")},
        timeout=30,
    )


@pytest.mark.parametrize("rate", [8000, 16000, 22050])
def test_speech_round_trips_through_a_device_rate(api: Any, rate: int) -> None:
    resp = _speech(api, "Why is the sky blue? Ünïcode too.")
    assert resp.status_code == 200 and resp.headers["content-type"] == "audio/wav"
    reader = a.WavReader()
    raw = reader.feed(resp.content)
    assert reader.rate == 24000 and len(raw) > 24000  # more than half a second
    conv = a.PcmConverter(reader.rate, 1, 16, 1, rate)
    pcm = conv.feed(raw) + conv.flush()
    got = _transcribe(api, a.wav_bytes(pcm, rate))
    assert got.status_code == 200
    assert got.json() == {"text": "Why is the sky blue? Ünïcode too."}


def test_pcm_and_mp3_formats_and_text_response(api: Any) -> None:
    pcm = _speech(api, "Hello.", "pcm")
    assert pcm.headers["content-type"] == "audio/pcm" and len(pcm.content) % 2 == 0
    assert _transcribe(api, a.wav_bytes(pcm.content, 24000), response_format="text").text == (
        "Hello."
    )
    mp3 = _speech(api, "Hello.", "mp3")
    frames = a.Mp3Frames().feed(mp3.content)
    assert frames and sum(ms for _, ms in frames) == pytest.approx(len(pcm.content) / 48, abs=30)


def test_silence_transcribes_empty(api: Any) -> None:
    assert _transcribe(api, a.wav_bytes(bytes(32000), 16000)).json() == {"text": ""}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": "m", "voice": "v"}, "input"),
        ({"model": "m", "voice": "v", "input": "x", "response_format": "ogg"}, "response_format"),
        ({"model": "m", "input": "x"}, "voice"),
    ],
)
def test_speech_refuses_bad_requests(api: Any, body: dict[str, Any], needle: str) -> None:
    resp = httpx.post(api.base_url + "/audio/speech", json=body, timeout=10)
    assert resp.status_code == 400 and needle in resp.json()["error"]["message"]


def test_transcription_refuses_what_is_not_wav(api: Any) -> None:
    resp = _transcribe(api, b"ID3\x03mp3 bytes")
    assert resp.status_code == 400 and "WAV" in resp.json()["error"]["message"]


def test_speech_fault_directive(api: Any) -> None:
    assert _speech(api, "Hi [mock status=503]").status_code == 503


def test_mark_survives_noise() -> None:
    from bridge.dev import mock_audio

    rng = np.random.default_rng(1)
    sig = np.concatenate([rng.normal(0, 0.05, 8000), mock_audio.mark("noisy ok", 16000)])
    assert mock_audio.read_marks(sig + rng.normal(0, 0.01, len(sig)), 16000) == ["noisy ok"]


def test_without_espeak_the_tone_still_carries_what_it_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from bridge.dev import mock_audio

    monkeypatch.setattr(mock_audio.shutil, "which", lambda _name: None)
    samples = asyncio.run(mock_audio.speak("No espeak here."))
    assert len(samples) > mock_audio.RATE  # 60 ms a character, then the mark
    assert mock_audio.read_marks(samples, mock_audio.RATE) == ["No espeak here."]


def test_unmarked_speech_is_recognised_by_pocketsphinx_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from bridge.dev import mock_audio

    pytest.importorskip("pocketsphinx", reason="the optional extra 'asr'")
    spoken = asyncio.run(mock_audio._espeak("what is the weather like today", "en", 1.0))
    if spoken is None:
        pytest.skip("espeak-ng is not installed")
    pcm = (np.clip(spoken, -1, 1) * 32767).astype("<i2").tobytes()
    assert mock_audio.transcribe(a.wav_bytes(pcm, mock_audio.RATE))[0] == ""
    monkeypatch.setenv("MOCK_LLM_ASR", "1")
    text, _ = mock_audio.transcribe(a.wav_bytes(pcm, mock_audio.RATE))
    words = text.split()
    assert words and set(words) <= {"what", "is", "the", "weather", "like", "today"}, text
