# Pictures over the bridge (docs/protocol.md "Pictures", protocol v2), and
# image generation straight from the API (direct mode).
#
#   from picollm import image
#   reply = await image.ask_about(chat, "What is at the door?", "snap.jpg")
#   async for piece in reply: print(piece, end="")
#
#   buf = bytearray(128 * 64 // 8)
#   fb = framebuf.FrameBuffer(buf, 128, 64, framebuf.MONO_HLSB)
#   info = await image.generate(chat, "a cat", 128, 64, "mono1", buf)
#
# Pictures travel as binary pieces: an 8-byte header (seq u32, kind u8,
# format u8, 0 u16; little-endian, the voice frames' header) and raw bytes,
# then an END piece. Neither direction ever holds a whole picture: an upload
# is read from a file (or a camera's buffer) one piece at a time, and a
# received piece is copied into the sink (a buffer, a file, a function) as
# it arrives.

import json
import struct

import asyncio

from picollm import LLMError, LLMTimeout, error_from, new_id

HEADER = 8
DATA = 0
END = 1
ERROR = 2
CODES = {"rgb565": 1, "rgb565_be": 2, "mono1": 3, "mono1_vlsb": 4, "gray4": 5,
         "jpeg": 6, "png": 7}
PIECE = 1024  # bytes of picture per message


