# Direct transport: Chat's replies straight from an OpenAI-compatible API
# over HTTPS, through picollm.openai's client. No bridge, no MQTT.

from picollm import Reply
from picollm.openai import OpenAI


class DirectReply(Reply):
    def __init__(self, t, messages, opts):
        super().__init__()
        self.t = t
        self.messages = messages
        self.opts = opts
        self.s = None

    async def next_piece(self):
        t = self.t
        if self.s is None:
            opts = self.opts
            model = opts.pop("model", None) or t.cfg["model"]
            opts.pop("stream", None)
            if "stream_options" not in opts:
                opts["stream_options"] = {"include_usage": True}
            t.active = self
            self.s = await t.client.chat.completions.create(
                model, self.messages, True, t.cfg["reply_timeout_ms"], **opts)
            self.messages = None
        s = self.s
        piece = await s.next_piece()
        self.id, self.model, self.usage = s.id, s.model, s.usage
        self.finish_reason, self.refusal = s.finish_reason, s.refusal
        if piece is None and t.active is self:
            t.active = None
        return piece

    async def _cancel(self):
        if self.t.active is self:
            self.t.active = None
        if self.s is None:
            return False
        return await self.s.cancel()


class DirectTransport:
    def __init__(self, cfg):
        self.cfg = cfg
        self.client = OpenAI(cfg["api_key"], cfg["base_url"], cfg["ca"], cfg["tls_verify"],
                             cfg["server_hostname"])
        self.active = None
        self.tools = None  # picollm.tools.ToolBox: run on the device with use_tools

    def open(self, messages, system, opts):
        if system:
            messages = [{"role": "system", "content": system}] + messages
        if opts.pop("use_tools", False) and self.tools is not None:
            from picollm.tools import DirectToolReply

            return DirectToolReply(self, messages, opts)
        return DirectReply(self, messages, opts)

    def abort(self):
        # Synchronous: close the HTTP stream of the reply being read.
        r = self.active
        self.active = None
        if r is not None:
            r.done = True
            if r.s is not None:
                r.s.done = True
                r.s.close()

    async def close(self):
        self.abort()
