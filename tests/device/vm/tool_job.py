# Runs on the MicroPython VM: a device with tools (picollm.tools), driven by
# a job file; prints one "STEP {json}" line per step.
#
# job = {"config": {...}, "tools": ["set_led", "read_temp", "broken", "slow"],
#        "steps": [step, ...]}; a step:
#   {"op": "ask", "prompt": str, "opts": {...}}   # progress messages recorded
#   {"op": "serve", "ms": n}                      # answer calls for n ms
#   {"op": "serve", "until": path}                # ... until the file exists (20 s at most)
#   {"op": "connect"}                             # connect now (card, status)
#   {"op": "drop"}                                # lose the socket, no DISCONNECT
#   {"op": "wait_file", "path": str}              # idle (not polling) until it exists

import asyncio
import gc
import json
import sys

from picollm import Chat, LLMError


def out(tag, obj):
    sys.stdout.write(tag + " " + json.dumps(obj) + "\n")


RUNS = []


def setup(chat, names):
    from machine import ADC, Pin

    led = Pin("LED", Pin.OUT)
    sensor = ADC(4)
    if "set_led" in names:
        def set_led(on):
            RUNS.append("set_led")
            led.value(1 if on else 0)
            return {"on": on}

        chat.tool("set_led", "Turn the LED on or off",
                  {"type": "object", "properties": {"on": {"type": "boolean"}},
                   "required": ["on"]}, fn=set_led)
    if "read_temp" in names:
        @chat.tool("read_temp", "The temperature in degrees Celsius")
        def read_temp():
            RUNS.append("read_temp")
            volts = sensor.read_u16() * 3.3 / 65535
            return {"celsius": round(27 - (volts - 0.706) / 0.001721, 1)}
    if "broken" in names:
        @chat.tool("broken", "Always fails")
        def broken():
            RUNS.append("broken")
            raise OSError("sensor unplugged")
    if "slow" in names:
        @chat.tool("slow", "Waits (async)", {"type": "object",
                   "properties": {"ms": {"type": "integer"}}}, timeout_ms=500)
        async def slow(ms=0):
            RUNS.append("slow")
            await asyncio.sleep_ms(ms)
            return "slept %d ms" % ms


async def step(chat, s, progress):
    op = s["op"]
    rec = {"ok": True}
    if op == "connect":
        chat.transport.ensure()
    elif op == "drop":
        chat.transport.drop()
    elif op == "serve" and "until" in s:
        import os

        for _ in range(200):
            await chat.serve(100)
            try:
                os.stat(s["until"])
                break
            except OSError:
                pass
    elif op == "serve":
        await chat.serve(s["ms"])
    elif op == "wait_file":
        import os

        for _ in range(500):
            try:
                os.stat(s["path"])
                break
            except OSError:
                await asyncio.sleep_ms(20)
    elif op == "ask":
        del progress[:]
        try:
            reply = chat.stream(s["prompt"], **(s.get("opts") or {}))
            parts = []
            async for piece in reply:
                parts.append(piece)
            rec["text"] = "".join(parts)
            rec["tool_rounds"] = reply.tool_rounds
            rec["usage"] = reply.usage
        except LLMError as e:
            rec = {"ok": False, "code": e.code, "message": e.message}
        rec["progress"] = list(progress)
    gc.collect()
    rec["runs"] = list(RUNS)
    rec["heap"] = gc.mem_alloc()
    tb = chat._tools
    rec["verdict"] = tb.verdict if tb is not None else None
    return rec


async def main(chat, job):
    progress = []
    chat.on_tool = progress.append
    for s in job["steps"]:
        out("STEP", await step(chat, s, progress))
    await chat.close()


def run():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    gc.collect()
    base = gc.mem_alloc()
    chat = Chat(job["config"])
    setup(chat, job.get("tools") or [])
    gc.collect()
    out("START", {"heap_base": base, "heap_tools": gc.mem_alloc()})
    asyncio.run(main(chat, job))


run()
