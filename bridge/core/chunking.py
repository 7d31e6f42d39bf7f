"""Device-friendly chunking: fewer, larger reply messages, on request.

A Pico pays per MQTT message (a wake-up, a parse, an ack), so a request may
ask the bridge to merge deltas by size (`chunk_bytes`, never splitting a
UTF-8 character), by time (`chunk_ms`), or into whole sentences
(`chunk_sentences`) for text-to-speech and small displays; the rules combine
as docs/protocol.md's "Chunking" says.

`Chunker.feed()` costs O(len(delta)), however much text is held: it runs on
the event loop for every delta, and a reply of many thousand tokens with no
sentence end must not stall the other devices' streams. Only the new text is
scanned; what a sentence end needs from the text before it is kept as one
flag. The time rule is driven by the caller: `Chunker.due_in()` says when
the held text must leave, `flush()` sends it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

# A sentence ends at . ! ? … (and closing quotes or brackets) followed by
# whitespace, at a CJK terminator, or at a line break; the whitespace after
# the end belongs to that sentence. One terminator per match (not a run) so
# that a run of them without a space cannot make the regex backtrack
# quadratically: the last end found is the same.
_SENTENCE_END = re.compile(r"(?:[.!?\u2026][\"')\]]*\s|[\u3002\uff01\uff1f]|\n)\s*")
# The rest of a sentence end whose terminator came in earlier text.
_END_REST = re.compile(r"[\"')\]]*\s+")
_TERMINATORS = ".!?\u2026"
_CLOSERS = "\"')]"


def _boundary(data: bytes, start: int, max_bytes: int) -> int:
    """The end of the longest piece from `start` of at most `max_bytes`, on a character boundary.

    `data` is whole UTF-8 characters and holds more than `max_bytes` after `start`.
    """
    end = start + max_bytes
    while end > start and (data[end] & 0xC0) == 0x80:
        end -= 1
    if end == start:  # one character wider than the limit: send it whole rather than never
        end = start + max_bytes
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end += 1
    return end


def split_utf8(data: bytes, max_bytes: int, *, whole: bool) -> tuple[list[str], bytes]:
    """Cut UTF-8 `data` into pieces of at most `max_bytes`, each ending on a character boundary.

    With `whole`, everything is cut (the last piece may be short); without,
    cutting stops when less than a full piece is left, and that rest is
    returned. One pass over `data`: no piece is encoded twice.
    """
    pieces: list[str] = []
    pos, size = 0, len(data)
    while pos < size and (whole or size - pos >= max_bytes):
        end = size if size - pos <= max_bytes else _boundary(data, pos, max_bytes)
        pieces.append(data[pos:end].decode())
        pos = end
    return pieces, data[pos:]


class Chunker:
    """Merges deltas; `feed()` returns the pieces ready to publish, `flush()` the rest.

    Args:
        max_bytes: at most this many UTF-8 bytes per piece, and a piece is
            sent as soon as it is full (0: no size rule).
        sentences: a piece is sent when it ends a sentence (a long one is
            still cut at `max_bytes`).
        max_ms: no text is held longer than this; the caller asks `due_in()`
            and calls `flush()` (0: no time rule).
        clock: seconds, monotonic (the event loop's clock by default).
    """

    __slots__ = ("_clock", "_open", "_parts", "_since", "_size", "max_bytes", "max_ms", "sentences")

    def __init__(
        self,
        max_bytes: int = 0,
        sentences: bool = False,
        max_ms: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.sentences = sentences
        self.max_ms = max_ms
        self._clock = clock
        self._parts: list[str] = []  # the held text, as it came (joined only when it leaves)
        self._size = 0  # its UTF-8 size (kept only with a size rule)
        self._since = 0.0  # when its oldest character came (kept only with a time rule)
        self._open = False  # the text so far ends with a terminator waiting for its whitespace

    @property
    def holding(self) -> bool:
        return bool(self._parts)

    def feed(self, text: str) -> list[str]:
        """Add a delta; return the pieces that are complete now. O(len(text)) amortised."""
        if not (self.max_bytes or self.sentences or self.max_ms):
            return [text] if text else []
        if not text:
            return []
        out: list[str] = []
        if self.sentences:
            end = self._sentence_end(text)
            if end:
                self._parts.append(text[:end])
                out.extend(self._take_all())
                text = text[end:]
        if text:
            if self.max_ms and not self._parts:
                self._since = self._clock()
            self._parts.append(text)
            if self.max_bytes:
                self._size += len(text.encode())
                if self._size >= self.max_bytes:
                    out.extend(self._take_full())
                    # What is left (if anything) came in this delta: the first
                    # cut ends at or after where it began, as less than a full
                    # piece was held before it.
                    if self.max_ms:
                        self._since = self._clock()
        if not self._parts:
            self._open = False  # the next text starts afresh, as after flush()
        return out

    def _sentence_end(self, text: str) -> int:
        """The index in `text` after the last sentence end in held text + `text` (0: none).

        Also updates `_open` for what follows that end.
        """
        end = 0
        if self._open:
            m = _END_REST.match(text)
            if m:
                end = m.end()
        for m in _SENTENCE_END.finditer(text):
            end = max(end, m.end())
        tail = text[end:].rstrip(_CLOSERS)
        if tail:
            self._open = tail[-1] in _TERMINATORS
        elif end:
            self._open = False  # only closers after a whitespace or a CJK terminator
        return end

    def _take_all(self) -> list[str]:
        """Everything held, in pieces no larger than `max_bytes`; nothing is held after."""
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        if not text:
            return []
        if not self.max_bytes:
            return [text]
        return split_utf8(text.encode(), self.max_bytes, whole=True)[0]

    def _take_full(self) -> list[str]:
        """The full pieces of the held text; less than a full piece stays held."""
        pieces, rest = split_utf8("".join(self._parts).encode(), self.max_bytes, whole=False)
        self._parts.clear()
        if rest:
            self._parts.append(rest.decode())
        self._size = len(rest)
        return pieces

    def due_in(self) -> float | None:
        """Seconds until the time rule must send the held text (<= 0: now), None if it need not.

        The held text may be younger than a timer the caller started for
        text that has left since (by the size or sentence rule): then the
        caller waits this long again instead of sending early.
        """
        if not self.max_ms or not self._parts:
            return None
        return self._since + self.max_ms / 1000 - self._clock()

    def flush(self) -> list[str]:
        """Everything held, in pieces no larger than `max_bytes`."""
        self._open = False
        return self._take_all()
