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
    if not hasattr(t, "topics"):
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
    topic = t.topics.upload(rid)
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
    rx = _Receiver(t.topics.image(rid), sink)
    want = t.topics.image_filter()
    if want not in t.subs:
        t.subs.append(want)
        if t.client is not None:
            t.client.subscribe(want, 1)
    cb = rx.on_msg
    t.tap = cb
    spec = {"prompt": prompt, "width": width, "height": height, "format": fmt,
            "piece_bytes": piece}
    if model:
        spec["model"] = model
    reply = MQTTReply(t, rid, json.dumps({"id": rid, "image": spec}).encode())
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
            try:
                t.poll()
            except OSError:
                await t.reconnect()  # a persistent session: the rest is delivered after
                continue
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
        if t.tap is cb:
            t.tap = None


def _ticks():
    import time

    return time.ticks_ms()


def _elapsed(start):
    import time

    return time.ticks_diff(time.ticks_ms(), start)


# -- direct mode: client.images.generate() -------------------------------------

_FORMATS = ("b64_json", "url")


class ImagesResponse:
    # What generate() wrote: created, bytes (decoded picture bytes written),
    # url (when response_format was "url"), revised_prompt (if the API sent
    # one before the picture).
    def __init__(self):
        self.created = None
        self.bytes = 0
        self.url = None
        self.revised_prompt = None

    def __repr__(self):
        return "<ImagesResponse %d bytes>" % self.bytes


class Images:
    # client.images.generate(...); also as uopenai names its TODO,
    # client.images.generations.create(...).
    def __init__(self, client):
        self._client = client

    @property
    def generations(self):
        return self

    def create(self, model, prompt, out, **kwargs):
        return self.generate(model, prompt, out, **kwargs)

    async def generate(self, model, prompt, out, size="1024x1024",
                       response_format="b64_json", timeout_ms=120000, **kwargs):
        # Ask /images/generations for one picture and write its decoded
        # bytes to `out` (a path, or an object with write()) as they arrive:
        # the base64 text is decoded a socket read at a time, a URL is
        # fetched and its body copied; nothing holds the whole picture.
        if not isinstance(model, str):
            raise TypeError("model must be a str")
        if not model:
            raise ValueError("model must not be empty")
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a str")
        if not prompt:
            raise ValueError("prompt must not be empty")
        if not isinstance(size, str):
            raise TypeError("size must be a str")
        if size != "auto":
            w, x, h = size.partition("x")
            if not x or not w.isdigit() or not h.isdigit():
                raise ValueError("size must be 'WIDTHxHEIGHT' or 'auto'")
        if response_format not in _FORMATS:
            raise ValueError("response_format must be 'b64_json' or 'url'")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
            raise TypeError("timeout_ms must be an int")
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        if not isinstance(out, str) and not hasattr(out, "write"):
            raise TypeError("out must be a path or have write()")
        body = {"model": model, "prompt": prompt, "size": size, "n": 1}
        if response_format == "url":
            body["response_format"] = "url"
        body.update(kwargs)
        data = json.dumps(body).encode()
        body = None
        f = open(out, "wb") if isinstance(out, str) else out
        try:
            return await self._generate(data, f, response_format, timeout_ms)
        finally:
            if isinstance(out, str):
                f.close()

    async def _generate(self, data, f, response_format, timeout_ms):
        from picollm.http import Conn, status_error

        c = self._client
        ctx = c._ssl() if c._https else None
        conn = Conn(timeout_ms)
        res = ImagesResponse()
        try:
            await conn.open(c._host, c._port, ctx, c._sni)
            head = (
                "POST %s/images/generations HTTP/1.1\r\nHost: %s\r\n"
                "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nAccept: application/json\r\nConnection: close\r\n"
                "User-Agent: picollm\r\n\r\n"
            ) % (c._path, c._hosthdr, c._key, len(data))
            await conn.send(head.encode(), data)
            head = data = None
            await conn.read_head()
            if conn.status != 200:
                raise status_error(conn.status, await conn.read_all())
            if response_format == "b64_json":
                res.bytes = await _b64_value(conn, f)
            else:
                try:
                    d = json.loads(await conn.read_all())
                    res.url = d["data"][0]["url"]
                    res.created = d.get("created")
                except (ValueError, KeyError, IndexError, TypeError):
                    raise LLMError("upstream_protocol", "no url in the answer")
                conn.close()
                res.bytes = await _fetch(c, res.url, f, timeout_ms)
            return res
        finally:
            conn.close()


async def _b64_value(conn, f):
    # Find "b64_json":"..." in the body as it comes and decode the value
    # in blocks of 4 characters; returns the bytes written.
    from binascii import a2b_base64

    key = b'"b64_json"'
    buf = b""
    carry = b""
    state = 0  # 0: looking for the key, 1: for the opening quote, 2: in the value
    n = 0
    while True:
        part = await conn._part()
        if not part:
            raise LLMError("upstream_protocol", "the picture was cut short")
        buf = buf + part if buf else part
        part = None
        if state == 0:
            i = buf.find(key)
            if i < 0:
                buf = buf[-len(key):]
                continue
            buf = buf[i + len(key):]
            state = 1
        if state == 1:
            i = buf.find(b'"')
            if i < 0:
                buf = b""
                continue
            buf = buf[i + 1:]
            state = 2
        j = buf.find(b'"')
        chunk = buf if j < 0 else buf[:j]
        buf = b""
        if b"\\" in chunk:
            chunk = chunk.replace(b"\\", b"")  # "\/" from some JSON encoders
        chunk = carry + chunk if carry else chunk
        k = len(chunk) & ~3
        if k:
            raw = a2b_base64(chunk[:k])
            f.write(raw)
            n += len(raw)
            raw = None
        carry = chunk[k:]
        chunk = None
        if j >= 0:
            if carry.strip(b"="):
                raise LLMError("upstream_protocol", "the picture's base64 is cut")
            conn.close()
            return n


async def _fetch(client, url, f, timeout_ms):
    # GET a picture's URL (another host, often) and copy its body to f. The
    # API key is not sent there.
    from picollm.http import Conn

    if url.startswith("https://"):
        https, rest = True, url[8:]
    elif url.startswith("http://"):
        https, rest = False, url[7:]
    else:
        raise LLMError("upstream_protocol", "the picture's url is not http(s)")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    port = int(port) if port else (443 if https else 80)
    ctx = client._ssl() if https else None
    conn = Conn(timeout_ms)
    n = 0
    try:
        await conn.open(host, port, ctx, host)
        head = ("GET /%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n"
                "User-Agent: picollm\r\n\r\n") % (path, hostport)
        await conn.send(head.encode(), b"")
        await conn.read_head()
        if conn.status != 200:
            raise LLMError("upstream_status", "fetching the picture: HTTP %d" % conn.status,
                           conn.status)
        while True:
            part = await conn._part()
            if not part:
                return n
            f.write(part)
            n += len(part)
    finally:
        conn.close()
