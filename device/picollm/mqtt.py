# MQTT transport: protocol v1 of the llm bridge over umqtt.simple.
#
# Requests go to P/D/req at QoS 1, replies come on P/D/res/R as JSON
# messages {"seq":n,...}; see docs/protocol.md. The client is polled with
# check_msg() between asyncio.sleep_ms() calls, so other tasks keep running.
# At most the messages of one poll are held at a time: one chunk.

import json
import time

import asyncio
from umqtt.simple import MQTTClient

from picollm import LLMError, LLMTimeout, Reply, error_from, new_id, tls_context
from picollm.topics import Topics


class MQTTTransport:
    def __init__(self, cfg):
        self.cfg = cfg
        self.broker = cfg["broker"]
        self.topics = Topics(cfg["prefix"], cfg["device_id"])
        self.client = None
        self.want = None  # the res topic (bytes) of the reply being read
        self.box = []  # its messages not yet read, in arrival order
        self.active = None
        self.last_out = 0
        self.connects = 0
        self.tools = None  # picollm.tools.ToolBox of a device that offers tools
        self.tap = None  # f(topic, msg) for the other messages (picollm.voice, picollm.image)
        self.subs = []  # more topic filters to subscribe to (voice, pictures)
        self.heard = 0  # ticks_ms of the last message for `tap`

    # -- connection ---------------------------------------------------------

    def _on_msg(self, topic, msg):
        if topic == self.want:
            self.box.append(msg)
        elif self.tools is not None:
            self.tools.on_message(topic, msg)
        elif self.tap is not None:
            self.heard = time.ticks_ms()
            self.tap(topic, msg)

    def connect(self):
        b = self.broker
        kw = {}
        if b["tls"]:
            kw["ssl"] = tls_context(b["ca"], self.cfg["tls_verify"])
        port = b["port"] or (8883 if b["tls"] else 1883)
        # umqtt.simple sizes every field with len(): hand it bytes, never a
        # str, or a multi-byte character makes the packet longer than it says.
        c = MQTTClient(
            _utf8(b["client_id"] or self.cfg["device_id"]),
            b["host"],
            port,
            _utf8(b["user"]),
            _utf8(b["password"]),
            b["keepalive"],
            **kw
        )
        c.set_callback(self._on_msg)
        if self.tools is not None:
            self.tools.before_connect(self, c)
        try:
            c.connect(b["clean_session"])
            # Subscribe before the first request is published.
            c.subscribe(self.topics.res_filter(), 1)
            if self.tools is not None:
                self.tools.after_connect(self, c)
            for f in self.subs:
                c.subscribe(f, 1)
        except Exception:
            _close_sock(c)
            raise
        self.client = c
        self.connects += 1
        self.last_out = time.ticks_ms()

    def ensure(self):
        if self.client is None:
            self.connect()

    async def reconnect(self):
        # Reconnect after a dropped socket, retrying until the connect
        # timeout. With clean_session off the broker has kept the
        # subscription and queued the chunks published meanwhile.
        self.drop()
        limit = self.cfg["connect_timeout_ms"]
        start = time.ticks_ms()
        wait = 100
        while True:
            try:
                self.connect()
                return
            except OSError as e:
                err = e
            if time.ticks_diff(time.ticks_ms(), start) > limit:
                raise LLMError("unreachable", "broker: %s" % (err,))
            await asyncio.sleep_ms(wait)
            wait = min(wait * 2, 2000)

    def drop(self):
        if self.client is not None:
            _close_sock(self.client)
            self.client = None

    async def close(self):
        c = self.client
        self.client = None
        if c is not None:
            try:
                if self.tools is not None:
                    self.tools.before_close(self, c)
                c.disconnect()
            except OSError:
                _close_sock(c)

    def publish(self, topic, payload):
        # topic and payload: bytes (see connect())
        self.client.publish(topic, payload, False, 1)
        self.last_out = time.ticks_ms()

    async def publish_retry(self, topic, payload):
        try:
            self.ensure()
            self.publish(topic, payload)
        except OSError:
            await self.reconnect()
            self.publish(topic, payload)

    def poll(self):
        # Read at most one packet; ping when the keepalive is half spent.
        c = self.client
        c.check_msg()
        ka = self.broker["keepalive"]
        if ka and time.ticks_diff(time.ticks_ms(), self.last_out) > ka * 500:
            c.ping()
            self.last_out = time.ticks_ms()

    # -- requests -----------------------------------------------------------

    def open(self, messages, system, opts):
        rid = opts.pop("id", None) or new_id()
        req = {"id": rid}
        if len(messages) == 1:
            req["prompt"] = messages[0]["content"]
        else:
            req["messages"] = messages
        if system:
            req["system"] = system
        req["stream"] = True
        req.update(opts)
        return MQTTReply(self, rid, json.dumps(req).encode())

    def abort(self):
        # Synchronous cancel of the reply being read, for a
        # KeyboardInterrupt caught outside the event loop.
        r = self.active
        if r is not None:
            r.send_cancel()
            r.finish()
            r.done = True


