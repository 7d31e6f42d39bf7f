# Runs on the MicroPython VM: picollm's voice over MQTT. argv: job.json
#
# job = {"config": {...}, "steps": [step, ...]}; a step:
#   {"op": "say", "prompt": str, "speak": {...}, "out": "i2s" | "writer",
#    "buffer": n, "log": path}         # arrival log: "ticks seq bytes" lines
#   {"op": "listen", "speak": {...} | null, "transcript_only": bool,
#    "buffer": n, "silence_ms": n, "max_ms": n}
# Prints one "STEP {json}" per step: text, heap figures, speaker counters.

import gc
import json
import sys

import asyncio
from machine import I2S

from picollm import Chat, LLMError
from picollm.voice import Speaker


def out(obj):
    sys.stdout.write("STEP " + json.dumps(obj) + "\n")


class Heap:
    def __init__(self):
        gc.collect()
        self.base = gc.mem_alloc()
        self.peak = self.base
        self.n = 0

    def sample(self):
        self.n += 1
        gc.collect()
        self.peak = max(self.peak, gc.mem_alloc())


def speaker_for(step, heap):
    if step.get("out") == "writer":
        f = open(step.get("file", "writer.pcm"), "ab")
        spk = Speaker(f.write, buffer=step.get("buffer", 20480))
    else:
        i2s = I2S(0, mode=I2S.TX, bits=16, format=I2S.MONO,
                  rate=step.get("rate", 16000), ibuf=step.get("ibuf", 4096))
        spk = Speaker(i2s, buffer=step.get("buffer", 20480))
    log = open(step["log"], "w") if step.get("log") else None

    def on_frame(ticks, seq, n):
        if log is not None:
            log.write("%d %d %d\n" % (ticks, seq, n))
        heap.sample()

    spk.log = on_frame
    return spk, log


async def run_step(chat, step):
    heap = Heap()
    rec = {"ok": True}
    spk, log = speaker_for(step, heap)
    chat.speaker = spk
    try:
        if step["op"] == "say":
            rec["text"] = await chat.say(step["prompt"], speak=step.get("speak") or True)
        else:
            mic = I2S(1, mode=I2S.RX, bits=16, format=I2S.MONO, rate=step.get("mic_rate", 16000),
                      ibuf=8192)
            heard, answer = await chat.listen(
                mic, rate=step.get("mic_rate", 16000), speak=step.get("speak"),
                transcript_only=step.get("transcript_only", False),
                silence_ms=step.get("silence_ms", 0), max_ms=step.get("max_ms", 20000))
            rec["heard"] = heard
            rec["text"] = answer
    except LLMError as e:
        rec = {"ok": False, "code": e.code, "message": e.message}
        last = chat.last
        if last is not None:
            rec["seq"] = getattr(last, "seq", None)
            rec["heard"] = getattr(last, "transcript", None)
    heap.sample()
    spk.stop()
    if log is not None:
        log.close()
    rec.update(heap_base=heap.base, heap_peak=heap.peak, frames=spk.frames, bytes=spk.bytes,
               overruns=spk.overruns, summary=spk.summary, error=spk.error,
               ring=spk.ring.size)
    return rec


async def main(job):
    chat = Chat(job["config"])
    # Warm up: the transport's modules are imported (compiled into the heap) and the
    # connection made before any figure is taken.
    await chat.ask("warm up")
    chat.reset()
    for step in job["steps"]:
        out(await run_step(chat, step))
    await chat.close()


with open(sys.argv[1]) as f:
    asyncio.run(main(json.load(f)))
