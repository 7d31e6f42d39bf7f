# Runs on the MicroPython VM: direct mode's voice (client.audio.speech and
# client.audio.transcriptions) against the mock API over HTTPS. Prints
# "R name {json}" per step.
#
# argv: base_url api_key ca_path text

import asyncio
import gc
import json
import os
import sys

from picollm import LLMError
from picollm.openai import OpenAI

BASE, KEY, CA, TEXT = sys.argv[1:5]


def rec(name, obj):
    sys.stdout.write("R " + name + " " + json.dumps(obj) + "\n")


async def araises(coro):
    try:
        await coro
    except Exception as e:
        return type(e).__name__
    return None


class Probe:
    # A writer that samples the live heap while the audio streams through.
    def __init__(self, f):
        self.f = f
        self.calls = 0
        self.peak = 0

    def write(self, part):
        self.f.write(part)
        self.calls += 1
        if self.calls % 8 == 1:
            gc.collect()
            self.peak = max(self.peak, gc.mem_alloc())
        return len(part)


async def main():
    client = OpenAI(KEY, BASE, ca=CA)
    speech = client.audio.speech
    w = open("checks.bin", "wb")
    rec("checks", {
        "model": await araises(speech.create(5, "x", "alloy", writer=w)),
        "input_empty": await araises(speech.create("tts-1", "", "alloy", writer=w)),
        "format": await araises(speech.create("tts-1", "x", "alloy", "ogg", writer=w)),
        "writer": await araises(speech.create("tts-1", "x", "alloy", "wav")),
        "speed": await araises(speech.create("tts-1", "x", "alloy", "wav", w, speed=9)),
        "file_missing": await araises(client.audio.transcriptions.create("w", "nope.wav")),
        "file_type": await araises(client.audio.transcriptions.create("w", 3)),
    })
    w.close()
    for fmt in ("wav", "pcm"):
        gc.collect()
        base = gc.mem_alloc()
        with open("speech." + fmt, "wb") as f:
            probe = Probe(f)
            n = await speech.create("tts-1", TEXT, "alloy", response_format=fmt, writer=probe)
        rec("speech_" + fmt, {"bytes": n, "size": os.stat("speech." + fmt)[6],
                              "heap_base": base, "heap_peak": probe.peak, "writes": probe.calls})
    gc.collect()
    base = gc.mem_alloc()
    t = await client.audio.transcriptions.create("whisper-1", "speech.wav")
    gc.collect()
    rec("transcript", {"text": t.text, "heap_after": gc.mem_alloc() - base})
    t = await client.audio.transcriptions.create("whisper-1", "speech.wav", response_format="text")
    rec("transcript_text", {"text": t.text})
    try:
        await speech.create("tts-1", TEXT + " [mock status=503]", "alloy", "wav", open("x", "wb"))
        rec("status", {"ok": True})
    except LLMError as e:
        rec("status", {"code": e.code, "status": e.status})
    from machine import I2S

    out = I2S(0, mode=I2S.TX, bits=16, format=I2S.MONO, rate=24000, ibuf=8192)
    n = await speech.create("tts-1", "Short.", "alloy", response_format="pcm", writer=out)
    out.deinit()
    rec("i2s", {"bytes": n})


asyncio.run(main())
