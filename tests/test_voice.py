"""Voice on the real stack: Mosquitto (the project's ACL), the bridge as a process, the
mock API's speech and transcription. A paho device hears `P/D/audio/R` and speaks on
`P/D/listen/R` (docs/protocol.md "Voice")."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.dev import mock_audio
from bridge.dev.mock_llm import reply_tokens
from bridge.plugins import audio as a
from tests.harness import BridgeProcess, Broker

_ids = itertools.count()


class VoiceDevice:
    """A device that records every reply message and audio frame, with arrival times."""

    def __init__(self, broker: Broker, device_id: str | None = None, prefix: str = "llm") -> None:
        self.id = device_id or f"voice{next(_ids)}"
        self.prefix = prefix
        if self.id not in broker.users:
            broker.add_user(self.id)
        self.res: dict[str, list[dict[str, Any]]] = {}
        self.audio: dict[str, list[tuple[float, a.Frame]]] = {}
        self.cond = threading.Condition()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{self.id}")
        c.username_pw_set(self.id, broker.users[self.id])
        c.on_message = self._on_message
        c.on_socket_open = lambda _c, _u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.subscribe([(f"{prefix}/{self.id}/res/+", 1), (f"{prefix}/{self.id}/audio/+", 1)])
        assert subscribed.wait(5)
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        kind, rid = msg.topic.split("/")[-2:]
        with self.cond:
            if kind == "audio":
                self.audio.setdefault(rid, []).append((now, a.unpack_frame(msg.payload)))
            else:
                self.res.setdefault(rid, []).append({**json.loads(msg.payload), "_t": now})
            self.cond.notify_all()

    def ask(self, req: dict[str, Any]) -> None:
        self.client.publish(
            f"{self.prefix}/{self.id}/req", json.dumps(req), qos=1
        ).wait_for_publish(5)

    def speak_frames(self, rid: str, frames: list[bytes], pause: float = 0.0) -> None:
        topic = f"{self.prefix}/{self.id}/listen/{rid}"
        for frame in frames:
            self.client.publish(topic, frame, qos=1).wait_for_publish(5)
            if pause:
                time.sleep(pause)

    def wait(self, rid: str, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any("done" in m or "error" in m for m in self.res.get(rid, [])):
                left = deadline - time.monotonic()
                assert left > 0, f"no terminal for {rid}: {self.res.get(rid)}"
                self.cond.wait(left)
            msgs = self.res[rid]
        assert [m["seq"] for m in msgs] == list(range(len(msgs)))
        return msgs

    def wait_audio_end(self, rid: str, timeout: float = 30) -> list[tuple[float, a.Frame]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(f.kind != a.DATA for _, f in self.audio.get(rid, [])):
                left = deadline - time.monotonic()
                assert left > 0, f"no audio end for {rid}"
                self.cond.wait(left)
            return list(self.audio[rid])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_voice(broker: Broker) -> Iterator[Callable[..., VoiceDevice]]:
    made: list[VoiceDevice] = []

    def make(prefix: str = "llm", device_id: str | None = None) -> VoiceDevice:
        d = VoiceDevice(broker, device_id, prefix)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def _text(msgs: list[dict[str, Any]]) -> str:
    return "".join(m.get("delta", "") for m in msgs)


def _pcm(frames: list[tuple[float, a.Frame]]) -> bytes:
    return b"".join(f.payload for _, f in frames if f.kind == a.DATA)


def _utterance(text: str, rate: int = 16000, piece: int = 3200) -> list[bytes]:
    """The mock's own speech of `text` as listen frames, with the end frame."""
    import asyncio

    samples = asyncio.run(mock_audio.speak(text))
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    conv = a.PcmConverter(mock_audio.RATE, 1, 16, 1, rate)
    pcm = conv.feed(pcm) + conv.flush()
    frames = [
        a.pack_frame(i, a.DATA, 1, rate, pcm[at : at + piece])
        for i, at in enumerate(range(0, len(pcm), piece))
    ]
    return [*frames, a.pack_frame(len(frames), a.END, 1, rate)]


