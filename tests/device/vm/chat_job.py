# Runs on the MicroPython VM: drive picollm.Chat through the steps of a job
# file and print one "STEP {json}" line per step.
#
# job = {"config": {...}, "steps": [step, ...]}; a step:
#   {"op": "stream" | "ask", "prompt": str, "opts": {...},
#    "cancel_after": n,      # stream: cancel() after n pieces
#    "measure": true,        # sample the live heap after each piece
#    "mark": true,           # print "PIECE" (flushed) after the first piece
#    "keep_text": true}      # return the text (else only its sha256 and length)
#   or {"op": "sleep", "ms": n}, or {"op": "reset"} (Chat.reset())
# A KeyboardInterrupt (SIGINT) during a step calls chat.interrupt() and
# prints "INTERRUPTED".

import asyncio
import gc
import hashlib
import json
import sys
from binascii import hexlify

from picollm import Chat, LLMError


def out(tag, obj):
    sys.stdout.write(tag + " " + json.dumps(obj) + "\n")


async def run_step(chat, step):
    rec = {"ok": True}
    op = step.get("op", "stream")
    opts = step.get("opts") or {}
    measure = step.get("measure")
    h = hashlib.sha256()
    length = 0
    pieces = 0
    keep = step.get("keep_text", True)
    parts = []
    chat.last = None  # the previous reply is not part of this one's figures
    gc.collect()
    base = gc.mem_alloc()
    peak = base
    try:
        if op == "ask":
            text = await chat.ask(step["prompt"], **opts)
            h.update(text)
            length = len(text)
            parts.append(text)
            reply = chat.last
        else:
            reply = chat.stream(step["prompt"], **opts)
            async for piece in reply:
                pieces += 1
                length += len(piece)
                h.update(piece)
                if keep:
                    parts.append(piece)
                if measure:
                    gc.collect()
                    a = gc.mem_alloc()
                    peak = max(peak, a)
                if step.get("mark") and pieces == 1:
                    sys.stdout.write("PIECE\n")
                if step.get("cancel_after") and pieces >= step["cancel_after"]:
                    rec["cancelled"] = await reply.cancel()
                    break
        rec["finish_reason"] = reply.finish_reason
        rec["usage"] = reply.usage
        rec["model"] = reply.model
        rec["refusal"] = reply.refusal
        rec["id"] = reply.id
    except LLMError as e:
        rec = {
            "ok": False,
            "error": type(e).__name__,
            "code": e.code,
            "message": e.message,
            "status": e.status,
            "id": chat.last.id if chat.last else None,
        }
    rec["pieces"] = pieces
    rec["length"] = length
    rec["sha256"] = hexlify(h.digest()).decode()
    if keep:
        rec["text"] = "".join(parts)
    if measure:
        rec["heap_base"] = base
        rec["heap_peak"] = peak
    rec["history"] = len(chat.history)
    rec["session"] = chat.session
    rec["connects"] = getattr(chat.transport, "connects", None)
    return rec


async def main(chat, job):
    for step in job["steps"]:
        if step.get("op") == "sleep":  # the device idles, its client untouched
            await asyncio.sleep_ms(step["ms"])
            out("STEP", {"ok": True})
            continue
        if step.get("op") == "reset":
            chat.reset()
            out("STEP", {"ok": True, "session": chat.session})
            continue
        out("STEP", await run_step(chat, step))
    await chat.close()


def run():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    chat = Chat(job["config"])
    try:
        asyncio.run(main(chat, job))
    except KeyboardInterrupt:
        chat.interrupt()
        sys.stdout.write("INTERRUPTED\n")


run()
