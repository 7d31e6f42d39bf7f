# picollm.tools: functions a device offers the LLM (protocol v2, "Tools").
#
#   chat = Chat("config.json")
#
#   @chat.tool("set_led", "Turn the LED on or off",
#              {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]})
#   def set_led(on):
#       led.value(1 if on else 0)
#       return {"on": on}
#
#   await chat.serve()          # a pure tool device: answer calls, forever
#   await chat.ask("Turn the LED on", use_tools=True)   # or ask, and let the model use them
#
# MQTT mode: on every connect the library publishes the card (retained) on
# P/D/tools and {"online":true,"session":S} (retained) on P/D/status, with
# {"online":false} as its last will; it runs the calls that come on P/D/call
# while a reply streams and while serve() idles, and answers on P/D/result.
# A call is run at most once (ids are remembered), never when it was sent to
# an earlier connection (its session is not S: it waited at the broker while
# the device was away), and never after its timeout_ms (counted from its
# arrival). Errors, an unknown tool and bad arguments are answered as errors.
# Direct mode: the same tools run in a loop on the device (max_tool_rounds).

import json
import time

import asyncio

from picollm import LLMError, Reply, new_id

RECENT = 16  # call ids remembered, so a redelivered call is not run twice
MAX_QUEUE = 8  # calls waiting to run; more are answered "busy"
DEFAULT_TIMEOUT_MS = 5000
MAX_ROUNDS = 4  # default max_tool_rounds in direct mode (the bridge's policy in MQTT mode)
SAID_CHARS = 256  # direct mode: what the model said before its calls, sent back with them


class ToolBox:
    def __init__(self):
        self.tools = {}  # name -> [fn, description, parameters, timeout_ms]
        self.order = []
        self.session = None
        self.recent = []
        self.queue = []  # [id, name, arguments, arrival ticks, timeout_ms, error]
        self.verdict = None  # the bridge's answer to the card: {"ok":..., "error":...}
        self.topics = None  # picollm.topics.Topics, once connected

    def add(self, name, description, parameters, fn, timeout_ms=None):
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        self.tools[name] = [fn, description or "", parameters, timeout_ms]
        if name not in self.order:
            self.order.append(name)

    def card(self):
        out = []
        for name in self.order:
            fn, desc, params, timeout = self.tools[name]
            d = {"name": name, "description": desc, "parameters": params}
            if timeout:
                d["timeout_ms"] = timeout
            out.append(d)
        return json.dumps({"tools": out}).encode()

    def definitions(self):
        out = []
        for name in self.order:
            fn, desc, params, timeout = self.tools[name]
            out.append({"type": "function",
                        "function": {"name": name, "description": desc, "parameters": params}})
        return out

    async def execute(self, name, arguments):
        # (True, result) or (False, error text): an exception is an answer too.
        entry = self.tools.get(name)
        if entry is None:
            return False, "no tool " + str(name)
        if not isinstance(arguments, dict):
            return False, "arguments must be an object"
        try:
            value = entry[0](**arguments)
            if _awaitable(value):
                value = await value
            return True, value
        except Exception as e:
            return False, "%s: %s" % (type(e).__name__, e)

    # -- MQTT ---------------------------------------------------------------

    def before_connect(self, t, client):
        # A new session for every connection: calls sent to an earlier one are stale.
        self.topics = t.topics
        self.session = new_id()
        client.set_last_will(t.topics.presence(), b'{"online":false}', True, 1)

    def after_connect(self, t, client):
        tp = t.topics
        client.subscribe(tp.call(), 1)
        client.subscribe(tp.tools_ack(), 1)
        client.publish(tp.tools(), self.card(), True, 1)
        status = json.dumps({"online": True, "session": self.session}).encode()
        client.publish(tp.presence(), status, True, 1)

    def before_close(self, t, client):
        client.publish(t.topics.presence(), b'{"online":false}', True, 1)

    def on_message(self, topic, msg):
        # Called inside umqtt's check_msg: only take note; the calls run in run().
        tp = self.topics
        if tp is None:
            return
        if topic == tp.tools_ack():
            try:
                self.verdict = json.loads(msg) if msg else None
            except ValueError:
                self.verdict = None
            return
        if topic != tp.call():
            return
        try:
            call = json.loads(msg)
            cid = call["id"]
            name = call["name"]
        except (ValueError, KeyError, TypeError):
            return  # nothing to answer to
        if not isinstance(cid, str) or cid in self.recent:
            return  # a second delivery: it ran (or was refused) the first time
        self.recent.append(cid)
        if len(self.recent) > RECENT:
            self.recent.pop(0)
        timeout = call.get("timeout_ms")
        if not isinstance(timeout, int):
            timeout = DEFAULT_TIMEOUT_MS
        error = None
        if call.get("session") != self.session:
            error = "stale call: it was sent before this connection; not run"
        elif sum(1 for q in self.queue if q[5] is None) >= MAX_QUEUE:
            error = "busy: too many calls waiting"
        if error is not None and len(self.queue) >= 2 * MAX_QUEUE:
            return  # the bridge's timeout answers for it
        self.queue.append([cid, name, call.get("arguments"), time.ticks_ms(), timeout, error])

    async def run(self, t):
        # Run (or refuse) the calls that arrived; answer each on P/D/result.
        while self.queue:
            cid, name, args, arrived, timeout, error = self.queue.pop(0)
            if error is None and time.ticks_diff(time.ticks_ms(), arrived) > timeout:
                error = "expired: not run within its %d ms" % timeout
            if error is None:
                ok, value = await self.execute(name, args)
                if not ok:
                    error = value
            if error is None:
                try:
                    body = json.dumps({"id": cid, "result": value})
                except (TypeError, ValueError):
                    body = json.dumps({"id": cid, "error": "the result is not JSON"})
            else:
                body = json.dumps({"id": cid, "error": str(error)[:200]})
            value = None
            await t.publish_retry(t.topics.result(), body.encode())