def test_speak_streams_paced_audio_that_says_the_reply(
    bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]
) -> None:
    dev = make_voice()
    prompt = "Hello there. How are you? Fine, thanks"
    # lead_ms of a minute: no waiting here (pacing has its own test)
    speak = {"format": "pcm16", "rate": 16000, "lead_ms": 60000, "chunk_bytes": 2048}
    dev.ask({"id": "s1", "prompt": prompt, "speak": speak})
    msgs = dev.wait("s1")
    frames = dev.wait_audio_end("s1")
    reply = "".join(reply_tokens(prompt))
    assert _text(msgs) == reply
    # frames: seq 0.. with no gap, raw pcm16 at the rate asked, at most chunk_bytes each
    assert [f.seq for _, f in frames] == list(range(len(frames)))
    assert all(f.kind == a.DATA for _, f in frames[:-1]) and frames[-1][1].kind == a.END
    assert all(f.fmt == 1 and f.rate == 16000 for _, f in frames)
    assert all(len(f.payload) + 8 <= 2048 for _, f in frames)
    pcm = _pcm(frames)
    # the audio says the reply (the mock's speech carries what it said)
    heard, seconds = mock_audio.transcribe(a.wav_bytes(pcm, 16000))
    assert heard == reply
    # the end frame and the terminal say what was sent
    summary = json.loads(frames[-1][1].payload)
    done = msgs[-1]
    assert done["done"] is True
    audio = {k: v for k, v in done["audio"].items()}
    assert audio == summary
    assert audio["format"] == "pcm16" and audio["rate"] == 16000
    assert audio["bytes"] == len(pcm) and audio["chunks"] == len(frames) - 1
    assert abs(audio["ms"] - seconds * 1000) < 5 and audio["sentences"] == 3
    # the terminal comes after the last audio frame
    assert done["_t"] >= frames[-1][0]


def test_pacing_measured_at_the_device_never_more_than_lead_ahead_and_no_gap(
    bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]
) -> None:
    dev = make_voice()
    lead_ms, chunk = 400, 1608  # 50 ms of 16 kHz audio a frame
    dev.ask({"id": "p1", "prompt": "Pacing. One two three. Four five six seven",
             "speak": {"rate": 16000, "lead_ms": lead_ms, "chunk_bytes": chunk}})  # fmt: skip
    frames = [(t, f) for t, f in dev.wait_audio_end("p1") if f.kind == a.DATA]
    dev.wait("p1")
    until = 0.0  # when all audio received so far has played, played on arrival
    aheads, gaps = [], []
    for i, (t, f) in enumerate(frames):
        if i:
            gaps.append(t - frames[i - 1][0])
        until = max(until, t) + len(f.payload) / 32000
        aheads.append(until - t)
    total = sum(len(f.payload) for _, f in frames) / 32000
    assert total > 3.0  # several seconds: the pacing had work to do
    # never more than lead_ms ahead; 50 ms for the jitter of the broker hop on a loaded
    # machine (a frame that comes late restarts the device's clock later)
    assert max(aheads) <= lead_ms / 1000 + 0.050, max(aheads)
    # once started, no gap longer than one frame's duration (+ 50 ms of the same jitter)
    assert max(gaps) <= 0.050 + 0.050, max(gaps)
    # and it is paced, not sent at once: the stream lasts about its duration
    assert frames[-1][0] - frames[0][0] >= total - lead_ms / 1000 - 0.1


def test_first_audio_before_the_whole_text_is_generated_and_a_cancel_ends_it(
    bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]
) -> None:
    dev = make_voice()
    dev.ask({"id": "f1", "prompt": "Quick start. [mock tokens=40 delay_ms=60]", "speak": True})
    deadline = time.monotonic() + 10
    while not dev.audio.get("f1"):
        assert time.monotonic() < deadline, "no audio"
        time.sleep(0.01)
    first = dev.audio["f1"][0][1]
    assert first.rate == 16000 and first.fmt == 1  # `true`: the policy's defaults
    # the first sentence speaks while most of the text (40 tokens, 2.4 s) is still to come
    assert len([m for m in dev.res.get("f1", []) if "delta" in m]) < 20
    dev.client.publish(f"llm/{dev.id}/cancel", json.dumps({"id": "f1"}), qos=1)
    assert dev.wait("f1")[-1]["error"]["code"] == "cancelled"
    end = dev.wait_audio_end("f1")[-1][1]
    assert end.kind == a.ERROR and json.loads(end.payload)["code"] == "cancelled"


def test_a_refusal_is_spoken(bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]) -> None:
    from bridge.dev.mock_llm import REFUSAL_TEXT

    dev = make_voice()
    dev.ask({"id": "n1", "prompt": "No [mock refusal=1]", "speak": {"lead_ms": 60000}})
    assert dev.wait("n1")[-1]["audio"]["sentences"] == 1
    assert mock_audio.transcribe(a.wav_bytes(_pcm(dev.wait_audio_end("n1")), 16000))[0] == (
        REFUSAL_TEXT
    )


