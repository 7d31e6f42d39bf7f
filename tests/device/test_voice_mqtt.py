"""Voice in MQTT mode on the MicroPython VM: the device says and listens.

device VM (picollm.voice, umqtt.simple, machine.I2S stand-in writing and reading
files) -> Mosquitto (the project's ACL) -> the bridge -> the mock API's chat,
speech and transcription, and back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.dev import mock_audio
from bridge.dev.mock_llm import reply_tokens
from bridge.plugins import audio as a
from tests.device import vmkit
from tests.harness import Broker

_ids = itertools.count()


@pytest.fixture
def device_config(broker: Broker, bridge: Any) -> dict[str, Any]:
    device_id = f"vmvoice{next(_ids)}"
    password = broker.add_user(device_id)
    return {
        "mode": "mqtt",
        "device_id": device_id,
        "prefix": broker.prefix,
        "broker": {"host": "127.0.0.1", "port": broker.port, "user": device_id,
                   "password": password, "keepalive": 30},
        "reply_timeout_ms": 8000,
        "history": 2,
    }  # fmt: skip


def _run(tmp_path: Path, config: dict[str, Any], steps: list[dict[str, Any]], **env: str) -> Any:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": config, "steps": steps}))
    proc = vmkit.run_vm(vmkit.PROGRAMS_DIR / "voice_job.py", str(job), cwd=tmp_path, timeout=90,
                        env=vmkit.vm_env(**env))  # fmt: skip
    recs = vmkit.parse_records(proc.stdout)
    assert proc.returncode == 0 and len(recs) == len(steps), proc.stdout[-3000:] + proc.stderr[
        -3000:
    ]
    return recs


def _said(pcm: bytes, rate: int = 16000) -> str:
    return mock_audio.transcribe(a.wav_bytes(pcm, rate))[0]


def test_device_says_paced_through_i2s_in_bounded_heap(
    device_config: dict[str, Any], tmp_path: Path
) -> None:
    prompt = "Say it. One two three"
    lead = 300
    out = tmp_path / "i2s.pcm"
    [rec] = _run(
        tmp_path, device_config,
        [{"op": "say", "prompt": prompt, "buffer": 16384, "log": "arrivals.txt",
          "speak": {"rate": 16000, "lead_ms": lead, "chunk_bytes": 2048}}],
        STUB_I2S_OUT=str(out),
    )  # fmt: skip
    reply = "".join(reply_tokens(prompt))
    assert rec["ok"] and rec["text"] == reply, rec
    assert rec["overruns"] == 0 and rec["error"] is None
    played = out.read_bytes()
    assert len(played) == rec["bytes"] == rec["summary"]["bytes"]
    assert _said(played) == reply  # what the amplifier got says the reply
    # pacing measured at the device: played on arrival, never more than lead ahead
    until = 0.0
    for line in (tmp_path / "arrivals.txt").read_text().split("\n"):
        if line:
            t, _seq, n = (int(x) for x in line.split())
            until = max(until, t) + int(n) / 32
            assert until - t <= lead + 60, (until - t, line)
    print("say:", rec["bytes"], "bytes, heap", rec["heap_base"], "->", rec["heap_peak"])
    # the heap holds the ring and one message, not the reply's audio
    assert rec["bytes"] > 4 * 16384
    assert rec["heap_peak"] - rec["heap_base"] < 16384 + 8 * 1024, rec


def test_device_heap_does_not_grow_with_the_length_of_speech(
    device_config: dict[str, Any], tmp_path: Path
) -> None:
    speak = {"rate": 16000, "lead_ms": 60000, "chunk_bytes": 3072}
    short, long = _run(
        tmp_path, device_config,
        [{"op": "say", "prompt": "Short.", "out": "writer", "file": "a.pcm", "speak": speak,
          "buffer": 8192},
         {"op": "say", "prompt": "Long. [mock tokens=40]", "out": "writer", "file": "b.pcm",
          "speak": speak, "buffer": 8192}],
    )  # fmt: skip
    assert short["ok"] and long["ok"] and long["overruns"] == 0
    assert long["bytes"] > 8 * short["bytes"]
    grow = [r["heap_peak"] - r["heap_base"] for r in (short, long)]
    print("say short/long:", short["bytes"], long["bytes"], "growth", grow)
    assert grow[1] < grow[0] + 4096, grow
    assert _said((tmp_path / "b.pcm").read_bytes()) == "".join(reply_tokens("Long.", 40))


def _mic_file(path: Path, text: str, rate: int = 16000, silence_s: float = 0.0) -> None:
    samples = asyncio.run(mock_audio.speak(text))
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    conv = a.PcmConverter(mock_audio.RATE, 1, 16, 1, rate)
    path.write_bytes(conv.feed(pcm) + conv.flush() + bytes(int(silence_s * rate) * 2))


def test_device_listens_and_hears_the_spoken_answer(
    device_config: dict[str, Any], tmp_path: Path
) -> None:
    question = "Is it going to rain?"
    mic = tmp_path / "mic.pcm"
    _mic_file(mic, question, silence_s=3.0)
    out = tmp_path / "i2s.pcm"
    first, second = _run(
        tmp_path, device_config,
        [{"op": "listen", "speak": {"rate": 16000, "lead_ms": 500}, "silence_ms": 800},
         {"op": "listen", "transcript_only": True, "max_ms": 1500}],
        STUB_I2S_IN=str(mic), STUB_I2S_OUT=str(out),
    )  # fmt: skip
    answer = "".join(reply_tokens(question))
    assert first["ok"], json.dumps(first)[:1500]
    assert first["heard"] == question and first["text"] == answer
    assert _said(out.read_bytes()) == answer
    print("listen:", first["heap_base"], "->", first["heap_peak"])
    # the silence after the question ended the recording, not the end of the file
    assert first["heap_peak"] - first["heap_base"] < 20480 + 8 * 1024, first
    # the second utterance is the same file from the start, cut at 1.5 s: its mark is
    # not whole, so nothing was heard
    assert second == {**second, "ok": False, "code": "no_speech"}


def test_main_program_push_to_talk(device_config: dict[str, Any], tmp_path: Path) -> None:
    question = "Is it going to rain?"
    _mic_file(tmp_path / "mic.pcm", question)
    device_config.update(
        gpio={"led": "LED", "button": None},
        voice={"enabled": True, "rate": 16000, "buffer": 20480,
               "speaker": {"id": 0, "sck": 16, "ws": 17, "sd": 18},
               "mic": {"id": 1, "sck": 10, "ws": 11, "sd": 12}, "talk_button": 15},
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(device_config))
    out = tmp_path / "speaker.pcm"
    proc = vmkit.run_vm(
        vmkit.DEVICE_DIR / "main.py", cwd=tmp_path, timeout=60,
        env=vmkit.vm_env(STUB_PRESSES="1", STUB_HOLD_READS="200", STUB_LOG=str(tmp_path / "log"),
                         STUB_I2S_IN=str(tmp_path / "mic.pcm"), STUB_I2S_OUT=str(out)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = "".join(reply_tokens(question))
    assert "hold the talk button" in proc.stdout
    assert f"you: {question}" in proc.stdout and f"llm: {answer}" in proc.stdout
    assert _said(out.read_bytes()) == answer
    assert proc.stdout.rstrip().endswith("stopped")
