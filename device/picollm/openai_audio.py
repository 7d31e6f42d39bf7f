# Direct mode's voice: uopenai's audio.speech and audio.transcriptions.
#
#   n = await client.audio.speech.create("tts-1", "Hello!", "alloy",
#                                        response_format="pcm", writer=i2s)
#   t = await client.audio.transcriptions.create("whisper-1", "question.wav")
#   t.text
#
# Speech streams the response body to `writer` (an I2S in TX mode, an open
# file, or a function) a few hundred bytes at a time; a transcription
# uploads the file from flash in pieces. Neither holds the audio in the heap.

import json

from picollm import LLMError, new_id
from picollm.http import Conn, Obj, status_error

SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
UPLOAD_PIECE = 1024


def _need_str(name, v):
    if not isinstance(v, str):
        raise TypeError(name + " must be a str")
    if not v:
        raise ValueError(name + " must not be empty")


def _need_timeout(timeout_ms):
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
        raise TypeError("timeout_ms must be an int")
    if timeout_ms <= 0:
        raise ValueError("timeout_ms must be > 0")


class Transcription(Obj):
    def __init__(self, text, d=None):
        self.text = text
        d = d or {}
        self.language = d.get("language")
        self.duration = d.get("duration")


class Speech:
    def __init__(self, client):
        self._client = client

    async def create(self, model, input, voice, response_format="mp3", writer=None,
                     speed=None, instructions=None, timeout_ms=30000):
        # Stream the spoken `input` to `writer`; return the number of bytes
        # written. "pcm" is the API's raw 24 kHz mono 16-bit PCM.
        _need_str("model", model)
        _need_str("input", input)
        if len(input) > 4096:
            raise ValueError("input must be at most 4096 characters")
        _need_str("voice", voice)
        if response_format not in SPEECH_FORMATS:
            raise ValueError("response_format must be one of " + ", ".join(SPEECH_FORMATS))
        if writer is None:
            raise ValueError("writer is required: an I2S, a file or a function")
        write = getattr(writer, "write", None) or writer
        if not callable(write):
            raise TypeError("writer must have write() or be callable")
        if speed is not None:
            if isinstance(speed, bool) or not isinstance(speed, (int, float)):
                raise TypeError("speed must be a number")
            if not 0.25 <= speed <= 4.0:
                raise ValueError("speed must be in 0.25..4")
        if instructions is not None:
            _need_str("instructions", instructions)
        _need_timeout(timeout_ms)
        body = {"model": model, "input": input, "voice": voice,
                "response_format": response_format}
        if speed is not None:
            body["speed"] = speed
        if instructions is not None:
            body["instructions"] = instructions
        data = json.dumps(body).encode()
        body = None
        c = self._client
        conn = await open_post(c, "/audio/speech", "application/json", len(data), timeout_ms,
                                "*/*")
        try:
            await conn.send(data, b"")
            data = None
            await conn.read_head()
            if conn.status != 200:
                raise status_error(conn.status, await conn.read_all())
            total = 0
            while True:
                part = await conn._part()
                if not part:
                    break
                write(part)
                total += len(part)
            if conn.chunked and not conn.eof:
                raise LLMError("upstream_protocol", "the audio was cut")
            if conn.length >= 0 and total < conn.length:
                raise LLMError("upstream_protocol", "the audio was cut")
            return total
        finally:
            conn.close()


class Transcriptions:
    def __init__(self, client):
        self._client = client

    async def create(self, model, file, language=None, prompt=None, response_format="json",
                     temperature=None, timeout_ms=60000):
        # Transcribe the audio file at the path `file` (WAV, MP3, ...): it is
        # sent as multipart/form-data in pieces of UPLOAD_PIECE bytes.
        _need_str("model", model)
        _need_str("file", file)
        if language is not None:
            _need_str("language", language)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError("prompt must be a str")
        if response_format not in TRANSCRIPT_FORMATS:
            raise ValueError("response_format must be one of " + ", ".join(TRANSCRIPT_FORMATS))
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
                raise TypeError("temperature must be a number")
            if not 0 <= temperature <= 1:
                raise ValueError("temperature must be in 0..1")
        _need_timeout(timeout_ms)
        import os

        try:
            size = os.stat(file)[6]
        except OSError:
            raise ValueError("no file " + file)
        name = file.rsplit("/", 1)[-1]
        boundary = "picollm" + new_id()
        fields = [("model", model), ("response_format", response_format)]
        if language is not None:
            fields.append(("language", language))
        if prompt is not None:
            fields.append(("prompt", prompt))
        if temperature is not None:
            fields.append(("temperature", str(temperature)))
        head = ""
        for k, v in fields:
            head += '--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (
                boundary, k, v)
        head += ('--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n") % (boundary, name)
        head = head.encode()
        tail = ("\r\n--%s--\r\n" % boundary).encode()
        c = self._client
        conn = await open_post(c, "/audio/transcriptions",
                               "multipart/form-data; boundary=" + boundary,
                               len(head) + size + len(tail), timeout_ms, "application/json")
        try:
            await conn.send(head, b"")
            head = None
            buf = bytearray(UPLOAD_PIECE)
            mv = memoryview(buf)
            sent = 0
            with open(file, "rb") as f:
                while sent < size:
                    n = f.readinto(buf)
                    if not n:
                        break
                    await conn.send(bytes(mv[:n]), b"")
                    sent += n
            if sent != size:
                raise ValueError("the file changed while it was sent")
            await conn.send(tail, b"")
            await conn.read_head()
            raw = await conn.read_all()
            if conn.status != 200:
                raise status_error(conn.status, raw)
        finally:
            conn.close()
        if response_format == "text" or response_format in ("srt", "vtt"):
            return Transcription(raw.decode().strip())
        try:
            d = json.loads(raw)
        except ValueError:
            raise LLMError("upstream_protocol", "the transcription is not JSON")
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise LLMError("upstream_protocol", "the transcription has no text")
        return Transcription(d["text"], d)


class Audio:
    def __init__(self, client):
        self.speech = Speech(client)
        self.transcriptions = Transcriptions(client)


async def open_post(client, path, ctype, length, timeout_ms, accept):
    # An open connection with the request head sent; the body follows.
    ctx = client._ssl() if client._https else None
    conn = Conn(timeout_ms)
    try:
        await conn.open(client._host, client._port, ctx, client._sni)
        head = (
            "POST %s%s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: %s\r\nContent-Length: %d\r\n"
            "Accept: %s\r\nConnection: close\r\nUser-Agent: picollm\r\n\r\n"
        ) % (client._path, path, client._hosthdr, client._key, ctype, length, accept)
        await conn.send(head.encode(), b"")
        return conn
    except BaseException:
        conn.close()
        raise