def test_wav_and_mp3_formats(bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]) -> None:
    dev = make_voice()
    dev.ask({"id": "w1", "prompt": "Wave", "speak": {"format": "wav", "rate": 8000}})
    dev.ask({"id": "m1", "prompt": "Mpeg", "speak": {"format": "mp3"}})
    wav = _pcm(dev.wait_audio_end("w1"))
    reader = a.WavReader()
    pcm = reader.feed(wav)
    assert reader.rate == 8000 and wav[:4] == b"RIFF"
    assert mock_audio.transcribe(a.wav_bytes(pcm, 8000))[0] == "".join(reply_tokens("Wave"))
    mp3 = dev.wait_audio_end("m1")
    frames = a.Mp3Frames().feed(_pcm(mp3))
    assert frames and all(f.fmt == 3 and f.rate == 0 for _, f in mp3)
    assert dev.wait("m1")[-1]["audio"]["format"] == "mp3"
    assert dev.wait("w1")[-1]["audio"]["rate"] == 8000


def test_text_reply_survives_a_failing_speech_api(
    start_bridge: Callable[..., BridgeProcess], make_voice: Callable[..., VoiceDevice]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proc = start_bridge(OPENAI_AUDIO_BASE_URL=f"http://127.0.0.1:{dead}/v1")
    dev = make_voice(proc.env["BRIDGE_TOPIC_PREFIX"])
    dev.ask({"id": "x1", "prompt": "Still here", "speak": True})
    msgs = dev.wait("x1")
    assert msgs[-1]["done"] is True and _text(msgs) == "".join(reply_tokens("Still here"))
    assert msgs[-1]["audio"]["error"]["code"] == "upstream_unreachable"
    frames = dev.wait_audio_end("x1")
    assert frames[-1][1].kind == a.ERROR
    assert json.loads(frames[-1][1].payload)["code"] == "upstream_unreachable"


def test_speech_api_error_status_is_typed(
    start_bridge: Callable[..., BridgeProcess],
    make_voice: Callable[..., VoiceDevice],
    mock_llm: Any,
) -> None:
    proc = start_bridge(OPENAI_AUDIO_BASE_URL=mock_llm.base_url + "/nowhere")
    dev = make_voice(proc.env["BRIDGE_TOPIC_PREFIX"])
    dev.ask({"id": "v1", "prompt": "Voice", "speak": True})
    msgs = dev.wait("v1")
    assert msgs[-1]["done"] is True and _text(msgs) == "".join(reply_tokens("Voice"))
    error = msgs[-1]["audio"]["error"]
    assert error["code"] == "upstream_status" and "404" in error["message"]
    assert json.loads(dev.wait_audio_end("v1")[-1][1].payload) == error


def test_listen_transcribes_and_answers_by_voice(
    bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]
) -> None:
    dev = make_voice()
    question = "What is the weather like today?"
    dev.ask({"id": "l1", "listen": {"rate": 16000}, "speak": {"rate": 16000}})
    dev.speak_frames("l1", _utterance(question))
    msgs = dev.wait("l1")
    assert msgs[0]["transcript"] == question
    assert _text(msgs) == "".join(reply_tokens(question))
    assert msgs[-1]["done"] is True and msgs[-1]["transcript"] == question
    heard, _ = mock_audio.transcribe(a.wav_bytes(_pcm(dev.wait_audio_end("l1")), 16000))
    assert heard == "".join(reply_tokens(question))


def test_listen_transcript_only(
    bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]
) -> None:
    dev = make_voice()
    dev.ask({"id": "t1", "listen": {"rate": 8000, "transcript_only": True}})
    dev.speak_frames("t1", _utterance("Lights on.", rate=8000))
    msgs = dev.wait("t1")
    assert set(msgs[0]) - {"_t"} == {"seq", "transcript"}
    assert msgs[0]["transcript"] == "Lights on." and len(msgs) == 2
    assert msgs[-1]["done"] is True and msgs[-1]["transcript"] == "Lights on."


def _bad(dev: VoiceDevice, rid: str, frames: list[bytes], **listen: Any) -> dict[str, Any]:
    dev.ask({"id": rid, "listen": {"rate": 16000, **listen}})
    dev.speak_frames(rid, frames)
    msgs = dev.wait(rid)
    assert len(msgs) == 1, msgs
    return dict(msgs[0]["error"])


