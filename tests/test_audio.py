"""The voice plugins' pure helpers: frames, WAV, conversion, MP3 framing, sentences, pacing."""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np
import pytest

from bridge.dev import mock_audio
from bridge.plugins import audio as a


def test_frame_header_is_8_bytes_and_round_trips_raw_payload() -> None:
    payload = bytes(range(256)) * 4
    data = a.pack_frame(7, a.DATA, a.FORMATS["pcm16"], 16000, payload)
    assert len(data) == 8 + len(payload)
    assert data[:8] == struct.pack("<IBBH", 7, 0, 1, 16000)
    frame = a.unpack_frame(data)
    assert (frame.seq, frame.kind, frame.fmt, frame.rate) == (7, a.DATA, 1, 16000)
    assert frame.payload == payload


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, struct.pack("<IBBH", 0, 9, 1, 8000)])
def test_frame_that_is_not_one_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        a.unpack_frame(data)


def test_wav_reader_takes_the_header_in_any_pieces_and_honours_the_data_size() -> None:
    pcm = np.arange(-500, 500, dtype="<i2").tobytes()
    wav = a.wav_bytes(pcm, 22050) + b"LIST\x04\x00\x00\x00junk"
    for step in (1, 3, 44, 1000):
        reader = a.WavReader()
        out = b"".join(reader.feed(wav[i : i + step]) for i in range(0, len(wav), step))
        assert reader.rate == 22050 and reader.channels == 1 and reader.bits == 16
        assert out == pcm


def test_wav_reader_reads_a_streamed_wav_to_its_end() -> None:
    pcm = b"\x01\x00" * 1000
    reader = a.WavReader()
    out = reader.feed(a.wav_header(16000) + pcm[:100]) + reader.feed(pcm[100:])
    assert out == pcm


@pytest.mark.parametrize("data", [b"RIFX" + bytes(40), b"RIFF\x00\x00\x00\x00WAVEdata" + bytes(8)])
def test_wav_reader_refuses_what_is_not_pcm_wav(data: bytes) -> None:
    with pytest.raises(ValueError):
        a.WavReader().feed(data)


@pytest.mark.parametrize("out_rate", a.PCM_RATES)
def test_converter_resamples_stereo_float_to_mono_pcm16_keeping_duration_and_pitch(
    out_rate: int,
) -> None:
    rate = 44100
    t = np.arange(rate) / rate  # one second of 440 Hz
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype("<f4")
    stereo = np.stack([tone, tone], axis=1).tobytes()
    conv = a.PcmConverter(rate, 2, 32, 3, out_rate)
    pieces = [conv.feed(stereo[i : i + 999]) for i in range(0, len(stereo), 999)]
    out = np.frombuffer(b"".join(pieces) + conv.flush(), "<i2")
    assert abs(len(out) - out_rate) <= out_rate // 100
    spectrum = np.abs(np.fft.rfft(out.astype(float)))
    assert abs(np.argmax(spectrum) * out_rate / len(out) - 440) < 3
    assert 0.4 < np.max(np.abs(out)) / 32768 < 0.6


def test_mp3_frames_are_cut_whole_with_their_duration() -> None:
    data = b"ID3junk" + mock_audio.silent_mp3(0.24)
    frames = a.Mp3Frames()
    got = [f for i in range(0, len(data), 50) for f in frames.feed(data[i : i + 50])]
    assert len(got) == 10
    assert all(ms == pytest.approx(24.0) for _, ms in got)
    assert b"".join(f for f, _ in got) == data
    assert frames.rate == 24000


def test_sentences_first_clause_early_then_whole_sentences_and_a_hard_cut() -> None:
    s = a.SentenceSplitter(first_clause=20, max_chars=60)
    text = "Well, the sky looks blue, mostly because of air. It scatters light! " + "x" * 70
    out: list[str] = []
    for i in range(0, len(text), 3):
        out += s.feed(text[i : i + 3])
    tail = s.flush()
    assert out[0] == "Well, the sky looks blue,"
    assert out[1] == "mostly because of air."
    assert out[2] == "It scatters light!"
    assert len(out[3]) == 60 and tail == "x" * 10


def test_sentence_splitter_cjk_and_no_clause_cut_after_the_first() -> None:
    s = a.SentenceSplitter(first_clause=4)
    assert s.feed("天空是蓝色的。因为") == ["天空是蓝色的。"]
    assert s.feed("散射, and more, more") == []
    assert s.flush() == "因为散射, and more, more"


def test_pacer_keeps_a_device_at_most_lead_ahead() -> None:
    async def run() -> list[float]:
        pacer = a.Pacer()
        start = time.monotonic()
        aheads = []
        for _ in range(12):
            await pacer.send("d", 0.05, 0.2)
            aheads.append(pacer.ahead("d"))
        aheads.append(time.monotonic() - start)
        return aheads

    *aheads, elapsed = asyncio.run(run())
    assert max(aheads) <= 0.2 + 0.01
    # 12 x 50 ms of audio, 200 ms of it allowed ahead: about 400 ms of waiting
    assert 0.35 < elapsed < 0.6
