"""Fault suite, part 2: an upstream fault storm of 1200 requests.

A seeded random mix of every way the API misbehaves (429 with Retry-After,
500, 503, 400, slow first byte, silence until the read timeout, streams cut in
the middle, malformed events, error events) and normal replies, all at once.
Every request must end with exactly one terminal, the right one; a request is
sent upstream again only while nothing of it was published, as often as the
retry policy says, and after a 429 not before its Retry-After.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import bridge.dev.mock_llm as mock_module
from bridge.dev.mock_llm import reply_tokens, running_mock
from tests.harness import API_KEY, BridgeProcess, Device, cpu_seconds

pytestmark = pytest.mark.faults

REQUESTS = 1200
SEED = 20261122
RETRIES = 2  # BRIDGE_UPSTREAM_RETRIES (the default)
READ_TIMEOUT = 1.0  # a slow first byte (150 ms) stays well inside it on a loaded machine
RETRY_AFTER = 1


@dataclass
class Case:
    """One storm request and what must come of it."""

    rid: str
    kind: str
    directives: str
    code: str  # "done" or an error code
    attempts: int  # how many times the API must see it
    status: int | None = None
    chunks: int | None = None  # chunks before an error terminal
    tokens: int | None = None  # reply length of a `done`

    @property
    def prompt(self) -> str:
        return f"storm {self.rid} [mock {self.directives} run={self.rid}]"


def make_case(rid: str, rng: random.Random) -> Case:
    """Pick one fault (or none) for request `rid`."""
    kinds = {
        "ok": 30,
        "ok_slow": 8,
        "slow_first_byte": 6,
        "first_byte_timeout": 2,
        "429_retry_after": 6,
        "429_beyond_max_wait": 3,
        "429_always": 3,
        "500": 4,
        "503_once": 6,
        "400": 3,
        "hang": 3,
        "cut_before_content": 3,
        "cut": 8,
        "malformed": 6,
        "error_event": 4,
        "event_error": 3,
    }
    kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
    k = rng.randint(1, 8)
    n = rng.randint(1, 12)
    retried = 1 + RETRIES
    match kind:
        case "ok":
            return Case(rid, kind, f"tokens={n}", "done", 1, tokens=n)
        case "ok_slow":
            return Case(rid, kind, f"tokens={n} delay_ms=3", "done", 1, tokens=n)
        case "slow_first_byte":
            return Case(rid, kind, f"tokens={n} first_byte_delay_ms=150", "done", 1, tokens=n)
        case "first_byte_timeout":
            return Case(rid, kind, "first_byte_delay_ms=2500", "upstream_timeout", retried)
        case "429_retry_after":
            d = f"status=429 retry_after={RETRY_AFTER} fail_times=1 tokens={n}"
            return Case(rid, kind, d, "done", 2, tokens=n)
        case "429_beyond_max_wait":
            return Case(rid, kind, "status=429 retry_after=30", "upstream_status", 1, 429)
        case "429_always":
            return Case(rid, kind, "status=429 retry_after=0", "upstream_status", retried, 429)
        case "500":
            return Case(rid, kind, "status=500", "upstream_status", retried, 500)
        case "503_once":
            return Case(rid, kind, f"status=503 fail_times=1 tokens={n}", "done", 2, tokens=n)
        case "400":
            return Case(rid, kind, "status=400", "upstream_status", 1, 400)
        case "hang":
            return Case(rid, kind, "hang=1", "upstream_timeout", retried)
        case "cut_before_content":  # nothing was published: retried like any failed call
            return Case(rid, kind, "tokens=10 cut_after=0", "upstream_protocol", retried, chunks=0)
        case "cut":  # chunks were published: never sent again
            d = f"tokens=12 cut_after={k}"
            return Case(rid, kind, d, "upstream_protocol", 1, chunks=k)
        case "malformed":
            d = f"tokens=12 malformed_at={k}"
            return Case(rid, kind, d, "upstream_protocol", 1, chunks=k - 1)
        case "error_event":
            d = f"tokens=12 error_event_at={k}"
            return Case(rid, kind, d, "upstream_error", 1, chunks=k)
        case _:
            d = f"tokens=12 event_error_at={k}"
            return Case(rid, kind, d, "upstream_error", 1, chunks=k)


@pytest.fixture
def stamped_mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[tuple[float, str]]]]:
    """A mock LLM of this test's own that notes when each request arrived, by `run=` id."""
    monkeypatch.setattr(mock_module, "MAX_RECORDED", 10 * REQUESTS)
    arrivals: list[tuple[float, str]] = []
    run_re = re.compile(r"run=([A-Za-z0-9_-]+)")
    with running_mock(api_key=API_KEY) as handle:
        record = handle.server.record

        def stamped(method: str, path: str, headers: dict[str, str], body: Any) -> None:
            if path.endswith("/chat/completions") and isinstance(body, dict):
                m = run_re.search(str(body.get("messages", [])[-1:]))
                arrivals.append((time.monotonic(), m.group(1) if m else "?"))
            record(method, path, headers, body)

        handle.server.record = stamped  # type: ignore[method-assign]
        yield handle, arrivals