def test_malformed_utterances_are_refused_clearly(
    start_bridge: Callable[..., BridgeProcess], make_voice: Callable[..., VoiceDevice]
) -> None:
    policy = {"default": {"listen_seconds": 2, "listen_timeout_ms": 600}}
    proc = start_bridge(BRIDGE_POLICY=json.dumps(policy))
    dev = make_voice(proc.env["BRIDGE_TOPIC_PREFIX"])
    good = _utterance("Hello.")
    assert len(good) > 4
    gap = _bad(dev, "g1", [good[0], good[2], *good[3:]])
    assert gap["code"] == "bad_audio" and "lost or reordered" in gap["message"]
    swapped = _bad(dev, "g2", [good[1], good[0], *good[2:]])
    assert swapped["code"] == "bad_audio"
    rate = _bad(dev, "g3", [a.pack_frame(0, a.DATA, 1, 8000, bytes(320)),
                            a.pack_frame(1, a.END, 1, 8000)])  # fmt: skip
    assert rate["code"] == "bad_audio" and "8000" in rate["message"]
    changed = _bad(dev, "g4", [a.pack_frame(0, a.DATA, 1, 16000, bytes(320)),
                               a.pack_frame(1, a.DATA, 1, 8000, bytes(320))])  # fmt: skip
    assert changed["code"] == "bad_audio" and "changed" in changed["message"]
    long = [a.pack_frame(i, a.DATA, 1, 16000, bytes(32000)) for i in range(3)]
    assert _bad(dev, "g5", long)["code"] == "audio_too_long"
    t0 = time.monotonic()
    missing_end = _bad(dev, "g6", good[:-1])
    assert missing_end["code"] == "audio_timeout" and time.monotonic() - t0 < 5
    assert _bad(dev, "g7", [b"\x00\x01"])["code"] == "bad_audio"
    assert _bad(dev, "g8", [a.pack_frame(0, a.END, 1, 16000)])["code"] == "no_speech"
    assert _bad(dev, "g9", [a.pack_frame(0, a.DATA, 1, 16000, bytes(6400)),
                            a.pack_frame(1, a.END, 1, 16000)])["code"] == "no_speech"  # fmt: skip
    # a listen request that also has a prompt is not one, nor one without an id
    dev.ask({"id": "g10", "prompt": "hi", "listen": {}})
    assert dev.wait("g10")[0]["error"]["code"] == "bad_request"
    before = set(dev.res)
    dev.ask({"listen": {}})
    deadline = time.monotonic() + 10
    while not (made := set(dev.res) - before):
        assert time.monotonic() < deadline, "no answer to a listen request without id"
        time.sleep(0.05)
    error = dev.wait(made.pop())[0]["error"]
    assert error["code"] == "bad_request" and "needs an id" in error["message"]
    # and the bridge still serves
    dev.ask({"id": "ok", "listen": {"rate": 16000}})
    dev.speak_frames("ok", good)
    assert dev.wait("ok")[0]["transcript"] == "Hello."


def test_voice_off_refuses_speak_and_listen(
    start_bridge: Callable[..., BridgeProcess], make_voice: Callable[..., VoiceDevice]
) -> None:
    proc = start_bridge(BRIDGE_VOICE="false")
    dev = make_voice(proc.env["BRIDGE_TOPIC_PREFIX"])
    dev.ask({"id": "o1", "prompt": "x", "speak": True})
    assert dev.wait("o1")[0]["error"]["code"] == "bad_request"


def test_acl_a_device_can_neither_hear_nor_speak_for_another(
    broker: Broker, bridge: BridgeProcess, make_voice: Callable[..., VoiceDevice]
) -> None:
    alice = make_voice()
    bob = make_voice()
    # alice subscribes to bob's audio and publishes an utterance on bob's listen topic
    spy: list[str] = []
    alice.client.message_callback_add(f"llm/{bob.id}/audio/#", lambda *m: spy.append("x"))
    alice.client.subscribe(f"llm/{bob.id}/audio/#", qos=1)
    bob.ask({"id": "b1", "listen": {"rate": 16000}, "speak": True})
    time.sleep(0.2)
    alice.client.publish(f"llm/{bob.id}/listen/b1", _utterance("Forged.")[0], qos=1)
    alice.client.publish(f"llm/{bob.id}/listen/b1", a.pack_frame(1, a.END, 1, 16000), qos=1)
    time.sleep(0.3)
    bob.speak_frames("b1", _utterance("Genuine."))
    msgs = bob.wait("b1")
    assert msgs[0]["transcript"] == "Genuine."  # alice's frames never reached the bridge
    bob.wait_audio_end("b1")
    time.sleep(0.2)
    assert spy == [] and "b1" not in alice.audio


def test_demo_voice_writes_the_spoken_answer_to_a_wav(tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.harness import REPO

    out = tmp_path / "answer.wav"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OPENAI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "demo", "--voice", str(out), "--prompt", "Hi."],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"written to {out}" in proc.stderr
    assert mock_audio.transcribe(out.read_bytes())[0] == "".join(reply_tokens("Hi."))
