# Runs on the MicroPython VM: picollm.image through the bridge. argv: a job
# file {"config": {...}, "steps": [...]}; prints one "STEP {json}" per step.
#   {"op": "ask_about", "prompt": str, "path": str, "piece": n}
#       upload the file in pieces, then stream the reply about it
#   {"op": "ask_about", "prompt": str, "frame": [w, h]}
#       the same with a raw rgb565 frame drawn in a buffer
#   {"op": "generate", "prompt": str, "width": w, "height": h, "format": f,
#    "sink": "framebuf" | "file", "points": [[x, y], ...]}
#       receive a picture into a FrameBuffer (and read pixels back with
#       FrameBuffer.pixel) or into a file

import asyncio
import gc
import json
import sys

import framebuf

from picollm import Chat, LLMError
from picollm import image

MODES = {"mono1": framebuf.MONO_HLSB, "mono1_vlsb": framebuf.MONO_VLSB,
         "rgb565": framebuf.RGB565, "gray4": framebuf.GS4_HMSB}


def out(tag, obj):
    sys.stdout.write(tag + " " + json.dumps(obj) + "\n")


async def step_ask_about(chat, step):
    gc.collect()
    free = gc.mem_free()
    if "frame" in step:  # a camera's raw frame in memory: a red-to-black ramp
        w, h = step["frame"]
        source = bytearray(w * h * 2)
        fb = framebuf.FrameBuffer(source, w, h, framebuf.RGB565)
        for x in range(w):
            fb.vline(x, 0, h, (x * 31 // (w - 1)) << 11)
        reply = await image.ask_about(chat, step["prompt"], source, "rgb565", w, h,
                                      piece=step.get("piece", 1024))
    else:
        reply = await image.ask_about(chat, step["prompt"], step["path"],
                                      piece=step.get("piece", 1024))
    parts = []
    async for piece in reply:
        parts.append(piece)
    return {"ok": True, "text": "".join(parts), "id": reply.id, "heap_free_before": free}


async def step_generate(chat, step):
    w, h, fmt = step["width"], step["height"], step["format"]
    rec = {"ok": True}
    if step["sink"] == "framebuf":
        buf = bytearray(image.frame_bytes(w, h, fmt))
        fb = framebuf.FrameBuffer(buf, w, h, MODES[fmt])
        rec["info"] = await image.generate(chat, step["prompt"], w, h, fmt, buf, piece=512)
        rec["pixels"] = [fb.pixel(x, y) for x, y in step["points"]]
    else:
        with open(step["path"], "wb") as f:
            rec["info"] = await image.generate(chat, step["prompt"], w, h, fmt, f, piece=512)
    return rec


async def main(chat, job):
    for step in job["steps"]:
        try:
            if step["op"] == "ask_about":
                rec = await step_ask_about(chat, step)
            else:
                rec = await step_generate(chat, step)
        except LLMError as e:
            rec = {"ok": False, "code": e.code, "message": e.message}
        out("STEP", rec)
    await chat.close()


with open(sys.argv[1]) as f:
    job = json.load(f)
asyncio.run(main(Chat(job["config"]), job))
