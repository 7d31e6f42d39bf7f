"""Every provider stream the bridge must handle, through the real bridge.

The project's own fixtures (tests/fixtures/streams, one small case per
provider behaviour) always run; the recorded corpus in ../shared/sse-corpus
runs as well when it sits beside the clone (CI), and is skipped with the
reason otherwise. The mock LLM replays each body byte for byte
(`[mock corpus=NAME]`), whole, at its recorded read boundaries, and cut into
small reads (`split=K`); the device must get exactly the reply the case says
a client must assemble.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from bridge.core.errors import ProtocolError
from bridge.core.reply import ReplyFold
from bridge.core.settings import load_settings
from bridge.core.upstream import Upstream, UpstreamError
from bridge.dev.mock_llm import default_corpus_dir, running_mock
from tests.harness import API_KEY, BridgeProcess, Broker, Device, bridge_env, wait_for_status
from tests.streams import NO_SHARED, OWN, SHARED, Case, cases, load, names

CASES = cases()
#: The keys of every `expect` (the recorded corpus uses the same).
EXPECT_KEYS = {"content", "reasoning", "refusal", "tool_calls", "finish_reason", "usage", "error"}


def test_own_fixtures_are_whole_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each own case is a body plus its expected reply, and the mock serves them by default."""
    stems = {p.stem for p in OWN.iterdir() if p.suffix in (".sse", ".json")}
    assert len(stems) >= 40
    for name in stems:
        assert (OWN / f"{name}.sse").is_file(), name
        assert (OWN / f"{name}.json").is_file(), name
        case = load("own", name)
        assert set(case.expect) == EXPECT_KEYS, name
        assert len(case.body) < 4096, f"{name}: keep fixtures small"
    monkeypatch.delenv("MOCK_LLM_CORPUS_DIR", raising=False)
    assert default_corpus_dir() == OWN


@pytest.mark.skipif(SHARED is None, reason=NO_SHARED)
def test_shared_corpus_is_whole() -> None:
    assert SHARED is not None
    assert len(names(SHARED)) == 42


@pytest.mark.skipif(SHARED is None, reason=NO_SHARED)
def test_own_fixtures_are_not_copies_of_the_corpus() -> None:
    """The corpus's files must never enter the repository: no body, no event copied."""
    assert SHARED is not None
    corpus_events = set()
    for name in names(SHARED):
        body = (SHARED / f"{name}.sse").read_bytes()
        corpus_events |= {line.strip() for line in body.splitlines() if len(line) > 40}
    for name in names(OWN):
        body = (OWN / f"{name}.sse").read_bytes()
        copied = [line for line in body.splitlines() if line.strip() in corpus_events]
        assert not copied, f"{name} holds an event of the recorded corpus: {copied[0][:80]!r}"


