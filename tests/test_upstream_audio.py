"""The bridge's audio API client (bridge/core/upstream.py AudioApi) against the mock:
every failure typed as the protocol's codes, and no key in any message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.core.errors import UpstreamError
from bridge.core.settings import load_settings
from bridge.core.upstream import AudioApi, Upstream
from bridge.dev.mock_llm import running_mock
from bridge.plugins import audio as a

KEY = "sk-audio-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def api() -> Iterator[Any]:
    with running_mock(api_key=KEY) as handle:
        yield handle


def _client(base_url: str, key: str = KEY, **more: Any) -> tuple[Upstream, AudioApi]:
    s = load_settings(openai_base_url=base_url, openai_api_key=key, **more)
    up = Upstream(s)
    return up, AudioApi(up, s)


async def _speak(audio: AudioApi, text: str) -> bytes:
    out = bytearray()
    async with audio.speech(text, voice=None, response_format="wav") as body:
        async for data in body:
            out += data
    return bytes(out)


def test_speech_and_transcription_round_trip(api: Any) -> None:
    async def run() -> str:
        up, audio = _client(api.base_url, openai_tts_model="tts-x", openai_stt_model="stt-x")
        try:
            wav = await _speak(audio, "Round trip.")
            return await audio.transcribe(wav)
        finally:
            await up.aclose()

    assert asyncio.run(run()) == "Round trip."
    sent = [r for r in api.requests if r["path"].endswith("/audio/speech")][-1]["body"]
    assert sent["model"] == "tts-x" and sent["voice"] == "alloy"
    assert sent["response_format"] == "wav"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Fail [mock status=503]", "upstream_status"),
        ("Cut [mock cut_after=1]", "upstream_protocol"),
    ],
)
def test_speech_failures_are_typed(api: Any, text: str, code: str) -> None:
    async def run() -> UpstreamError:
        up, audio = _client(api.base_url)
        try:
            with pytest.raises(UpstreamError) as info:
                await _speak(audio, text)
            return info.value
        finally:
            await up.aclose()

    assert asyncio.run(run()).code == code


def test_wrong_key_unreachable_and_bad_file_are_typed_without_the_key(api: Any) -> None:
    async def run() -> list[UpstreamError]:
        errors = []
        up, audio = _client(api.base_url, key="sk-wrong-key-0123456789")
        try:
            with pytest.raises(UpstreamError) as info:
                await _speak(audio, "Hi")
            errors.append(info.value)
        finally:
            await up.aclose()
        up, audio = _client("http://127.0.0.1:9/v1")
        try:
            with pytest.raises(UpstreamError) as info:
                await audio.transcribe(a.wav_bytes(bytes(100), 16000))
            errors.append(info.value)
        finally:
            await up.aclose()
        up, audio = _client(api.base_url)
        try:
            with pytest.raises(UpstreamError) as info:
                await audio.transcribe(b"not a wav")
            errors.append(info.value)
        finally:
            await up.aclose()
        return errors

    wrong, unreachable, bad = asyncio.run(run())
    assert wrong.code == "upstream_status" and wrong.status == 401
    assert unreachable.code == "upstream_unreachable"
    assert bad.code == "upstream_status" and bad.status == 400 and "WAV" in bad.message
    for e in (wrong, unreachable, bad):
        assert KEY not in e.message and "0123456789" not in e.message
