# Voice for picollm over MQTT (protocol v2, docs/protocol.md "Voice"):
# the reply spoken through an I2S amplifier, and a question asked through an
# I2S microphone.
#
#   from machine import I2S, Pin
#   from picollm.voice import Speaker
#   out = I2S(0, sck=Pin(16), ws=Pin(17), sd=Pin(18), mode=I2S.TX, bits=16,
#             format=I2S.MONO, rate=16000, ibuf=8192)
#   chat.speaker = Speaker(out, buffer=8192)    # or Speaker(writer_function)
#   async for piece in chat.stream("Hi", speak=True): print(piece, end="")
#   text = await chat.say("Tell me a joke")      # returns when it has played
#   mic = I2S(1, sck=..., ws=..., sd=..., mode=I2S.RX, bits=16,
#             format=I2S.MONO, rate=16000, ibuf=8192)
#   heard, answer = await chat.listen(mic, until=lambda: button.value())
#
# Audio arrives as binary frames: an 8-byte header (seq u32, kind u8,
# format u8, rate u16, little-endian) and raw bytes. The heap holds the
# ring buffer the user sized and one MQTT message, whatever the length.

import json
import struct
import time

import asyncio

from picollm import LLMError, new_id

DATA = 0
END = 1
ERROR = 2
PCM16 = 1
WAV = 2
MP3 = 3
FORMATS = {"pcm16": PCM16, "wav": WAV, "mp3": MP3}
HEADER = 8


def pack_header(buf, seq, kind, fmt, rate):
    struct.pack_into("<IBBH", buf, 0, seq, kind, fmt, rate)


def unpack_header(msg):
    if len(msg) < HEADER:
        raise LLMError("protocol", "audio frame shorter than its header")
    return struct.unpack_from("<IBBH", msg, 0)


class Ring:
    # A byte ring buffer of a fixed size: no allocation after it is made.
    def __init__(self, size):
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.size = size
        self.head = 0  # next byte to read
        self.count = 0

    def room(self):
        return self.size - self.count

    def put(self, data):
        n = len(data)
        if n > self.room():
            return False
        tail = (self.head + self.count) % self.size
        first = min(n, self.size - tail)
        self.mv[tail : tail + first] = data[:first]
        if first < n:
            self.mv[0 : n - first] = data[first:]
        self.count += n
        return True

    def peek(self, limit):
        # A view of at most `limit` contiguous bytes at the head.
        n = min(self.count, limit, self.size - self.head)
        return self.mv[self.head : self.head + n]

    def drop(self, n):
        self.head = (self.head + n) % self.size
        self.count -= n


class Speaker:
    # Plays the audio frames of a reply. `out` is an I2S object (its write()
    # blocks while its DMA buffer is full, which paces playing) or a
    # function called with each memoryview of bytes. `buffer`: the ring's
    # size in bytes; it must hold the bridge's audio_lead_ms plus one frame
    # (16 kHz PCM: 500 ms = 16000 bytes + 3 KB).
    def __init__(self, out, buffer=20480, piece=512):
        self.out = out
        self.ring = Ring(buffer)
        self.piece = piece
        self.log = None  # a function (ticks_ms, seq, nbytes) per data frame, for measuring
        self._task = None
        self.reset(None)

    def reset(self, rid):
        self.rid = rid
        self.topic_tail = None if rid is None else b"/audio/" + rid.encode()
        self.seq = 0
        self.ended = rid is None
        self.error = None
        self.summary = None
        self.format = None
        self.rate = 0
        self.bytes = 0
        self.frames = 0
        self.overruns = 0

    def attach(self, transport, rid):
        # Take the frames of request `rid` from the transport's messages;
        # subscribe to P/D/audio/+ the first time.
        self.reset(rid)
        t = transport
        t.tap = self.on_message
        sub = t.topics.audio_filter()
        if sub not in t.subs:
            t.subs.append(sub)
            if t.client is not None:
                t.client.subscribe(sub, 1)
        if self._task is None:
            self._task = asyncio.create_task(self._play())

    def on_message(self, topic, msg):
        # Called by the MQTT transport for a message not of the text reply.
        if self.ended or not topic.endswith(self.topic_tail):
            return
        seq, kind, fmt, rate = unpack_header(msg)
        if seq < self.seq:
            return  # a second delivery
        if seq > self.seq:
            self.ended = True
            self.error = {"code": "protocol", "message": "audio gap: %d after %d" % (seq, self.seq - 1)}
            return
        self.seq = seq + 1
        if kind == DATA:
            self.format = fmt
            self.rate = rate
            n = len(msg) - HEADER
            if self.log is not None:
                self.log(time.ticks_ms(), seq, n)
            if not self.ring.put(memoryview(msg)[HEADER:]):
                self.overruns += 1
            self.bytes += n
            self.frames += 1
            return
        self.ended = True
        try:
            body = json.loads(bytes(memoryview(msg)[HEADER:]))
        except ValueError:
            body = {}
        if kind == ERROR:
            self.error = body
        else:
            self.summary = body

    def playing(self):
        return self.ring.count > 0

    async def _play(self):
        out = self.out
        write = getattr(out, "write", None) or out
        while True:
            if not self.ring.count:
                await asyncio.sleep_ms(5)
                continue
            mv = self.ring.peek(self.piece)
            n = write(mv)
            if n is None:
                n = len(mv)
            self.ring.drop(n)
            await asyncio.sleep_ms(0)

    async def drain(self, timeout_ms=60000):
        # Wait until everything received has been handed to the output.
        start = time.ticks_ms()
        while self.ring.count and time.ticks_diff(time.ticks_ms(), start) < timeout_ms:
            await asyncio.sleep_ms(10)

    def stop(self):
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _level(mv, step=8):
    # Mean absolute amplitude of 16-bit samples, every `step`th one: cheap
    # enough for a silence test on a Pico.
    total = 0
    count = 0
    for i in range(0, len(mv) - 1, 2 * step):
        v = mv[i] | (mv[i + 1] << 8)
        if v & 0x8000:
            v = 0x10000 - v
        total += v
        count += 1
    return total // count if count else 0


