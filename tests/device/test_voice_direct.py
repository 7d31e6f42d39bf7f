"""Direct mode's voice on the MicroPython VM: uopenai's audio.speech and
audio.transcriptions against the mock API over verified HTTPS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.plugins import audio as a
from tests.device import vmkit
from tests.device.conftest import API_KEY

TEXT = "The sky is blue because air scatters blue light the most."


def test_speech_streams_to_a_writer_and_a_file_transcribes_in_bounded_heap(
    tls_mock: Any, certs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "i2s.pcm"
    proc = vmkit.run_vm(
        vmkit.PROGRAMS_DIR / "direct_voice.py",
        tls_mock.base_url, API_KEY, str(certs["ca"]), TEXT,
        cwd=tmp_path, timeout=90, env=vmkit.vm_env(STUB_I2S_OUT=str(out)),
    )  # fmt: skip
    recs = _records(proc.stdout)
    assert proc.returncode == 0 and "i2s" in recs, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert recs["checks"] == {
        "model": "TypeError",
        "input_empty": "ValueError",
        "format": "ValueError",
        "writer": "ValueError",
        "speed": "ValueError",
        "file_missing": "ValueError",
        "file_type": "TypeError",
    }
    wav = (tmp_path / "speech.wav").read_bytes()
    reader = a.WavReader()
    pcm = reader.feed(wav)
    assert reader.rate == 24000 and len(pcm) > 48000  # over a second of speech
    assert recs["speech_wav"]["bytes"] == recs["speech_wav"]["size"] == len(wav)
    assert recs["speech_pcm"]["size"] == len(wav) - 44
    for fmt in ("wav", "pcm"):
        r = recs[f"speech_{fmt}"]
        # hundreds of KB of audio pass through; the heap grows by a few KB only
        assert r["writes"] > 50 and r["heap_peak"] - r["heap_base"] < 12 * 1024, r
    print("direct:", {k: recs[k] for k in ("speech_wav", "speech_pcm", "transcript")})
    assert recs["transcript"]["text"] == TEXT
    assert recs["transcript"]["heap_after"] < 8 * 1024
    assert recs["transcript_text"]["text"] == TEXT
    assert recs["status"] == {"code": "upstream_status", "status": 503}
    assert recs["i2s"]["bytes"] == out.stat().st_size > 10000


def _records(stdout: str) -> dict[str, dict[str, Any]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("R "):
            name, _, body = line[2:].partition(" ")
            out[name] = json.loads(body)
    return out
