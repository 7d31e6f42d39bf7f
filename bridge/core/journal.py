"""Requests in flight, in a memory-mapped file that outlives a crash of the bridge.

After `kill -9` the device of an interrupted request would wait for a
terminal that never comes. The journal remembers, per running request, where
its reply goes and how many messages it was given; the next start publishes
one `interrupted` terminal for each. Writing the count is one store into
shared memory per chunk batch: no system call, and the kernel keeps the page
when the process dies.

Slot layout (little-endian): state u8, 3 pad bytes, next seq u32, length u16,
then JSON `{"t": topic, "c": correlation data in hex or null}`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bridge.core.journal")

SLOT = 1024
_HEADER = struct.Struct("<B3xIH")
_SEQ = struct.Struct("<I")
_ACTIVE = 1


@dataclass(frozen=True)
class Interrupted:
    """A request that was running when the bridge stopped without a goodbye.

    Its slot stays taken until `remove(slot)`: after its `interrupted`
    terminal is acknowledged by the broker, so a second crash before that
    loses nothing.
    """

    slot: int
    topic: str
    seq: int
    correlation: bytes | None
    device: str | None = None  #: the asking device (journals of older versions lack it)
    key: str | None = None  #: its duplicate-detection key, freed so that its retry is served


class JournalBusy(RuntimeError):
    """Another process holds this journal (its bridge runs, or a peer is answering for it)."""


def _lock(fd: int, wait: float) -> bool:
    """Take the process's lock on the journal file, waiting up to `wait` seconds.

    A POSIX record lock: the kernel drops it when the process dies (even by
    kill -9), which is how a worker of a group tells a dead peer's journal
    from a live one.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


class Journal:
    """A fixed table of slots in `path`, one per request that may run or wait at once.

    The process that opens it holds a lock on it until `close()` or its end.
    """

    def __init__(self, path: Path, slots: int, *, wait: float = 10.0) -> None:
        """Raises:
        JournalBusy: when another process still holds it after `wait` seconds.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _lock(fd, wait):
                raise JournalBusy(
                    f"journal {path} is held by another process (a bridge with the same "
                    "client id, or a worker answering for this one's requests)"
                )
            size = max(os.fstat(fd).st_size, slots * SLOT)
            size -= size % SLOT
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # kept open: closing it would drop the lock
        self._slots = size // SLOT
        self.pending = self._recover()
        taken = {gone.slot for gone in self.pending}
        self._free = [i for i in range(self._slots - 1, -1, -1) if i not in taken]

    def _recover(self) -> list[Interrupted]:
        found = []
        for i in range(self._slots):
            off = i * SLOT
            state, seq, length = _HEADER.unpack_from(self._mm, off)
            if state != _ACTIVE:
                continue
            try:
                blob = json.loads(self._mm[off + _HEADER.size : off + _HEADER.size + length])
                corr = bytes.fromhex(blob["c"]) if blob.get("c") else None
                found.append(Interrupted(i, blob["t"], seq, corr, blob.get("d"), blob.get("k")))
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable journal slot %d skipped", i)
                self._mm[off] = 0
        return found

    def add(
        self, topic: str, correlation: bytes | None, device: str | None = None,
        key: str | None = None,
    ) -> int:  # fmt: skip
        """Take a slot for a new request; -1 when none is free or it does not fit.

        The bridge refuses such a request rather than serve it unprotected.
        `device` and `key` (its duplicate-detection key) are kept when they fit.
        """
        blob = _blob(topic, correlation, device, key)
        if len(blob) > SLOT - _HEADER.size:
            blob = _blob(topic, correlation)
        if not self._free or len(blob) > SLOT - _HEADER.size:
            return -1
        slot = self._free.pop()
        off = slot * SLOT
        self._mm[off + _HEADER.size : off + _HEADER.size + len(blob)] = blob
        _HEADER.pack_into(self._mm, off, 0, 0, len(blob))
        self._mm[off] = _ACTIVE
        return slot

    def set_seq(self, slot: int, seq: int) -> None:
        """Record the seq the next message of this request will carry."""
        if slot >= 0:
            _SEQ.pack_into(self._mm, slot * SLOT + 4, seq)

    def remove(self, slot: int) -> None:
        """The request's terminal was acknowledged by the broker: forget it."""
        if slot >= 0 and self._mm[slot * SLOT] == _ACTIVE:
            self._mm[slot * SLOT] = 0
            self._free.append(slot)

    @classmethod
    def adopt(cls, path: Path, slots: int) -> Journal | None:
        """Open another worker's journal if no process holds it (its worker died), else None."""
        try:
            return cls(path, slots, wait=0)
        except JournalBusy:
            return None

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)


def _blob(
    topic: str, correlation: bytes | None, device: str | None = None, key: str | None = None
) -> bytes:
    data = {"t": topic, "c": correlation.hex() if correlation else None}
    if device is not None:
        data["d"] = device
        data["k"] = key
    return json.dumps(data, ensure_ascii=False).encode()