def test_upstream_fault_storm(
    start_bridge: Callable[..., BridgeProcess],
    make_device: Callable[..., Device],
    stamped_mock: tuple[Any, list[tuple[float, str]]],
) -> None:
    mock, arrivals = stamped_mock
    proc = start_bridge(
        base_url=mock.base_url,
        BRIDGE_UPSTREAM_READ_TIMEOUT=READ_TIMEOUT,
        BRIDGE_UPSTREAM_RETRIES=RETRIES,
        BRIDGE_UPSTREAM_RETRY_BASE=0.02,
        BRIDGE_UPSTREAM_RETRY_MAX_WAIT=1,
        BRIDGE_MAX_STREAMS=100,
        BRIDGE_MAX_QUEUE=4 * REQUESTS,
        BRIDGE_LOG_LEVEL="INFO",
    )
    devices = [make_device(prefix=proc.prefix) for _ in range(8)]
    rng = random.Random(SEED)
    cases = [make_case(f"s{i:04d}", rng) for i in range(REQUESTS)]
    owner = {c.rid: devices[i % len(devices)] for i, c in enumerate(cases)}

    t0 = time.monotonic()

    def send(d: Device) -> None:
        for c in cases:
            if owner[c.rid] is d:
                d.send({"id": c.rid, "prompt": c.prompt})

    senders = [threading.Thread(target=send, args=(d,)) for d in devices]
    for t in senders:
        t.start()
    for t in senders:
        t.join(30)
    replies = {c.rid: owner[c.rid].wait(c.rid, timeout=max(1.0, 60 - (time.monotonic() - t0)))
               for c in cases}  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.proc is not None
    cpu = cpu_seconds(proc.proc.pid)
    time.sleep(0.5)  # a second terminal, if any, would come now

    attempts: dict[str, list[float]] = defaultdict(list)
    for at, rid in list(arrivals):
        attempts[rid].append(at)
    by_kind: dict[str, int] = defaultdict(int)
    for c in cases:
        by_kind[c.kind] += 1
        reply = owner[c.rid].quiet_after(c.rid, 0)  # seq 0..n, one terminal, last
        assert reply.messages == replies[c.rid].messages, f"{c.rid}: more after the terminal"
        t = reply.terminal
        got = "done" if t.get("done") else t["error"]["code"]
        assert got == c.code, (c, t)
        if c.code == "done":
            assert reply.text == "".join(reply_tokens(f"storm {c.rid}", c.tokens)), c
        else:
            if c.status is not None:
                assert t["error"]["status"] == c.status, (c, t)
            if c.chunks is not None:
                assert len(reply.messages) - 1 == c.chunks, (c, len(reply.messages))
        seen = attempts.get(c.rid, [])
        assert len(seen) == c.attempts, f"{c.kind} {c.rid} sent {len(seen)} times: {c}"
        if c.kind == "429_retry_after":
            # Retry-After: 1 is honoured (asyncio may wake a clock tick early)
            assert seen[1] - seen[0] >= RETRY_AFTER - 0.01, (c, seen)
    assert sum(len(v) for v in attempts.values()) == sum(c.attempts for c in cases)
    assert elapsed < 60, f"storm took {elapsed:.1f} s"
    assert proc.proc is not None and proc.proc.poll() is None
    print(
        f"storm: {REQUESTS} requests, {len(arrivals)} upstream calls, {elapsed:.1f} s,"
        f" bridge CPU {cpu:.1f} s;"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
