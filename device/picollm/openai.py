# Direct transport: an async OpenAI-compatible client over MicroPython
# asyncio streams, with uopenai's surface:
#
#   client = OpenAI(api_key, base_url, ca="ca.pem")
#   resp = await client.chat.completions.create(model, messages)
#   resp.choices[0].message.content
#   stream = await client.chat.completions.create(model, messages, stream=True)
#   async for line in stream.iter_lines(): ...      # raw SSE lines (uopenai)
#   async for piece in stream: ...                  # or the text deltas
#
# Unlike uopenai, HTTPS verifies the server certificate against a CA bundle
# (`ca`); verify=False is the explicit opt-out. Memory: one SSE line at a time.
# The client stands alone; picollm.direct puts it behind Chat.

import json

from picollm import LLMError, Reply, tls_context
from picollm.http import Conn, Obj, status_error

_ROLES = ("system", "developer", "user", "assistant", "tool")


class Message(Obj):
    def __init__(self, d):
        self.role = d.get("role", "assistant")
        c = d.get("content")
        self.content = c if c is not None else ""  # thinking models send null
        self.refusal = d.get("refusal")
        self.tool_calls = d.get("tool_calls")


class Choice(Obj):
    def __init__(self, d):
        self.index = d.get("index", 0)
        self.message = Message(d.get("message") or {})
        self.finish_reason = d.get("finish_reason")


class ChatCompletion(Obj):
    def __init__(self, d):
        self.id = d.get("id")
        self.object = d.get("object")
        self.created = d.get("created")
        self.model = d.get("model")
        self.usage = d.get("usage")
        self.choices = [Choice(c) for c in d.get("choices") or ()]


