"""The call broker (protocol v2): a tool call goes out on `P/OWNER/call`, its result comes
back on `P/OWNER/result`, and the model gets exactly one outcome per call.

A result counts only when it comes from the device the call went to, and only
the first time; anything else (another device's result, a second delivery, a
late answer after the timeout, a call id of another bridge worker) is dropped.
Several bridge workers can share one broker: each subscribes to
`P/+/result` without a shared subscription and ignores the ids it did not
make, which are random (64 bits), so no worker or device can guess another's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.plugins.toolcards import NAME_RE, ToolSpec, loads_strict

log = logging.getLogger("bridge.plugins.tools")

MAX_RESULT_BYTES = 16384
MAX_ERROR_CHARS = 1024
MAX_PENDING = 4096
MAX_PENDING_PER_OWNER = 16
_SALVAGE_ID_RE = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_\-]{1,64})"')
_SURROGATE = re.compile("[\ud800-\udfff]")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True)
class Outcome:
    """What the model gets for one call: `content` of its `tool` message."""

    ok: bool
    content: str

    @classmethod
    def failed(cls, message: str) -> Outcome:
        return cls(False, _dumps({"error": _valid_unicode(message)}))

    @classmethod
    def result(cls, value: Any) -> Outcome:
        content = _dumps(value)
        if _valid_unicode(content) != content:
            # the API's JSON body could not carry it (a lone UTF-16 surrogate)
            return cls.failed("the result holds text that is not valid Unicode")
        return cls(True, content)


def _valid_unicode(text: str) -> str:
    """`text` with any lone UTF-16 surrogate (from a `\\udXXX` escape) made U+FFFD."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def new_call_id() -> str:
    """A call id: 16 random hex digits, never reused, never guessable."""
    return os.urandom(8).hex()


@dataclass
class _Pending:
    owner: str
    future: asyncio.Future[Outcome]


def call_message(call_id: str, spec: ToolSpec, arguments: dict[str, Any], session: str) -> bytes:
    """The `P/OWNER/call` payload."""
    return _dumps(
        {
            "id": call_id,
            "name": spec.name,
            "arguments": arguments,
            "session": session,
            "timeout_ms": spec.timeout_ms,
        }
    ).encode()


def parse_result(payload: bytes) -> tuple[str, Outcome]:
    """A `P/OWNER/result` payload as (call id, outcome); raises ValueError when there is no
    usable call id. A result too large or malformed but with its id is a failed outcome."""
    if len(payload) > MAX_RESULT_BYTES:
        m = _SALVAGE_ID_RE.search(payload[:256])
        if m is None:
            raise ValueError(f"result of {len(payload)} bytes without a leading id")
        return m.group(1).decode(), Outcome.failed(
            f"the device's result is {len(payload)} bytes, more than {MAX_RESULT_BYTES}"
        )
    data = loads_strict(payload)
    if not isinstance(data, dict):
        raise ValueError("result must be a JSON object")
    call_id = data.get("id")
    if not isinstance(call_id, str) or not NAME_RE.match(call_id):
        raise ValueError("result without a valid id")
    if "error" in data:
        err = data["error"]
        text = err if isinstance(err, str) else _dumps(err)
        return call_id, Outcome.failed(text[:MAX_ERROR_CHARS] or "error")
    if "result" not in data:
        return call_id, Outcome.failed("the device answered with neither result nor error")
    return call_id, Outcome.result(data["result"])


class CallBroker:
    """Calls waiting for their device's result, keyed by call id."""

    def __init__(
        self, max_pending: int = MAX_PENDING, max_per_owner: int = MAX_PENDING_PER_OWNER
    ) -> None:
        self.pending: dict[str, _Pending] = {}
        self.per_owner: dict[str, int] = {}
        self.max_pending = max_pending
        self.max_per_owner = max_per_owner

    async def call(
        self,
        call_id: str,
        spec: ToolSpec,
        arguments: dict[str, Any],
        session: str,
        send: Callable[[bytes, int], None],
    ) -> Outcome:
        """Send one call with `send(payload, expiry_seconds)` and wait for its outcome.

        A call not answered in the tool's `timeout_ms` fails; a cancelled wait
        abandons the call (a result arriving later is ignored).
        """
        owner = spec.owner
        if len(self.pending) >= self.max_pending:
            return Outcome.failed("the bridge has too many tool calls waiting; try again")
        if self.per_owner.get(owner, 0) >= self.max_per_owner:
            return Outcome.failed(f"device {owner} has too many tool calls waiting")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = _Pending(owner, future)
        self.per_owner[owner] = self.per_owner.get(owner, 0) + 1
        try:
            send(call_message(call_id, spec, arguments, session), -(-spec.timeout_ms // 1000))
            try:
                return await asyncio.wait_for(future, spec.timeout_ms / 1000)
            except TimeoutError:
                return Outcome.failed(f"{owner} did not answer within {spec.timeout_ms} ms")
        finally:
            self._forget(call_id)

    def _forget(self, call_id: str) -> None:
        entry = self.pending.pop(call_id, None)
        if entry is None:
            return
        left = self.per_owner.get(entry.owner, 1) - 1
        if left > 0:
            self.per_owner[entry.owner] = left
        else:
            self.per_owner.pop(entry.owner, None)

    def on_result(self, device: str, payload: bytes) -> bool:
        """A message on `P/device/result`; True when it settled a waiting call."""
        try:
            call_id, outcome = parse_result(payload)
        except ValueError as exc:
            log.warning("ignored result from %s: %s", device, exc)
            return False
        entry = self.pending.get(call_id)
        if entry is None:
            # Late, repeated, or another bridge worker's call.
            log.debug("ignored result for unknown call %s from %s", call_id, device)
            return False
        if entry.owner != device:
            log.warning(
                "ignored result for call %s from %s: the call went to %s",
                call_id, device, entry.owner,
            )  # fmt: skip
            return False
        self._forget(call_id)
        if not entry.future.done():
            entry.future.set_result(outcome)
        return True