async def send_utterance(transport, rid, mic, rate, until=None, silence_ms=0,
                         max_ms=10000, level=300, chunk=2048):
    # Stream what `mic` records (an I2S in RX mode, or any object with
    # readinto) on P/D/listen/R until `until()` is true, `silence_ms` of quiet
    # after speech, `max_ms`, or the end of the input; then the end frame.
    # One buffer of `chunk` bytes is reused for every frame.
    t = transport
    topic = t.topics.listen(rid)
    buf = bytearray(HEADER + chunk)
    mv = memoryview(buf)
    body = mv[HEADER:]
    seq = 0
    sent = 0
    heard = False
    quiet = 0
    start = time.ticks_ms()
    while True:
        if until is not None and until():
            break
        if time.ticks_diff(time.ticks_ms(), start) >= max_ms:
            break
        n = mic.readinto(body)
        if not n:
            break
        n -= n % 2
        pack_header(buf, seq, DATA, PCM16, rate)
        t.client.publish(topic, mv[: HEADER + n], False, 1)
        t.last_out = time.ticks_ms()
        seq += 1
        sent += n
        if silence_ms:
            if _level(body[:n]) >= level:
                heard = True
                quiet = 0
            elif heard:
                quiet += n * 500 // rate
                if quiet >= silence_ms:
                    break
        await asyncio.sleep_ms(0)
    pack_header(buf, seq, END, PCM16, rate)
    t.client.publish(topic, mv[:HEADER], False, 1)
    t.last_out = time.ticks_ms()
    return sent


async def speak(chat, prompt, **options):
    # The reply to `prompt`, spoken through chat.speaker; returns its text
    # once the audio has been played.
    reply = chat.stream(prompt, speak=options.pop("speak", True), **options)
    parts = []
    async for piece in reply:
        parts.append(piece)
    sp = chat.speaker
    if sp is not None:
        await _wait_audio_end(chat, sp)
        await sp.drain()
    return "".join(parts)


async def _wait_audio_end(chat, sp, timeout_ms=5000):
    # Read on until the audio's end (or error) frame; a speech failure stays
    # in sp.error: the text is still the answer.
    t = chat.transport
    start = time.ticks_ms()
    while not sp.ended and time.ticks_diff(time.ticks_ms(), start) < timeout_ms:
        try:
            t.poll()
        except OSError:
            break
        await asyncio.sleep_ms(t.cfg["poll_ms"])


async def listen(chat, mic, rate=16000, until=None, silence_ms=0, max_ms=10000,
                 transcript_only=False, speak=None, level=300, chunk=2048, **options):
    # Ask by voice: stream the microphone to the bridge, which transcribes
    # it and asks with the transcript. Returns (transcript, answer); the
    # answer is None with transcript_only. With speak (and chat.speaker) the
    # answer is spoken too.
    from picollm.mqtt import MQTTReply

    t = chat.transport
    if not hasattr(t, "client"):
        raise LLMError("unsupported", "listen needs the MQTT mode")
    rid = new_id()
    req = {"id": rid, "listen": {"rate": rate}, "stream": True}
    if transcript_only:
        req["listen"]["transcript_only"] = True
    if chat.history:
        req["messages"] = list(chat.history)
    if chat.system:
        req["system"] = chat.system
    if chat.config["max_tokens"]:
        req["max_tokens"] = chat.config["max_tokens"]
    if chat.config["model"]:
        req["model"] = chat.config["model"]
    if speak:
        req["speak"] = speak
    req.update(options)
    reply = MQTTReply(t, rid, json.dumps(req).encode())
    chat.last = reply
    sp = chat.speaker if speak else None
    if sp is not None:
        sp.attach(t, rid)
    await reply.start()
    await send_utterance(t, rid, mic, rate, until, silence_ms, max_ms, level, chunk)
    parts = []
    while True:
        piece = await reply.next_piece()
        if piece is None:
            break
        parts.append(piece)
    heard = getattr(reply, "transcript", None)
    if transcript_only:
        return heard, None
    answer = "".join(parts)
    if heard:
        chat._remember(heard, answer)
    if sp is not None:
        await _wait_audio_end(chat, sp)
        await sp.drain()
    return heard, answer