def _awaitable(v):
    # An async def's result: a generator on MicroPython, a coroutine on CPython.
    return hasattr(v, "send") and hasattr(v, "throw")


async def serve(chat, ms=None):
    # Answer tool calls while nothing else runs: forever, or for `ms` ms.
    t = chat.transport
    if chat.config["mode"] != "mqtt":
        raise LLMError("mode", "serve() needs mode 'mqtt'")
    start = time.ticks_ms()
    while ms is None or time.ticks_diff(time.ticks_ms(), start) < ms:
        try:
            t.ensure()
            t.poll()
            tb = t.tools
            if tb is not None and tb.queue:
                await tb.run(t)
            else:
                await asyncio.sleep_ms(chat.config["poll_ms"])
        except (OSError, LLMError):
            # The broker is away: a tool device keeps trying, whatever the time.
            try:
                await t.reconnect()
            except LLMError:
                await asyncio.sleep_ms(1000)


# -- direct mode: the loop on the device -------------------------------------


def merge_fragments(calls, frags):
    # Join the streamed fragments of tool calls by index, as the OpenAI API sends them.
    if calls is None:
        calls = []
    for f in frags:
        i = f.get("index", len(calls))
        while len(calls) <= i:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        c = calls[i]
        if f.get("id"):
            c["id"] = f["id"]
        fn = f.get("function") or {}
        if fn.get("name"):
            c["function"]["name"] = fn["name"]
        if fn.get("arguments"):
            c["function"]["arguments"] += fn["arguments"]
    return calls


def _add_usage(total, usage):
    if not usage:
        return total
    if total is None:
        return dict(usage)
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if isinstance(usage.get(k), int):
            total[k] = total.get(k, 0) + usage[k]
    return total


class DirectToolReply(Reply):
    # A direct-mode reply that runs the device's own tools and asks again,
    # up to max_tool_rounds, as the bridge does in MQTT mode.
    def __init__(self, t, messages, opts):
        super().__init__()
        self.t = t
        self.messages = messages
        self.opts = opts
        self.inner = None
        self.rounds = 0
        self.said = ""  # what the model says in this round, up to SAID_CHARS, for the history

    async def next_piece(self):
        tb = self.t.tools
        while True:
            if self.inner is None:
                opts = dict(self.opts)
                opts["tools"] = tb.definitions()
                self.inner = self.t.open(self.messages, None, opts)  # a DirectReply
            inner = self.inner
            piece = await inner.next_piece()
            if piece is not None:
                if len(self.said) < SAID_CHARS:
                    self.said += piece[:SAID_CHARS - len(self.said)]
                return piece
            self.id, self.model = inner.id, inner.model
            self.finish_reason, self.refusal = inner.finish_reason, inner.refusal
            self.usage = _add_usage(self.usage, inner.usage)
            calls = inner.s.tool_calls if inner.s is not None else None
            if not calls:
                return None
            limit = self.t.cfg.get("max_tool_rounds", MAX_ROUNDS)
            if self.rounds >= limit:
                raise LLMError("too_many_tool_rounds",
                               "the model still called tools after %d rounds" % limit)
            self.rounds += 1
            self.tool_rounds = self.rounds
            said, self.said = self.said or None, ""
            self.messages.append({"role": "assistant", "content": said, "tool_calls": calls})
            for c in calls:
                fn = c["function"]
                self._progress({"tool_call": {"id": c["id"], "name": fn["name"],
                                              "device": self.t.cfg["device_id"]}})
                try:
                    args = json.loads(fn["arguments"] or "{}")
                    ok, value = await tb.execute(fn["name"], args)
                except ValueError:
                    ok, value = False, "arguments are not valid JSON"
                content = json.dumps(value if ok else {"error": str(value)})
                self.messages.append({"role": "tool", "tool_call_id": c["id"], "content": content})
                self._progress({"tool_result": {"id": c["id"], "ok": ok}})
            self.inner = None

    def _progress(self, m):
        if self.on_tool is not None:
            self.on_tool(m)

    async def _cancel(self):
        if self.inner is None:
            return False
        return await self.inner._cancel()
