# picollm: ask an LLM from MicroPython, through the MQTT bridge (mode
# "mqtt", protocol v1, umqtt.simple) or straight to an OpenAI-compatible API
# over HTTPS (mode "direct"). One facade, Chat, for both: a program switches
# mode by configuration only.
#
#   chat = Chat(load_config("config.json"))
#   async for piece in chat.stream("Why is the sky blue?"):
#       print(piece, end="")
#   text = await chat.ask("And at sunset?")
#
# MicroPython 1.23+ and CPython 3 syntax only: no f-strings, no typing.

VERSION = "0.1.0"


class LLMError(Exception):
    # code: the protocol's error code ("upstream_status", "cancelled", ...)
    # or one of the device's own: "timeout", "protocol", "tls",
    # "unreachable", "http".
    def __init__(self, code, message="", status=None):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self):
        if self.message:
            return self.code + ": " + self.message
        return self.code


class LLMTimeout(LLMError):
    pass


class Cancelled(LLMError):
    pass


def error_from(code, message="", status=None):
    if code == "timeout":
        return LLMTimeout(code, message, status)
    if code == "cancelled":
        return Cancelled(code, message, status)
    return LLMError(code, message, status)


DEFAULTS = {
    "mode": "mqtt",
    "device_id": "pico",
    "prefix": "llm",
    "model": None,
    "system": None,
    "max_tokens": None,
    "history": 4,
    "history_chars": 1200,
    "session": None,
    "reply_timeout_ms": 30000,
    "connect_timeout_ms": 10000,
    "poll_ms": 20,
    "base_url": "https://api.openai.com/v1",
    "api_key": None,
    "ca": None,
    "tls_verify": True,
    "server_hostname": None,
}

BROKER_DEFAULTS = {
    "host": "127.0.0.1",
    "port": 0,
    "tls": False,
    "ca": None,
    "user": None,
    "password": None,
    "client_id": None,
    "keepalive": 60,
    "clean_session": False,
}

_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


def valid_id(s):
    if not isinstance(s, str) or not 1 <= len(s) <= 64:
        return False
    for ch in s:
        if ch not in _ID_CHARS:
            return False
    return True


