"""`Bridge.submit` in memory: what is refused at once, what is dropped as a second delivery,
and which refusals leave nothing behind (a recording link, an API answering from memory)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx

from bridge.core.errors import BAD_REQUEST, OVERLOADED, TOO_LARGE, ProtocolError
from bridge.core.plugin import Inbound, Plugin
from bridge.core.protocol import ChatRequest
from bridge.core.service import SharedRecent
from bridge.core.shared import Guarded, Held, SqliteStore
from tests.unit.fakes import bridge, reply_stream, settle

DEV = "kitchen"


def req(rid: str | None = None, prompt: str = "hi") -> bytes:
    body: dict[str, Any] = {"prompt": prompt}
    if rid is not None:
        body["id"] = rid
    return json.dumps(body).encode()


def digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def run(test: Any) -> None:
    asyncio.run(test())


def test_an_accepted_request_gets_its_reply_and_one_terminal() -> None:
    async def main() -> None:
        b, link = bridge()
        job = b.submit(DEV, req("a1"))
        assert job is not None and job.topic == "llm/kitchen/res/a1"
        await settle(b)
        assert [s.message for s in link.sent] == [
            {"seq": 0, "delta": "Hi there"},
            {"seq": 1, "done": True, "finish_reason": "stop", "model": "m",
             "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        ]  # fmt: skip
        assert {s.topic for s in link.sent} == {"llm/kitchen/res/a1"}

    run(main)


def test_beyond_streams_and_queue_a_request_is_refused_overloaded() -> None:
    async def main() -> None:
        b, link = bridge(max_streams=1, max_queue=1)
        assert b.submit(DEV, req("a1")) is not None
        assert b.submit(DEV, req("a2")) is not None  # waits for the stream
        assert b.submit(DEV, req("a3")) is None
        (refused,) = link.terminals()
        assert (refused.topic, refused.code, refused.message["seq"]) == (
            "llm/kitchen/res/a3", OVERLOADED, 0)  # fmt: skip
        await settle(b)
        done = [s.topic for s in link.terminals() if "done" in s.message]
        assert done == ["llm/kitchen/res/a1", "llm/kitchen/res/a2"]

    run(main)


def test_an_overloaded_request_asked_again_is_served() -> None:
    async def main() -> None:
        b, link = bridge(max_streams=1, max_queue=0)
        b.submit(DEV, req("a1"))
        assert b.submit(DEV, req("a2")) is None
        await settle(b)
        assert b.submit(DEV, req("a2")) is not None  # the refusal left no duplicate entry
        await settle(b)
        codes = [(s.topic[-2:], s.code) for s in link.terminals()]
        assert codes == [("a2", OVERLOADED), ("a1", None), ("a2", None)]

    run(main)


def test_a_second_delivery_of_a_request_with_an_id_is_dropped() -> None:
    async def main() -> None:
        b, link = bridge()
        assert b.submit(DEV, req("d1")) is not None
        assert b.submit(DEV, req("d1")) is None
        await settle(b)
        assert b.submit(DEV, req("d1")) is None  # still within the window after it ended
        assert len(link.terminals()) == 1

    run(main)


def test_the_same_id_with_another_payload_supersedes_the_first() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        if b"one" in request.content:
            await asyncio.Event().wait()  # the first call hangs until it is cancelled
        return reply_stream()

    async def main() -> None:
        b, link = bridge(answer)
        first = b.submit(DEV, req("d1", "one"))
        second = b.submit(DEV, req("d1", "two"))
        assert first is not None and second is not None and first is not second
        await settle(b)
        await asyncio.wait([t for t in (first.task, second.task) if t is not None])
        terminals = link.terminals()
        assert len(terminals) == 2
        superseded = "superseded by a new request with the same id"
        assert terminals[0].message["error"] == {"code": "cancelled", "message": superseded}
        assert "done" in terminals[1].message
        # The first one's end left the id to the second: its redelivery is a duplicate.
        assert b.submit(DEV, req("d1", "two")) is None

    run(main)


def test_an_id_less_request_is_dropped_only_when_the_broker_marks_it_redelivered() -> None:
    async def main() -> None:
        b, link = bridge()
        assert b.submit(DEV, b"What time is it?") is not None
        assert b.submit(DEV, b"What time is it?", redelivered=True) is None
        # Asked again live (no DUP flag): a device may ask the same question twice.
        assert b.submit(DEV, b"What time is it?") is not None
        await settle(b)
        assert len(link.terminals()) == 2

    run(main)


def test_a_response_topic_outside_the_device_s_replies_is_refused() -> None:
    async def main() -> None:
        b, link = bridge()
        for topic in ("llm/other/res/x", "llm/kitchen/res/", "llm/kitchen/res/+", "elsewhere"):
            assert b.submit(DEV, req("v1"), response_topic=topic, correlation=b"c") is None
        refusals = link.terminals()
        assert len(refusals) == 4
        outside = "response topic must lie under llm/kitchen/res/"
        for s in refusals:
            # Refused on the device's own reply topic, never on the one it named.
            assert s.topic == "llm/kitchen/res/v1"
            assert s.message["error"] == {"code": BAD_REQUEST, "message": outside}
            assert s.properties.CorrelationData == b"c"
        # None of them entered the duplicate table: the request with a good topic is served.
        assert b.submit(DEV, req("v1"), response_topic="llm/kitchen/res/mine") is not None
        await settle(b)
        assert link.terminals()[-1].topic == "llm/kitchen/res/mine"

    run(main)


def test_oversized_v5_properties_are_refused() -> None:
    async def main() -> None:
        b, link = bridge()
        b.submit(DEV, req("v2"), correlation=b"x" * 257)
        b.submit(DEV, req("v3"), response_topic="llm/kitchen/res/" + "r" * 300)
        messages = [s.message["error"]["message"] for s in link.terminals()]
        assert messages == [
            "correlation data is longer than 256 bytes",
            "response topic is longer than 256 bytes",
        ]

    run(main)


class Refuser(Plugin):
    """Refuses every request once, and says how large a request may be."""

    def __init__(self) -> None:
        self.refused_codes: list[str] = []

    def max_request_bytes(self, device: str) -> int:
        return 64

    def admit(self, device: str, request: ChatRequest, size: int) -> None:
        if request.prompt == "no":
            raise ProtocolError("rate_limited", "not now")

    def refused(self, device: str, error: ProtocolError) -> None:
        self.refused_codes.append(error.code)


def test_a_refused_replacement_leaves_the_running_request_its_id() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()  # the first request runs until it is cancelled
        return reply_stream()

    async def main() -> None:
        b, link = bridge(answer, plugins=[Refuser()])
        first = b.submit(DEV, req("d1", "one"))
        assert first is not None and first.task is not None
        assert b.submit(DEV, req("d1", "no")) is None  # refused: it replaces nothing
        assert [s.code for s in link.terminals()] == ["rate_limited"]
        # The running one's record is its own again: its redelivery is still dropped.
        assert b.submit(DEV, req("d1", "one")) is None
        assert b.job(DEV, "d1") is first and not first.task.done()
        first.task.cancel()
        await settle(b)

    run(main)


def test_in_a_group_a_refused_replacement_leaves_the_running_request_its_hold(
    tmp_path: Path,
) -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        return reply_stream()

    async def main() -> None:
        b, _link = bridge(answer, plugins=[Refuser()])
        store = SqliteStore(tmp_path / "shared.sqlite3")
        b.shared = Guarded(store, b.worker)
        b.recent = SharedRecent(b.shared, 600, b.worker)
        first = b.submit(DEV, req("d1", "one"), correlation=b"first")
        assert first is not None and first.task is not None
        assert b.submit(DEV, req("d1", "no"), correlation=b"second") is None
        # Should this worker die now, the running request's terminal goes where it asked.
        (held,) = store.take_holds(b.worker, 0)
        assert (held.key, held.correlation) == ("d1", b"first")
        assert not store.claim(DEV, "d1", digest(req("d1", "one")), time.time(), 600)
        first.task.cancel()
        await settle(b)

    run(main)


def test_a_plugin_refusal_is_answered_every_time_it_is_asked() -> None:
    async def main() -> None:
        plugin = Refuser()
        b, link = bridge(plugins=[plugin])
        assert b.submit(DEV, req("p1", "no")) is None
        assert b.submit(DEV, req("p1", "no")) is None
        assert [s.code for s in link.terminals()] == ["rate_limited", "rate_limited"]
        assert plugin.refused_codes == ["rate_limited", "rate_limited"]

    run(main)


class Broken(Plugin):
    def admit(self, device: str, request: ChatRequest, size: int) -> None:
        raise KeyError("a bug in a plugin")


def test_a_plugin_that_fails_in_admit_still_leaves_the_request_one_terminal() -> None:
    async def main() -> None:
        b, link = bridge(plugins=[Broken()])
        b.router.route(Inbound("llm/kitchen/req", req("b1"), retain=False, qos=1))
        await settle(b)
        assert [(s.topic, s.code) for s in link.terminals()] == [("llm/kitchen/res/b1", "internal")]
        # Its key was given back: the same request asked again is answered, not dropped.
        b.router.route(Inbound("llm/kitchen/req", req("b1"), retain=False, qos=1))
        await settle(b)
        assert [s.code for s in link.terminals()] == ["internal", "internal"]

    run(main)


class CountingStore:
    """A group's SQLite store, recording the calls that the bridge makes to it."""

    def __init__(self, path: Path) -> None:
        self.store = SqliteStore(path)
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.store, name)


