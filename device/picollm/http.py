# One HTTP/1.1 exchange with the API, for the direct transport: the
# connection, its body decoded from chunked coding, read a line or a few
# bytes at a time, and the API's error answer as an LLMError. picollm.openai
# (chat), picollm.openai_audio (voice) and picollm.image (pictures) share it.

import json

import asyncio

from picollm import LLMError, LLMTimeout

MAX_LINE = 16384  # the longest SSE line read
READ_SIZE = 512  # bytes read from the socket at a time


class Obj:
    # An API answer's fields as attributes.
    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.__dict__)


def status_error(status, raw):
    msg = ""
    try:
        e = json.loads(raw)["error"]
        msg = e.get("message") if isinstance(e, dict) else str(e)
    except Exception:
        msg = raw[:200].decode() if raw else ""
    return LLMError("upstream_status", "HTTP %d: %s" % (status, (msg or "")[:200]), status)


class _Buf:
    # Bytes from the coroutine function `more` (b"" at the end), handed
    # out a line or a few bytes at a time.
    def __init__(self, more):
        self.more = more
        self.b = b""

    async def line(self):
        # The next line with its newline; what is left (b"" at the end).
        while True:
            b = self.b
            i = b.find(b"\n")
            if i >= 0:
                self.b = b[i + 1 :]
                return b[: i + 1]
            if len(b) > MAX_LINE:
                raise LLMError("upstream_protocol", "line too long")
            data = await self.more()
            if not data:
                self.b = b""
                return b
            self.b = b + data if b else data

    async def take(self, n):
        if not self.b:
            self.b = await self.more()
        part = self.b[:n]
        self.b = self.b[n:]
        return part


class Conn:
    # One HTTP/1.1 exchange on an asyncio stream. The socket is read in
    # blocks of READ_SIZE (reading a TLS socket a byte at a time is slow)
    # into `raw`; the body, decoded from chunked transfer coding when the
    # server uses it, goes through `body` and is handed out a line at a time.
    def __init__(self, timeout_ms):
        self.timeout_ms = timeout_ms
        self.r = self.w = None
        self.status = 0
        self.length = -1
        self.chunked = False
        self.left = 0  # bytes left in the current chunk, or in the body
        self.started = False
        self.eof = False
        self.raw = _Buf(self._recv)
        self.body = _Buf(self._part)

    async def _io(self, coro):
        try:
            return await asyncio.wait_for_ms(coro, self.timeout_ms)
        except asyncio.TimeoutError:
            self.close()
            raise LLMTimeout("timeout", "no answer within %d ms" % self.timeout_ms)
        except ValueError as e:
            # MicroPython's ssl reports a refused certificate this way
            self.close()
            raise LLMError("tls", "certificate refused: %s" % str(e).strip())
        except OSError as e:
            self.close()
            code = e.args[0] if e.args else 0
            if isinstance(code, int) and code < 0:
                raise LLMError("tls", "TLS failure (%d): the server's certificate was refused "
                                      "or the handshake failed" % code)
            raise LLMError("unreachable", "connection failed: %s" % (e,))

    async def open(self, host, port, ctx, sni):
        if ctx is None:
            self.r, self.w = await self._io(asyncio.open_connection(host, port))
        else:
            self.r, self.w = await self._io(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni))

    async def send(self, head, data):
        # write() may already run the TLS handshake: keep it inside _io()
        await self._io(self._send(head, data))

    async def _send(self, head, data):
        self.w.write(head)
        self.w.write(data)
        await self.w.drain()

    async def _recv(self):
        if self.r is None:
            return b""
        return await self._io(self._read()) or b""

    async def _read(self):
        # Try the socket first: a TLS layer can hold decrypted bytes (or the
        # peer's close_notify) that poll() does not see, and waiting for the
        # socket to become readable would then hang.
        data = self.r.s.read(READ_SIZE)
        if data is None:
            data = await self.r.read(READ_SIZE)
        return data

    async def read_head(self):
        line = await self.raw.line()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise LLMError("upstream_protocol", "not an HTTP response")
        self.status = int(parts[1])
        while True:
            line = await self.raw.line()
            if not line:
                raise LLMError("upstream_protocol", "headers cut")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                self.length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
        if not self.chunked and self.length >= 0:
            self.left = self.length
            self.eof = self.length == 0

    async def _part(self):
        # The next piece of the decoded body; b"" at its end.
        if self.eof:
            return b""
        if self.chunked:
            if self.left == 0:
                if self.started:
                    await self.raw.line()  # the CRLF after a chunk's data
                self.started = True
                size = await self.raw.line()
                try:
                    self.left = int(size.split(b";")[0].strip(), 16)
                except ValueError:
                    self.eof = True  # cut before the last chunk
                    return b""
                if self.left == 0:
                    self.eof = True
                    return b""
            part = await self.raw.take(self.left)
            self.left -= len(part)
        elif self.length >= 0:
            part = await self.raw.take(self.left)
            self.left -= len(part)
            if self.left == 0:
                self.eof = True
        else:
            part = await self.raw.take(READ_SIZE)
        if not part:
            self.eof = True
        return part

    async def read_all(self):
        out = self.body.b
        self.body.b = b""
        while True:
            part = await self._part()
            if not part:
                return out
            out = out + part if out else part
            if len(out) > 4 * MAX_LINE:
                raise LLMError("upstream_protocol", "body too long")

    def close(self):
        w = self.w
        self.w = self.r = None
        if w is not None:
            try:
                w.close()
            except Exception:
                pass