class MQTTReply(Reply):
    def __init__(self, t, rid, payload):
        super().__init__(rid)
        self.t = t
        self.payload = payload
        self.topic = t.topics.res(rid)
        self.seq = 0
        self.started = False
        self.ended = False

    async def start(self):
        t = self.t
        if t.active is not None:
            t.active.finish()
        t.want = self.topic
        t.box = []
        t.active = self
        self.started = True
        await t.publish_retry(t.topics.req(), self.payload)
        self.payload = None

    def finish(self):
        self.ended = True
        t = self.t
        if t.active is self:
            t.active = None
            t.want = None
            t.box = []

    def send_cancel(self):
        t = self.t
        try:
            t.ensure()
            t.publish(t.topics.cancel(), json.dumps({"id": self.id}).encode())
        except OSError:
            t.drop()

    async def next_msg(self, timeout_ms):
        t = self.t
        start = time.ticks_ms()
        while True:
            box = t.box
            while box:
                m = json.loads(box.pop(0))
                seq = m.get("seq") if isinstance(m, dict) else None
                if not isinstance(seq, int):
                    self.finish()
                    raise LLMError("protocol", "message without seq")
                if seq < self.seq:
                    continue  # a second delivery
                if seq > self.seq and not _interrupted(m):
                    self.finish()
                    raise LLMError("protocol", "gap: seq %d after %d" % (seq, self.seq - 1))
                self.seq = seq + 1
                return m
            heard = getattr(t, "heard", 0)  # audio of this reply is arriving (voice.py)
            if heard and time.ticks_diff(heard, start) > 0:
                start = heard
            if time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
                raise LLMTimeout("timeout", "no reply for %d ms" % timeout_ms)
            try:
                t.poll()
            except OSError:
                await t.reconnect()
                continue
            if t.tools is not None and t.tools.queue:
                await t.tools.run(t)  # a call to this device, while it waits
            elif not t.box:
                await asyncio.sleep_ms(t.cfg["poll_ms"])

    async def next_piece(self):
        if self.ended:
            return None
        try:
            if not self.started:
                await self.start()
            while True:
                try:
                    m = await self.next_msg(self.t.cfg["reply_timeout_ms"])
                except LLMTimeout:
                    self.send_cancel()
                    self.finish()
                    raise
                if "delta" in m:
                    if m["delta"]:
                        return m["delta"]
                    continue
                if "refusal" in m:
                    self.refusal = True
                    return m["refusal"]
                if "tool_call" in m or "tool_result" in m:  # protocol v2 progress
                    if self.on_tool is not None:
                        self.on_tool(m)
                    continue
                if "transcript" in m and "done" not in m:  # a listen request's utterance
                    self.transcript = m["transcript"]
                    continue
                self.finish()
                if "error" in m:
                    e = m["error"] if isinstance(m["error"], dict) else {}
                    raise error_from(
                        e.get("code") or "error", e.get("message") or "", e.get("status")
                    )
                if m.get("done"):
                    self.finish_reason = m.get("finish_reason")
                    self.usage = m.get("usage")
                    self.model = m.get("model")
                    self.tool_rounds = m.get("tool_rounds") or 0
                    if m.get("refusal"):
                        self.refusal = True
                    text = m.get("text") or m.get("refusal")
                    return text if text else None
                raise LLMError("protocol", "unknown message")
        except (KeyboardInterrupt, asyncio.CancelledError):
            if not self.ended:
                self.send_cancel()
                self.finish()
            raise

    async def _cancel(self):
        # Send P/D/cancel and wait (a few seconds at most) for the bridge's
        # `cancelled` terminal, dropping the chunks still on their way.
        # True when the bridge confirmed.
        if self.ended or not self.started:
            self.finish()
            return False
        self.send_cancel()
        self.ended = True
        try:
            while True:
                m = await self.next_msg(min(5000, self.t.cfg["reply_timeout_ms"]))
                if "error" in m or "done" in m:
                    break
        except LLMError:
            self.finish()
            return False
        self.finish()
        return "error" in m and m["error"].get("code") == "cancelled"


def _interrupted(m):
    # The `interrupted` terminal a bridge sends after a crash: chunks it
    # held in memory are lost, so it may follow a gap (docs/protocol.md,
    # "Delivery"); the reply then ends with LLMError("interrupted").
    e = m.get("error")
    return isinstance(e, dict) and e.get("code") == "interrupted" and "delta" not in m \
        and "refusal" not in m


def _utf8(s):
    # None and "" stay None (no user name, no password)
    return s.encode() if s else None


def _close_sock(c):
    try:
        if c.sock:
            c.sock.close()
    except Exception:
        pass