def frame_bytes(width, height, fmt):
    # The size of a raw picture, to allocate a FrameBuffer's buffer.
    if fmt in ("rgb565", "rgb565_be"):
        return width * height * 2
    if fmt == "mono1":
        return (width + 7) // 8 * height
    if fmt == "mono1_vlsb":
        return width * ((height + 7) // 8)
    if fmt == "gray4":
        return (width + 1) // 2 * height
    raise ValueError("jpeg and png have no fixed size")


def _transport(chat):
    t = chat.transport if hasattr(chat, "transport") else chat
    if not hasattr(t, "base"):
        raise LLMError("mode", "pictures through the bridge need mode 'mqtt'")
    return t


# -- pictures in: uploads ----------------------------------------------------


async def upload(chat, rid, source, fmt="jpeg", piece=PIECE):
    # Send `source` (a path, a file-like object with readinto(), or a
    # buffer such as a camera's frame) as pieces on P/D/upload/<rid>.
    # Returns the number of bytes sent. Holds one piece at a time.
    if fmt not in CODES:
        raise ValueError("fmt must be one of " + ", ".join(CODES))
    t = _transport(chat)
    topic = t.base + "upload/" + rid
    code = CODES[fmt]
    buf = bytearray(HEADER + piece)
    mv = memoryview(buf)
    f = open(source, "rb") if isinstance(source, str) else source
    src = None if hasattr(f, "readinto") else memoryview(f)
    seq = 0
    sent = 0
    try:
        while True:
            if src is None:
                n = f.readinto(mv[HEADER:])
            else:
                n = min(piece, len(src) - sent)
                mv[HEADER:HEADER + n] = src[sent:sent + n]
            if not n:
                break
            struct.pack_into("<IBBH", buf, 0, seq, DATA, code, 0)
            await t.publish_retry(topic, mv[:HEADER + n])
            seq += 1
            sent += n
            await asyncio.sleep_ms(0)
        struct.pack_into("<IBBH", buf, 0, seq, END, code, 0)
        await t.publish_retry(topic, mv[:HEADER])
    finally:
        if isinstance(source, str):
            f.close()
    return sent


async def ask_about(chat, prompt, source, fmt="jpeg", width=None, height=None,
                    piece=PIECE, **options):
    # Upload a picture, then ask about it: returns the streamed Reply, as
    # chat.stream() does. A raw frame (fmt "rgb565", ...) needs its size.
    rid = new_id()
    await upload(chat, rid, source, fmt, piece)
    spec = {"upload": True}
    if fmt != "jpeg" and fmt != "png":
        spec["format"] = fmt
        spec["width"] = width
        spec["height"] = height
    return chat.stream(prompt, id=rid, images=[spec], **options)


# -- pictures out: generated for the screen ------------------------------------


class _Receiver:
    # Takes the pieces of P/D/image/<rid> in the MQTT callback and copies
    # each into the sink at once.
    def __init__(self, topic, sink):
        self.topic = topic
        self.sink = sink
        self.seq = 0
        self.got = 0
        self.ended = False
        self.error = None
        self.fmt = None

    def on_msg(self, topic, msg):
        if topic != self.topic or self.ended or self.error is not None:
            return
        if len(msg) < HEADER:
            self.error = LLMError("protocol", "a piece without header")
            return
        seq, kind, code, _ = struct.unpack_from("<IBBH", msg, 0)
        if seq < self.seq:
            return  # a second delivery
        if seq > self.seq:
            self.error = LLMError("protocol", "gap: piece %d after %d" % (seq, self.seq - 1))
            return
        self.seq += 1
        self.fmt = code
        if kind == END:
            self.ended = True
        elif kind == ERROR:
            self.error = LLMError("image", bytes(msg[HEADER:]).decode())
        else:
            try:
                self._put(memoryview(msg)[HEADER:])
            except Exception as e:
                self.error = LLMError("sink", str(e))

    def _put(self, data):
        s = self.sink
        if hasattr(s, "write"):
            s.write(data)
        elif callable(s):
            s(self.got, data)
        else:
            end = self.got + len(data)
            if end > len(s):
                raise ValueError("the picture is larger than the buffer (%d bytes)" % len(s))
            s[self.got:end] = data
        self.got += len(data)


async def generate(chat, prompt, width, height, fmt, sink, piece=PIECE, model=None,
                   timeout_ms=None):
    # Ask the bridge for a picture of `prompt` for a width x height screen in
    # `fmt`; its bytes go into `sink` as they come: a bytearray (a
    # FrameBuffer's buffer), an object with write() (an open file), or a
    # function f(offset, data). Returns the terminal's "image" dict (width,
    # height, format, bytes). Raises LLMError as chat does.
    if fmt not in CODES:
        raise ValueError("fmt must be one of " + ", ".join(CODES))
    t = _transport(chat)
    from picollm.mqtt import MQTTReply

    rid = new_id()
    rx = _Receiver((t.base + "image/" + rid).encode(), sink)
    want = t.base + "image/+"
    if want not in t.extra:
        t.extra.append(want)
        if t.client is not None:
            t.client.subscribe(want.encode(), 1)
    cb = rx.on_msg
    t.side = cb
    spec = {"prompt": prompt, "width": width, "height": height, "format": fmt,
            "piece_bytes": piece}
    if model:
        spec["model"] = model
    reply = MQTTReply(t, rid, json.dumps({"id": rid, "image": spec}))
    timeout = timeout_ms or t.cfg["reply_timeout_ms"]
    try:
        await reply.start()
        while True:
            m = await reply.next_msg(timeout)
            if "error" in m:
                e = m["error"] if isinstance(m["error"], dict) else {}
                raise error_from(e.get("code") or "error", e.get("message") or "",
                                 e.get("status"))
            if m.get("done"):
                break
        info = m.get("image") or {}
        # The pieces travel on their own topic: the last may come just after.
        start = _ticks()
        while not rx.ended and rx.error is None:
            if _elapsed(start) > 5000:
                raise LLMTimeout("timeout", "the picture's end never came")
            t.poll()
            await asyncio.sleep_ms(t.cfg["poll_ms"])
        if rx.error is not None:
            raise rx.error
        if info.get("bytes") != rx.got:
            raise LLMError("protocol", "got %d bytes, the bridge sent %s" % (
                rx.got, info.get("bytes")))
        return info
    except (KeyboardInterrupt, asyncio.CancelledError):
        reply.send_cancel()
        raise
    finally:
        reply.finish()
        if t.side is cb:
            t.side = None


def _ticks():
    import time

    return time.ticks_ms()


def _elapsed(start):
    import time

    return time.ticks_diff(time.ticks_ms(), start)