def load_config(source="config.json"):
    # source: a path to a JSON file or a dict. Returns a new dict with the
    # defaults filled in; raises ValueError on a bad value.
    if isinstance(source, str):
        import json

        with open(source) as f:
            source = json.load(f)
    if not isinstance(source, dict):
        raise TypeError("config must be a dict or a path")
    cfg = dict(DEFAULTS)
    cfg.update(source)
    broker = dict(BROKER_DEFAULTS)
    broker.update(source.get("broker") or {})
    cfg["broker"] = broker
    if cfg["mode"] not in ("mqtt", "direct"):
        raise ValueError("mode must be 'mqtt' or 'direct'")
    if not valid_id(cfg["device_id"]):
        raise ValueError("device_id: 1-64 of A-Z a-z 0-9 _ -")
    for key in ("history", "history_chars", "reply_timeout_ms", "poll_ms"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ValueError(key + " must be an integer >= 0")
    s = cfg["session"]
    if not (s is None or s is True or s is False or valid_id(s)):
        raise ValueError("session: true, false or an id (1-64 of A-Z a-z 0-9 _ -)")
    if cfg["mode"] == "direct":
        if not cfg["model"]:
            raise ValueError("model is required in direct mode")
        if not cfg["api_key"]:
            raise ValueError("api_key is required in direct mode")
    return cfg


def tls_context(ca=None, verify=True):
    # A client SSLContext that verifies the server against the CA bundle in
    # the file `ca` (PEM). verify=False is the explicit opt-out.
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not verify:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if not ca:
        raise ValueError("TLS needs a CA file ('ca') to verify the server, or tls_verify false")
    with open(ca, "rb") as f:
        data = f.read()
    # MicroPython's ssl takes DER: decode each PEM block (a DER file is
    # passed as it is).
    ders = []
    if data.startswith(b"-----") or b"-----BEGIN" in data:
        from binascii import a2b_base64

        parts = data.split(b"-----")
        for i in range(1, len(parts) - 2, 4):
            if parts[i] == b"BEGIN CERTIFICATE":
                ders.append(a2b_base64(parts[i + 1]))
        if not ders:
            raise ValueError("no certificate in " + ca)
    else:
        ders.append(data)
    data = None
    ctx.verify_mode = ssl.CERT_REQUIRED
    for der in ders:
        ctx.load_verify_locations(cadata=der)
    return ctx


def new_id():
    # A random request id: 16 hex digits, never a counter, so a reboot
    # cannot reuse one.
    try:
        from os import urandom

        raw = urandom(8)
    except (ImportError, AttributeError):
        import random

        raw = bytes([random.getrandbits(8) for _ in range(8)])
    from binascii import hexlify

    return hexlify(raw).decode()


class Reply:
    # The pieces of one reply, as an async iterator of str; each transport's
    # reply (and the direct client's Stream) is one of these with its own
    # next_piece() and _cancel(). After the end: finish_reason, usage, model,
    # id, refusal. Keeps at most `_keep` characters (for the history, or all
    # of them for ask()); Chat sets `_chat`, `_prompt` and `_keep`.
    _chat = None
    _prompt = None
    _keep = 0

    def __init__(self, rid=None):
        self.id = rid
        self.finish_reason = self.usage = self.model = None
        self.refusal = False
        self.done = False
        self._parts = []
        self._kept = 0
        self.tool_rounds = 0  # protocol v2: rounds of tool results the model was given
        self.on_tool = None  # called with each tool_call / tool_result progress message

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done:
            raise StopAsyncIteration
        try:
            piece = await self.next_piece()
        except BaseException:
            self.done = True
            raise
        if piece is None:
            self.done = True
            if self._chat is not None:
                self._chat._remember(self._prompt, self.text())
            raise StopAsyncIteration
        room = self._keep - self._kept
        if room > 0:
            part = piece if len(piece) <= room else piece[:room]
            self._parts.append(part)
            self._kept += len(part)
        return piece

    def text(self):
        # What was kept so far (all of it when asked for by ask()).
        return "".join(self._parts)

    async def cancel(self):
        # Stop the reply: the bridge (or the HTTP stream) is told at once.
        if self.done:
            return False
        self.done = True
        return await self._cancel()


class Chat:
    # A conversation with a system prompt. In MQTT mode the bridge keeps it
    # (a protocol v2 session: each request carries only the new question, so
    # the heap does not grow with the conversation); in direct mode, or with
    # "session": false, the Chat keeps at most `history` turns and
    # `history_chars` characters itself. "history": 0 asks without any
    # conversation. "session": an id continues that conversation (e.g. after
    # a reboot); None or true: a new random one per Chat.
    def __init__(self, config=None, transport=None):
        self.config = load_config(config if config is not None else "config.json")
        self.system = self.config["system"]
        self.history = []
        self.last = None
        self._transport = transport
        self._tools = None  # picollm.tools.ToolBox, once a tool is registered
        self.on_tool = None  # called with each tool_call / tool_result progress message
        self.session = None
        self._reset = False
        c = self.config
        if c["mode"] == "mqtt" and c["history"] > 0 and c["session"] is not False:
            s = c["session"]
            self.session = s if isinstance(s, str) else new_id()
        self.speaker = None  # a picollm.voice.Speaker: speak=True plays through it

    @property
    def transport(self):
        t = self._transport
        if t is None:
            if self.config["mode"] == "mqtt":
                from picollm.mqtt import MQTTTransport

                t = MQTTTransport(self.config)
            else:
                from picollm.direct import DirectTransport

                t = DirectTransport(self.config)
            t.tools = self._tools
            self._transport = t
        return t

    def tool(self, name, description="", parameters=None, timeout_ms=None, fn=None):
        # Register a tool the model may call (picollm/tools.py); a decorator
        # when fn is None. Register tools before the first connection.
        if self._tools is None:
            from picollm.tools import ToolBox

            self._tools = ToolBox()
            if self._transport is not None:
                self._transport.tools = self._tools

        def add(f):
            self._tools.add(name, description, parameters, f, timeout_ms)
            return f

        return add(fn) if fn is not None else add

    async def serve(self, ms=None):
        # A tool device's main loop: answer tool calls (forever, or for ms).
        from picollm.tools import serve

        await serve(self, ms)

    def _messages(self, prompt):
        msgs = list(self.history)
        msgs.append({"role": "user", "content": prompt})
        return msgs

    def _remember(self, prompt, answer):
        turns = self.config["history"]
        if self.session is not None:
            self._reset = False  # the bridge stored the turn (and forgot the old ones)
            return
        if turns <= 0:
            return
        limit = self.config["history_chars"]
        room = limit - len(prompt)
        if room <= 0:
            return
        h = self.history
        h.append({"role": "user", "content": prompt})
        h.append({"role": "assistant", "content": answer[:room]})
        while h and (len(h) > 2 * turns or _size(h) > limit):
            del h[0:2]

    def stream(self, prompt, **options):
        # An async iterator over the reply's pieces. Use as
        #   async for piece in chat.stream("..."): ...
        # Nothing accumulates but the history's bounded copy.
        return self._start(prompt, options, self.config["history_chars"])

    def _start(self, prompt, options, keep):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty str")
        c = self.config
        if (c["history"] <= 0 or self.session is not None) and keep <= c["history_chars"]:
            keep = 0
        opts = {}
        if self.session is not None:
            opts["session"] = self.session
            if self._reset:
                opts["session_reset"] = True
        if self.config["max_tokens"]:
            opts["max_tokens"] = self.config["max_tokens"]
        if self.config["model"]:
            opts["model"] = self.config["model"]
        opts.update(options)
        if opts.get("speak") and self.config["mode"] != "mqtt":
            raise ValueError("speak needs the mqtt mode; direct mode: OpenAI.audio.speech.create")
        r = self.transport.open(self._messages(prompt), self.system, opts)
        r._chat, r._prompt, r._keep = self, prompt, keep
        r.on_tool = self.on_tool
        if opts.get("speak") and self.speaker is not None:
            self.speaker.attach(self.transport, r.id)
        self.last = r
        return r

    async def ask(self, prompt, **options):
        # The whole reply as one str.
        reply = self._start(prompt, options, 1 << 30)
        async for _ in reply:
            pass
        return reply.text()

    async def say(self, prompt, **options):
        # The reply spoken through self.speaker (MQTT mode); returns its text
        # once played. picollm/voice.py.
        from picollm.voice import speak

        return await speak(self, prompt, **options)

    async def listen(self, mic, **options):
        # Ask by voice; returns (transcript, answer). picollm/voice.py.
        from picollm.voice import listen

        return await listen(self, mic, **options)

    def reset(self):
        # Forget the conversation (the bridge's session too, with the next question).
        self.history = []
        if self.session is not None:
            self._reset = True

    def interrupt(self):
        # Synchronous: stop the reply being read (send the MQTT cancel, or
        # close the HTTP stream). For a KeyboardInterrupt caught around
        # asyncio.run().
        if self._transport is not None:
            self._transport.abort()

    async def close(self):
        if self._transport is not None:
            await self._transport.close()
            self._transport = None


def _size(msgs):
    n = 0
    for m in msgs:
        n += len(m["content"])
    return n