def _check_kwargs(kw):
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if name in kw:
            v = kw[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(name + " must be a number")
            lo, hi = (0, 2) if name == "temperature" else (0, 1) if name == "top_p" else (-2, 2)
            if not lo <= v <= hi:
                raise ValueError("%s must be in %s..%s" % (name, lo, hi))
    for name in ("max_tokens", "max_completion_tokens"):
        if name in kw:
            v = kw[name]
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(name + " must be an int")
            if v < 1:
                raise ValueError(name + " must be >= 1")


def _check_messages(messages):
    if not isinstance(messages, list):
        raise TypeError("messages must be a list")
    if not messages:
        raise ValueError("messages must not be empty")
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError("each message must be a dict")
        if m.get("role") not in _ROLES:
            raise ValueError("message role must be one of " + ", ".join(_ROLES))
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise TypeError("message content must be a str, a list or None")


class Completions:
    def __init__(self, client):
        self._client = client

    async def create(self, model, messages, stream=False, timeout_ms=30000, **kwargs):
        if not isinstance(model, str):
            raise TypeError("model must be a str")
        if not model:
            raise ValueError("model must not be empty")
        _check_messages(messages)
        if not isinstance(stream, bool):
            raise TypeError("stream must be a bool")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
            raise TypeError("timeout_ms must be an int")
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        _check_kwargs(kwargs)
        body = {"model": model, "messages": messages, "stream": stream}
        body.update(kwargs)
        data = json.dumps(body).encode()
        body = None
        return await self._client._post("/chat/completions", data, timeout_ms, stream)


class _ChatNS:
    def __init__(self, client):
        self.completions = Completions(client)


class OpenAI:
    def __init__(self, api_key, base_url="https://api.openai.com/v1", ca=None, verify=True,
                 server_hostname=None):
        if not isinstance(api_key, str):
            raise TypeError("api_key must be a str")
        if not api_key.strip():
            raise ValueError("api_key must not be empty")
        if not isinstance(base_url, str):
            raise TypeError("base_url must be a str")
        if ca is not None and not isinstance(ca, str):
            raise TypeError("ca must be a path (str) or None")
        if not isinstance(verify, bool):
            raise TypeError("verify must be a bool")
        url = base_url.strip()
        while url.endswith("/"):
            url = url[:-1]
        if url.startswith("https://"):
            https, rest = True, url[8:]
        elif url.startswith("http://"):
            https, rest = False, url[7:]
        else:
            raise ValueError("base_url must start with http:// or https://")
        hostport, slash, path = rest.partition("/")
        host, colon, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
        if not host:
            raise ValueError("base_url has no host")
        if port:
            try:
                port = int(port)
            except ValueError:
                raise ValueError("base_url has a bad port")
        else:
            port = 443 if https else 80
        self.base_url = url
        self._key = api_key
        self._https = https
        self._host = host
        self._port = port
        self._hosthdr = hostport
        self._path = slash + path
        self._ca = ca
        self._verify = verify
        self._sni = server_hostname or host
        self._ctx = None
        self.chat = _ChatNS(self)

    def __repr__(self):
        return "<OpenAI %s>" % self.base_url  # never the key

    @property
    def audio(self):
        # uopenai's audio.speech / audio.transcriptions: picollm/openai_audio.py
        from picollm.openai_audio import Audio

        return Audio(self)

    @property
    def images(self):
        # client.images.generate(...): picollm.image, loaded when first used
        from picollm.image import Images

        return Images(self)

    @staticmethod
    def encode_image(filepath):
        # The file's bytes as a base64 str (no data: prefix). Small images:
        # the whole file is held in memory.
        if not isinstance(filepath, str):
            raise TypeError("filepath must be a str")
        if not filepath:
            raise ValueError("filepath must not be empty")
        from binascii import b2a_base64

        with open(filepath, "rb") as f:
            raw = f.read()
        return b2a_base64(raw).decode().strip()

    def _ssl(self):
        if self._ctx is None:
            if self._verify and not self._ca:
                raise LLMError("tls", "no CA bundle: pass ca=PATH (or verify=False to opt out)")
            self._ctx = tls_context(self._ca, self._verify)
        return self._ctx

    async def _post(self, path, data, timeout_ms, stream):
        ctx = self._ssl() if self._https else None
        conn = Conn(timeout_ms)
        try:
            await conn.open(self._host, self._port, ctx, self._sni)
            head = (
                "POST %s%s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                "Content-Type: application/json\r\nContent-Length: %d\r\n"
                "Accept: %s\r\nConnection: close\r\nUser-Agent: picollm\r\n\r\n"
            ) % (self._path, path, self._hosthdr, self._key, len(data),
                 "text/event-stream" if stream else "application/json")
            await conn.send(head.encode(), data)
            head = None
            await conn.read_head()
            if conn.status != 200:
                raw = await conn.read_all()
                raise status_error(conn.status, raw)
            if stream:
                return Stream(conn)
            raw = await conn.read_all()
            conn.close()
            try:
                d = json.loads(raw)
            except ValueError:
                raise LLMError("upstream_protocol", "the body is not JSON")
            raw = None
            if not isinstance(d, dict) or "choices" not in d:
                raise LLMError("upstream_protocol", "not a chat completion")
            return ChatCompletion(d)
        except BaseException:
            conn.close()
            raise


class _Lines:
    def __init__(self, stream):
        self._s = stream

    def __aiter__(self):
        return self

    async def __anext__(self):
        line = await self._s._line()
        if line is None:
            raise StopAsyncIteration
        return line


class Stream(Reply):
    # The reply of create(stream=True). Read it once, either as raw SSE
    # lines (iter_lines(), as in uopenai) or as text pieces (async for).
    # After the end: id, model, finish_reason, usage, refusal.
    def __init__(self, conn):
        super().__init__()
        self._conn = conn
        self.status = conn.status
        self._event = None
        self.tool_calls = None  # assembled from the streamed fragments (picollm.tools)

    async def _line(self):
        # The next non-empty line without its line end; None at the end.
        while True:
            if self._conn.r is None:
                return None
            line = await self._conn.body.line()
            if not line:
                self.close()
                return None
            line = line.rstrip(b"\r\n")
            if line:
                return line

    def iter_lines(self):
        return _Lines(self)

    async def next_piece(self):
        # The next text piece (content or refusal), None at the end.
        try:
            while not self.done:
                line = await self._line()
                if line is None:
                    self.done = True
                    if self.finish_reason is None:
                        raise LLMError("upstream_protocol", "the stream ended before [DONE]")
                    return None
                if line.startswith(b"event:"):
                    self._event = line[6:].strip()
                    continue
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                line = None
                if data == b"[DONE]":
                    self.done = True
                    self.close()
                    return None
                try:
                    ev = json.loads(data)
                except ValueError:
                    raise LLMError("upstream_protocol", "malformed JSON in the stream")
                data = None
                if not isinstance(ev, dict):
                    raise LLMError("upstream_protocol", "malformed event")
                if "error" in ev or self._event == b"error":
                    e = ev.get("error", ev)
                    msg = e.get("message") if isinstance(e, dict) else str(e)
                    raise LLMError("upstream_error", str(msg)[:200])
                self.id = ev.get("id") or self.id
                self.model = ev.get("model") or self.model
                if ev.get("usage"):
                    self.usage = ev["usage"]
                choices = ev.get("choices")
                if not choices:
                    continue
                c = choices[0]
                if c.get("finish_reason"):
                    self.finish_reason = c["finish_reason"]
                delta = c.get("delta") or {}
                if delta.get("tool_calls"):
                    from picollm.tools import merge_fragments

                    self.tool_calls = merge_fragments(self.tool_calls, delta["tool_calls"])
                text = delta.get("content")
                if text:
                    return text
                text = delta.get("refusal")
                if text:
                    self.refusal = True
                    return text
            return None
        except BaseException:
            self.done = True
            self.close()
            raise

    def close(self):
        self._conn.close()

    async def aclose(self):
        self.close()

    async def _cancel(self):
        # Closing the socket ends the upstream request.
        self.close()
        return True
