# Runs on the MicroPython VM: uopenai's on-device test program, step by
# step, against picollm.openai.OpenAI. Each step prints "R name {json}" with
# what it observed; the pytest side checks the values.
#
# argv: base_url api_key ca_path image_path

import asyncio
import json
import sys

from picollm import LLMError
from picollm.openai import OpenAI

BASE, KEY, CA, IMAGE = sys.argv[1:5]
MODEL = "mock-1"


def rec(name, obj):
    sys.stdout.write("R " + name + " " + json.dumps(obj) + "\n")


def raises(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:
        return type(e).__name__
    return None


async def araises(coro):
    try:
        await coro
    except Exception as e:
        return type(e).__name__
    return None


def err(e):
    return {"error": type(e).__name__, "code": e.code, "status": e.status, "message": e.message}


def user(text):
    return [{"role": "user", "content": text}]


async def main():
    # 1. OpenAI() init + invalid argument guard
    client = OpenAI(KEY, BASE, ca=CA)
    rec(
        "init",
        {
            "base_url": client.base_url,
            "repr_has_key": KEY in repr(client),
            "key_int": raises(OpenAI, 123, BASE),
            "key_empty": raises(OpenAI, "", BASE),
            "url_int": raises(OpenAI, KEY, 5),
            "url_scheme": raises(OpenAI, KEY, "ftp://example.com/v1"),
            "url_nohost": raises(OpenAI, KEY, "https:///v1"),
            "ca_int": raises(OpenAI, KEY, BASE, ca=7),
        },
    )
    create = client.chat.completions.create

    # 2. non-stream single turn
    r = await create(MODEL, user("Reply OK"))
    c = r.choices[0]
    rec(
        "single",
        {
            "content": c.message.content,
            "finish_reason": c.finish_reason,
            "id": r.id,
            "model": r.model,
            "usage": r.usage,
            "role": c.message.role,
        },
    )

    # 3. temperature / max_tokens
    r = await create(MODEL, user("Short please"), temperature=0.2, max_tokens=3)
    rec(
        "params",
        {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason},
    )

    # 4. multi-turn (system + user + assistant + user)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    r = await create(MODEL, msgs)
    rec("multi", {"content": r.choices[0].message.content})

    # 5. stream: raw SSE lines with iter_lines(), parsed as uopenai's README does
    s = await create(MODEL, user("Count to five"), stream=True)
    lines = 0
    text = ""
    async for raw in s.iter_lines():
        lines += 1
        line = raw.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            text += delta.get("content", "") or ""
    rec("stream_lines", {"lines": lines, "text": text})

    # 6. encode_image()
    b64 = OpenAI.encode_image(IMAGE)
    rec(
        "encode",
        {
            "b64": b64,
            "int": raises(OpenAI.encode_image, 5),
            "empty": raises(OpenAI.encode_image, ""),
            "missing": raises(OpenAI.encode_image, IMAGE + ".nope"),
        },
    )

    # 7. max_tokens=2048, non-stream
    r = await create(MODEL, user("Long [mock tokens=600]"), max_tokens=2048)
    rec(
        "long",
        {
            "length": len(r.choices[0].message.content),
            "usage": r.usage,
            "finish_reason": r.choices[0].finish_reason,
        },
    )

    # 8. max_tokens=2048, stream, read as text pieces
    s = await create(
        MODEL,
        user("Long [mock tokens=600]"),
        stream=True,
        max_tokens=2048,
        stream_options={"include_usage": True},
    )
    n = 0
    size = 0
    async for piece in s:
        n += 1
        size += len(piece)
    rec(
        "long_stream",
        {
            "pieces": n,
            "length": size,
            "finish_reason": s.finish_reason,
            "usage": s.usage,
            "id": s.id,
            "model": s.model,
        },
    )

    # 9. vision, non-stream, a base64 data URI
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64}},
    ]
    r = await create(MODEL, [{"role": "user", "content": content}], timeout_ms=60000)
    rec("vision", {"content": r.choices[0].message.content})
    b64 = content = None

    # 10. base_url trailing slash removed
    rec("slash", {"base_url": OpenAI(KEY, BASE + "///", ca=CA).base_url})

    # 11. invalid arguments of create()
    rec(
        "create_args",
        {
            "model_int": await araises(create(1, user("x"))),
            "model_empty": await araises(create("", user("x"))),
            "messages_str": await araises(create(MODEL, "hello")),
            "messages_empty": await araises(create(MODEL, [])),
            "message_not_dict": await araises(create(MODEL, ["hello"])),
            "role_bad": await araises(create(MODEL, [{"role": "robot", "content": "x"}])),
            "content_int": await araises(create(MODEL, [{"role": "user", "content": 5}])),
            "stream_str": await araises(create(MODEL, user("x"), stream="yes")),
            "timeout_zero": await araises(create(MODEL, user("x"), timeout_ms=0)),
            "timeout_str": await araises(create(MODEL, user("x"), timeout_ms="5")),
            "temperature_high": await araises(create(MODEL, user("x"), temperature=3)),
            "temperature_str": await araises(create(MODEL, user("x"), temperature="hot")),
            "max_tokens_zero": await araises(create(MODEL, user("x"), max_tokens=0)),
            "max_tokens_float": await araises(create(MODEL, user("x"), max_tokens=1.5)),
        },
    )

    # 12. response object attributes; "content": null becomes ""
    r = await create(MODEL, user("No [mock refusal=1]"))
    m = r.choices[0].message
    rec(
        "null_content",
        {
            "content": m.content,
            "refusal": m.refusal,
            "has": [hasattr(r, a) for a in ("id", "model", "usage", "choices")],
        },
    )

    # beyond uopenai's program: errors and timeouts
    for name, prompt, stream, timeout in (
        ("status", "x [mock status=429]", False, 30000),
        ("status_stream", "x [mock status=503]", True, 30000),
        ("hang", "x [mock hang=1]", True, 700),
        ("slow_headers", "x [mock first_byte_delay_ms=5000]", False, 700),
        ("error_event", "x [mock tokens=20 error_event_at=3]", True, 30000),
        ("cut", "x [mock tokens=20 cut_after=3]", True, 1500),
    ):
        got = {"pieces": 0}
        try:
            s = await create(MODEL, user(prompt), stream=stream, timeout_ms=timeout)
            if stream:
                async for _ in s:
                    got["pieces"] += 1
            got["ok"] = True
        except LLMError as e:
            got.update(err(e))
        rec(name, got)

    bad = OpenAI("sk-wrong", BASE, ca=CA)
    try:
        await bad.chat.completions.create(MODEL, user("x"))
        rec("bad_key", {"ok": True})
    except LLMError as e:
        rec("bad_key", err(e))


asyncio.run(main())
