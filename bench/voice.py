"""`python -m bench.voice`: time to first audio, spoken sentence by sentence, against the
whole reply's speech at once.

Why: a voice device's user waits for the first sound. The bridge speaks each
sentence as soon as it is complete, while the rest is still generated; the
usual server (xiaozhi's, a script with the official SDK) waits for the whole
text and then synthesises it. Both run here against the same mock API (a
reply of `--tokens` tokens at `--delay-ms` per token, speech from espeak-ng),
at each concurrency: *ours* is the bridge, measured at MQTT devices from the
request to the first audio frame; *whole* asks the same API for the whole
text, then for its speech, measured to the first byte of audio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.procs import HOST, Broker, free_port, python_proc, wait_port

PROMPT = "The sky looks blue. Air scatters blue light the most. Sunsets are red."
API_KEY = "sk-bench-voice-" + secrets.token_hex(6)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class _Devices:
    """C paho devices, each its own broker user, timing the first audio frame of a request."""

    def __init__(self, port: int, users: dict[str, str], count: int) -> None:
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.lock = threading.Lock()
        self.clients = []
        self.online = threading.Event()
        for i in range(count):
            name = f"voice{i}"
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}")
            c.username_pw_set(name, users[name])
            c.on_message = self._on_message
            ready = threading.Event()
            c.on_subscribe = lambda *_a, ev=ready: ev.set()
            c.connect(HOST, port)
            c.loop_start()
            c.subscribe([(f"llm/{name}/audio/+", 1), (f"llm/{name}/res/+", 1),
                         ("llm/bridge/status", 1)])  # fmt: skip
            if not ready.wait(10):
                raise RuntimeError(f"{name} could not subscribe")
            self.clients.append((name, c))

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        if parts[1] == "bridge":
            if msg.payload == b"online":
                self.online.set()
            return
        key = f"{parts[1]}/{parts[3]}"
        with self.lock:
            if parts[2] == "audio":
                self.first.setdefault(key, now)
            elif b'"done"' in msg.payload or b'"error"' in msg.payload:
                self.done[key] = now

    def run(self, round_id: int, tokens: int, count: int) -> list[float]:
        body = {"prompt": f"{PROMPT} [mock tokens={tokens}]", "speak": {"rate": 16000}}
        sent: dict[str, float] = {}
        for name, c in self.clients[:count]:
            rid = f"r{round_id}"
            sent[f"{name}/{rid}"] = time.monotonic()
            c.publish(f"llm/{name}/req", json.dumps({"id": rid, **body}), qos=1)
        # Once every device has its first audio the rest is paced real time: cancel it
        # (the cancel also ends the audio stream) and wait for the terminals.
        deadline = time.monotonic() + 120
        cancelled = False
        while time.monotonic() < deadline:
            with self.lock:
                if all(k in self.done for k in sent):
                    break
                heard = all(k in self.first or k in self.done for k in sent)
            if heard and not cancelled:
                cancelled = True
                for name, c in self.clients[:count]:
                    c.publish(f"llm/{name}/cancel", json.dumps({"id": f"r{round_id}"}), qos=1)
            time.sleep(0.02)
        with self.lock:
            missing = [k for k in sent if k not in self.first]
            if missing:
                raise RuntimeError(f"no audio for {missing[:3]}")
            return [self.first[k] - t for k, t in sent.items()]

    def wait_online(self, timeout: float = 20) -> None:
        if not self.online.wait(timeout):
            raise RuntimeError("the bridge did not come online")

    def close(self) -> None:
        for _, c in self.clients:
            c.disconnect()
            c.loop_stop()


async def _whole(base_url: str, count: int, tokens: int) -> list[float]:
    """Ask for the text, then the speech of all of it; time to the first audio byte."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=2 * count + 4)
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:

        async def one() -> float:
            t0 = time.monotonic()
            ask = {"role": "user", "content": f"{PROMPT} [mock tokens={tokens}]"}
            body = {"model": "mock-1", "stream": True, "messages": [ask]}
            text = []
            async with client.stream("POST", base_url + "/chat/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:]).get("choices") or []:
                            text.append((ch.get("delta") or {}).get("content") or "")
            speech = {"model": "tts", "voice": "alloy", "input": "".join(text),
                      "response_format": "wav"}  # fmt: skip
            async with client.stream("POST", base_url + "/audio/speech", json=speech) as resp:
                async for _chunk in resp.aiter_bytes():
                    return time.monotonic() - t0
            raise RuntimeError("no audio")

        return list(await asyncio.gather(*(one() for _ in range(count))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.voice", description=__doc__)
    ap.add_argument("--concurrency", default="1,20", help="comma-separated (default 1,20)")
    ap.add_argument("--tokens", type=int, default=60, help="reply length (default 60)")
    ap.add_argument("--delay-ms", type=float, default=25, help="mock time per token (25)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per concurrency (default 3)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-voice-") as tmp:
        work = Path(tmp)
        users = {"bridge": secrets.token_hex(8)}
        users.update({f"voice{i}": secrets.token_hex(8) for i in range(max(levels))})
        (work / "broker").mkdir()
        broker = Broker(work / "broker", users).start(mosquitto)
        port = free_port()
        mock = python_proc("mock", ["bridge", "mock-llm", "--port", str(port), "--api-key",
                                    API_KEY, "--delay-ms", str(args.delay_ms)],
                           work / "mock.log")  # fmt: skip
        wait_port(port, proc=mock.proc)
        base_url = f"http://{HOST}:{port}/v1"
        env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": API_KEY, "OPENAI_MODEL": "mock-1",
               "BRIDGE_MQTT_URL": f"mqtt://bridge:{users['bridge']}@{HOST}:{broker.port}",
               "BRIDGE_STATE": "false", "BRIDGE_HA_DISCOVERY": "false",
               "BRIDGE_JOURNAL": "false", "BRIDGE_LOG_LEVEL": "WARNING"}  # fmt: skip
        bridge = python_proc("bridge", ["bridge", "run"], work / "bridge.log", env=env)
        devices: _Devices | None = None
        try:
            devices = _Devices(broker.port, users, max(levels))
            devices.wait_online()
            round_id = 0
            for c in levels:
                ours: list[float] = []
                whole: list[float] = []
                for _ in range(args.rounds):
                    round_id += 1
                    ours += devices.run(round_id, args.tokens, c)
                    whole += asyncio.run(_whole(base_url, c, args.tokens))
                row = {"concurrency": c, "requests": len(ours),
                       "ours_p50_ms": 1000 * statistics.median(ours),
                       "ours_p95_ms": 1000 * _pct(ours, 0.95),
                       "whole_p50_ms": 1000 * statistics.median(whole),
                       "whole_p95_ms": 1000 * _pct(whole, 0.95)}  # fmt: skip
                results.append(row)
                print(
                    f"C={c:<3} time to first audio: sentence by sentence p50 "
                    f"{row['ours_p50_ms']:6.0f} ms p95 {row['ours_p95_ms']:6.0f} ms | "
                    f"whole reply at once p50 {row['whole_p50_ms']:6.0f} ms "
                    f"p95 {row['whole_p95_ms']:6.0f} ms",
                    flush=True,
                )
        finally:
            if devices is not None:
                devices.close()
            bridge.stop()
            mock.stop()
            broker.stop()
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "delay_ms": args.delay_ms,
                                         "results": results}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
