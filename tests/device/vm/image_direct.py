# Runs on the MicroPython VM: client.images.generate() in direct mode, to a
# file (b64_json) and to a writer (url), and its argument checks. Prints
# "R name {json}" records.
#
# argv: base_url api_key ca_path

import asyncio
import gc
import hashlib
import json
import sys
from binascii import hexlify

from picollm import LLMError
from picollm.openai import OpenAI

BASE, KEY, CA = sys.argv[1:4]


def rec(name, obj):
    sys.stdout.write("R " + name + " " + json.dumps(obj) + "\n")


class Hasher:
    # A writer that keeps only a digest and the largest write.
    def __init__(self):
        self.h = hashlib.sha256()
        self.n = 0
        self.largest = 0

    def write(self, data):
        self.h.update(data)
        self.n += len(data)
        self.largest = max(self.largest, len(data))


async def araises(coro):
    try:
        await coro
    except LLMError as e:
        return e.code
    except Exception as e:
        return type(e).__name__
    return None


async def main():
    client = OpenAI(KEY, BASE, ca=CA)
    gen = client.images.generate
    rec("checks", {
        "model_int": await araises(gen(1, "x", "o.png")),
        "model_empty": await araises(gen("", "x", "o.png")),
        "prompt_empty": await araises(gen("m", "", "o.png")),
        "size_bad": await araises(gen("m", "x", "o.png", size="big")),
        "format_bad": await araises(gen("m", "x", "o.png", response_format="png")),
        "out_bad": await araises(gen("m", "x", 42)),
        "timeout_bad": await araises(gen("m", "x", "o.png", timeout_ms=0)),
    })
    gc.collect()
    res = await gen("mock-image", "a noisy cat [mock noise]", "cat.png", size="512x512")
    rec("b64", {"bytes": res.bytes, "url": res.url, "mem_free": gc.mem_free()})
    w = Hasher()
    res = await gen("mock-image", "a noisy dog [mock noise]", w, size="256x256",
                    response_format="url")
    rec("url", {"bytes": res.bytes, "sha256": hexlify(w.h.digest()).decode(),
                "written": w.n, "url": res.url, "largest": w.largest})
    rec("status", {"code": await araises(gen("mock-image", "x [mock status=400]", w))})
    w = Hasher()
    res = await client.images.generations.create("mock-image", "a kite", w, size="64x32")
    rec("create", {"bytes": res.bytes, "sha256": hexlify(w.h.digest()).decode()})


asyncio.run(main())