@pytest.fixture(scope="module")
def corpus_prefix(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A mock replaying ../shared/sse-corpus and a bridge on a topic prefix of its own."""
    assert SHARED is not None
    with running_mock(api_key=API_KEY, corpus_dir=SHARED) as mock:
        prefix = "corpus"
        env = bridge_env(broker, mock.base_url, BRIDGE_TOPIC_PREFIX=prefix)
        proc = BridgeProcess(tmp_path_factory.mktemp("corpus-bridge"), env).start()
        wait_for_status(broker, prefix, "online")
        yield prefix
        proc.stop()
        assert API_KEY not in proc.logs()


@pytest.fixture
def replay(
    request: pytest.FixtureRequest, make_device: Callable[..., Device]
) -> Callable[[str], Device]:
    """A device whose `[mock corpus=NAME]` requests reach the mock serving `source`."""

    def device_for(source: str) -> Device:
        if source == "own":
            request.getfixturevalue("bridge")
            return make_device()
        return make_device(prefix=request.getfixturevalue("corpus_prefix"))

    return device_for


def _check(case: Case, reply_messages: list[dict[str, Any]]) -> None:
    name = case.name
    expect = case.expect
    text = "".join(m.get("delta", "") for m in reply_messages)
    refusal = "".join(m.get("refusal", "") for m in reply_messages)
    terminal = reply_messages[-1]
    assert text == expect["content"], name
    assert refusal == (expect["refusal"] or ""), name
    if expect["error"] is not None:
        assert terminal["error"]["code"] == "upstream_error", terminal
        assert expect["error"]["message"] in terminal["error"]["message"]
    elif case.complete:
        assert terminal.get("done") is True, terminal
        assert terminal["finish_reason"] == expect["finish_reason"]
        assert terminal["usage"] == expect["usage"]
        calls = [
            {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in terminal.get("tool_calls", [])
        ]
        assert calls == expect["tool_calls"], name
    else:
        assert terminal["error"]["code"] == "upstream_protocol", terminal


@pytest.mark.parametrize("cut", ["", " split=61"])
@pytest.mark.parametrize(("source", "name"), CASES)
def test_corpus_through_bridge(
    replay: Callable[[str], Device], source: str, name: str, cut: str
) -> None:
    """Over the network: at the recorded read boundaries, and in 61-byte reads."""
    case = load(source, name)
    device = replay(source)
    reply = device.ask({"id": "c1", "prompt": f"[mock corpus={name}{cut}]"}, timeout=30)
    _check(case, reply.messages)
    # No reasoning ever reaches the device.
    reasoning = case.expect["reasoning"]
    if reasoning:
        assert reasoning not in reply.text


def _cuts(size: int, how: str) -> list[int]:
    if how == "bytes":
        return list(range(1, size))
    rng = random.Random(f"{how}-{size}")
    return sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 60))))


class _SlicedBody(httpx.AsyncByteStream):
    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.slices = [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.slices:
            yield piece


@pytest.mark.parametrize("how", ["bytes", "random1", "random2", "random3"])
@pytest.mark.parametrize(("source", "name"), CASES)
def test_upstream_reads_any_cut(source: str, name: str, how: str) -> None:
    """The upstream reader (httpx + httpx-sse + fold) gets the same reply whatever the reads.

    `bytes` hands it one byte per read (every UTF-8 character and CRLF split);
    the random cuts are seeded, so a failure repeats.
    """
    case = load(source, name)
    data = case.body
    cuts = _cuts(len(data), how)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_SlicedBody(data, cuts)
        )

    async def run() -> tuple[list[dict[str, Any]], str | None]:
        settings = load_settings(OPENAI_BASE_URL="http://upstream.test/v1")
        up = Upstream(settings, transport=httpx.MockTransport(handler))
        fold = ReplyFold("m", keep_text=True)
        messages: list[dict[str, Any]] = []
        code = None
        try:
            async with up.stream({"model": "m"}) as events:
                async for event, sse_data in events:
                    for kind, text in fold.feed(event, sse_data):
                        messages.append({kind: text})
                    if fold.done:
                        break
        except ProtocolError as exc:
            code = exc.code
        except UpstreamError as exc:
            code = exc.code
        finally:
            await up.aclose()
        if code is None and not fold.complete:
            code = "upstream_protocol"
        if code is None:
            messages.append(
                {"done": True, "finish_reason": fold.finish_reason, "usage": fold.usage,
                 "tool_calls": fold.tool_calls}
            )  # fmt: skip
        else:
            messages.append({"error": {"code": code, "message": str(code)}})
        return messages, code

    messages, code = asyncio.run(run())
    if case.expect["error"] is not None:
        assert code == "upstream_error"
        return
    _check(case, messages)


@pytest.mark.parametrize(("source", "name"), CASES)
def test_fold_matches_corpus_unstreamed(source: str, name: str) -> None:
    """The fold alone, fed the events as the SSE rules cut them (a unit check of reply.py)."""
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    case = load(source, name)
    body = case.body.decode()
    lines = SSELineDecoder().decode(body)
    decoder = SSEDecoder()
    fold = ReplyFold("m", keep_text=True)
    error = None
    for line in lines:
        sse = decoder.decode(line)
        if sse is None:
            continue
        try:
            fold.feed(sse.event, sse.data)
        except ProtocolError as exc:
            error = exc
            break
        if fold.done:
            break
    expect = case.expect
    assert fold.text == expect["content"]
    assert (fold.refusal or None) == expect["refusal"]
    assert (error is not None) == (expect["error"] is not None)
    if error is None:
        assert fold.finish_reason == expect["finish_reason"]
        assert fold.usage == expect["usage"]


def test_unstreamed_request_gets_whole_text(bridge: BridgeProcess, device: Device) -> None:
    """`stream: false` over a provider stream: no chunks, one terminal with the whole text."""
    case = load("own", "openai_text_usage_chunk")
    reply = device.ask({"id": "u1", "prompt": f"[mock corpus={case.name}]", "stream": False})
    assert len(reply.messages) == 1
    assert reply.terminal["text"] == case.expect["content"]
    assert reply.terminal["usage"] == case.expect["usage"]


def test_refusal_unstreamed(bridge: BridgeProcess, device: Device) -> None:
    case = load("own", "openai_refusal")
    reply = device.ask({"id": "u2", "prompt": f"[mock corpus={case.name}]", "stream": False})
    assert reply.terminal["refusal"] == case.expect["refusal"]
    assert reply.terminal["text"] == ""


def test_lone_surrogate_from_the_api_is_replaced_not_fatal() -> None:
    """JSON may carry half a UTF-16 pair (`\\ud83d`); the device gets U+FFFD, not an error."""
    fold = ReplyFold("m")
    pieces = fold.feed("", '{"choices":[{"index":0,"delta":{"content":"a\\ud83db"}}]}')
    from bridge.core.protocol import delta_message

    assert json.loads(delta_message(0, pieces[0][1])) == {"seq": 0, "delta": "a\ufffdb"}
