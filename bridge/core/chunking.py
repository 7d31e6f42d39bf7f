"""Device-friendly chunking: fewer, larger reply messages, on request.

A Pico pays per MQTT message (a wake-up, a parse, an ack), so a request may
ask the bridge to merge deltas by size (`chunk_bytes`, never splitting a
UTF-8 character), by time (`chunk_ms`), or into whole sentences
(`chunk_sentences`) for text-to-speech and small displays. The time rule is
driven by the caller (`due()`); this class only decides what to cut.
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (and their CJK forms) followed by space or end,
# or at a line break.
_SENTENCE_END = re.compile(r"(?:[.!?\u2026]+[\"')\]]*(?=\s)|[\u3002\uff01\uff1f]+|\n)\s*")


def cut_utf8(text: str, max_bytes: int) -> tuple[str, str]:
    """Split `text` so the head is at most `max_bytes` of UTF-8, on a character boundary."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text, ""
    end = max_bytes
    while end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    if end == 0:  # one character wider than the limit: send it whole rather than never
        end = max_bytes
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end += 1
    return data[:end].decode(), data[end:].decode()


class Chunker:
    """Merges deltas; `feed()` returns the pieces ready to publish, `flush()` the rest.

    Args:
        max_bytes: at most this many UTF-8 bytes per piece, and a piece is
            sent as soon as it is full (0: no size rule).
        sentences: send whole sentences only (a long one is still cut at `max_bytes`).
        max_ms: the caller flushes when the oldest held text is this old (0: no time rule).
    """

    __slots__ = ("_buf", "max_bytes", "max_ms", "sentences")

    def __init__(self, max_bytes: int = 0, sentences: bool = False, max_ms: int = 0) -> None:
        self.max_bytes = max_bytes
        self.sentences = sentences
        self.max_ms = max_ms
        self._buf = ""

    @property
    def holding(self) -> bool:
        return bool(self._buf)

    def feed(self, text: str) -> list[str]:
        """Add a delta; return the pieces that are complete now."""
        buf = self._buf + text
        out: list[str] = []
        if self.sentences:
            last = 0
            for m in _SENTENCE_END.finditer(buf):
                last = m.end()
            if last:
                out.extend(self._by_size(buf[:last]))
                buf = buf[last:]
        elif not self.max_bytes and not self.max_ms:
            out.append(buf)
            buf = ""
        if self.max_bytes:
            while len(buf.encode()) > self.max_bytes:
                head, rest = cut_utf8(buf, self.max_bytes)
                if not rest:
                    break
                out.append(head)
                buf = rest
            if not self.sentences and not self.max_ms and len(buf.encode()) == self.max_bytes:
                out.append(buf)
                buf = ""
        self._buf = buf
        return [piece for piece in out if piece]

    def _by_size(self, text: str) -> list[str]:
        if not self.max_bytes:
            return [text]
        pieces = []
        while text:
            head, text = cut_utf8(text, self.max_bytes)
            pieces.append(head)
        return pieces

    def flush(self) -> list[str]:
        """Everything held, in pieces no larger than `max_bytes`."""
        buf, self._buf = self._buf, ""
        return self._by_size(buf) if buf else []