def test_in_a_group_a_request_is_claimed_and_held_in_one_call_to_the_store(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        b, link = bridge()
        store = CountingStore(tmp_path / "shared.sqlite3")
        b.shared = Guarded(store, b.worker)  # type: ignore[arg-type]
        b.recent = SharedRecent(b.shared, 600, b.worker)
        assert b.submit(DEV, req("g1")) is not None
        # One round trip (on Redis, from the event loop), and never claimed but not held.
        assert store.calls == ["take"]
        assert b.submit(DEV, req("g1")) is None  # the second delivery is dropped
        assert store.calls == ["take", "take"]
        await settle(b)
        assert store.calls == ["take", "take", "unhold"]
        assert store.store.take_holds(b.worker, 0) == []
        store.calls.clear()
        assert b.submit(DEV, b"no id") is not None  # remembered for a redelivery, and held
        assert store.calls == ["claim", "hold"]
        (held,) = store.store.take_holds(b.worker, 0)
        assert held.topic.startswith("llm/kitchen/res/")
        await settle(b)
        assert len(link.terminals()) == 2

    run(main)


def test_a_refused_request_in_a_group_is_neither_claimed_nor_held(tmp_path: Path) -> None:
    async def main() -> None:
        b, link = bridge(plugins=[Refuser()])
        store = SqliteStore(tmp_path / "shared.sqlite3")
        b.shared = Guarded(store, b.worker)
        b.recent = SharedRecent(b.shared, 600, b.worker)
        assert b.submit(DEV, req("r1", "no")) is None
        assert [s.code for s in link.terminals()] == ["rate_limited"]
        assert store.take_holds(b.worker, 0) == []
        assert store.claim(DEV, "r1", digest(req("r1", "no")), time.time(), 600)

    run(main)


def test_a_plugin_s_size_limit_applies_before_parsing() -> None:
    async def main() -> None:
        plugin = Refuser()
        b, link = bridge(plugins=[plugin])
        assert b.submit(DEV, req("p2", "x" * 64)) is None
        (s,) = link.terminals()
        assert (s.topic, s.code) == ("llm/kitchen/res/p2", TOO_LARGE)
        assert plugin.refused_codes == [TOO_LARGE]

    run(main)


def test_the_same_malformed_bytes_are_answered_once() -> None:
    async def main() -> None:
        b, link = bridge()
        bad = b'{"id":"m1","prompt":'
        assert b.submit(DEV, bad) is None
        assert b.submit(DEV, bad) is None
        assert b.submit(DEV, b'{"id":"m1","prompt":"fixed"}') is not None
        await settle(b)
        assert [s.code for s in link.terminals()] == [BAD_REQUEST, None]

    run(main)


def test_a_request_that_failed_upstream_may_be_asked_again() -> None:
    async def main() -> None:
        answers = [httpx.Response(503, json={"error": {"message": "busy"}}), reply_stream()]
        b, link = bridge(lambda _r: answers.pop(0))
        b.submit(DEV, req("f1"))
        await settle(b)
        assert b.submit(DEV, req("f1")) is not None
        await settle(b)
        codes = [s.code for s in link.terminals()]
        assert codes == ["upstream_status", None]

    run(main)


def test_retained_requests_and_foreign_topics_are_ignored() -> None:
    async def main() -> None:
        b, link = bridge()
        b.router.route(Inbound("llm/kitchen/req", req("r1"), retain=True, qos=1))
        b.router.route(Inbound("llm/bridge/req", req("r2"), retain=False, qos=1))
        b.router.route(Inbound("llm/a+b/req", req("r3"), retain=False, qos=1))
        assert link.sent == [] and b.jobs == {}
        b.router.route(Inbound("llm/kitchen/req", req("r4"), retain=False, qos=1))
        await settle(b)
        assert [s.topic for s in link.terminals()] == ["llm/kitchen/res/r4"]

    run(main)


def test_a_restarted_worker_answers_what_it_held_but_never_journaled(tmp_path: Path) -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        if b"slow" in request.content:
            await asyncio.Event().wait()  # this run's own request: still running
        return reply_stream()

    async def main() -> None:
        b, link = bridge(answer)
        store = SqliteStore(tmp_path / "shared.sqlite3")
        b.shared = Guarded(store, b.worker)
        b.recent = SharedRecent(b.shared, 600, b.worker)
        # The previous run took r1 in hand (claimed and held), then died before its
        # journal had it: nobody would answer it, and its retry would be a duplicate.
        lost = Held(DEV, "r1", "llm/kitchen/res/r1", b"corr")
        assert store.take(b.worker, lost, digest(req("r1")), time.time(), 600)
        running = b.submit(DEV, req("r2", "slow"))  # taken by this run before its recovery
        assert running is not None
        assert b._answer_interrupted(None, b.worker) == 1
        (t,) = link.terminals()
        assert (t.topic, t.code) == ("llm/kitchen/res/r1", "interrupted")
        assert t.message["seq"] == 2**32 - 1  # where it went is known, not how far
        assert t.properties.CorrelationData == b"corr"
        assert [h.key for h in store.take_holds(b.worker, 0)] == ["r2"], "its own is held again"
        assert b.submit(DEV, req("r1")) is not None, "the retry is served"
        assert running.task is not None
        running.task.cancel()
        await settle(b)

    run(main)
