"""Every recorded provider stream in shared/sse-corpus, through the real bridge.

The mock LLM replays each body byte for byte (`[mock corpus=NAME]`), whole,
at its recorded read boundaries, and cut into small reads (`split=K`); the
device must get exactly the reply the corpus says a client must assemble.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bridge.core.errors import ProtocolError
from bridge.core.reply import ReplyFold
from bridge.core.settings import load_settings
from bridge.core.upstream import Upstream, UpstreamError
from bridge.dev.mock_llm import default_corpus_dir
from tests.harness import BridgeProcess, Device

CORPUS = default_corpus_dir()
CASES = sorted(p.stem for p in CORPUS.glob("*.sse")) if CORPUS else []


def test_corpus_is_there() -> None:
    assert CORPUS is not None, "shared/sse-corpus must sit beside the repository"
    assert len(CASES) == 42


def _case(name: str) -> dict[str, Any]:
    assert CORPUS is not None
    return json.loads((CORPUS / f"{name}.json").read_text())


def _check(name: str, reply_messages: list[dict[str, Any]]) -> None:
    case = _case(name)
    expect = case["expect"]
    text = "".join(m.get("delta", "") for m in reply_messages)
    refusal = "".join(m.get("refusal", "") for m in reply_messages)
    terminal = reply_messages[-1]
    assert text == expect["content"], name
    assert refusal == (expect["refusal"] or ""), name
    complete = expect["finish_reason"] is not None or case["stream_facts"]["ends_with_done"]
    if expect["error"] is not None:
        assert terminal["error"]["code"] == "upstream_error", terminal
        assert expect["error"]["message"] in terminal["error"]["message"]
    elif complete:
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
@pytest.mark.parametrize("name", CASES)
def test_corpus_through_bridge(bridge: BridgeProcess, device: Device, name: str, cut: str) -> None:
    """Over the network: at the recorded read boundaries, and in 61-byte reads."""
    reply = device.ask({"id": "c1", "prompt": f"[mock corpus={name}{cut}]"}, timeout=30)
    _check(name, reply.messages)
    # No reasoning ever reaches the device.
    reasoning = _case(name)["expect"]["reasoning"]
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
@pytest.mark.parametrize("name", CASES)
def test_upstream_reads_any_cut(name: str, how: str) -> None:
    """The upstream reader (httpx + httpx-sse + fold) gets the same reply whatever the reads.

    `bytes` hands it one byte per read (every UTF-8 character and CRLF split);
    the random cuts are seeded, so a failure repeats.
    """
    assert CORPUS is not None
    data = (CORPUS / f"{name}.sse").read_bytes()
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
    expect = _case(name)["expect"]
    if expect["error"] is not None:
        assert code == "upstream_error"
        return
    _check(name, messages)


@pytest.mark.parametrize("name", CASES)
def test_fold_matches_corpus_unstreamed(name: str) -> None:
    """The fold alone, fed the events as the SSE rules cut them (a unit check of reply.py)."""
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    assert CORPUS is not None
    body = (CORPUS / f"{name}.sse").read_bytes().decode()
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
    expect = _case(name)["expect"]
    assert fold.text == expect["content"]
    assert (fold.refusal or None) == expect["refusal"]
    assert (error is not None) == (expect["error"] is not None)
    if error is None:
        assert fold.finish_reason == expect["finish_reason"]
        assert fold.usage == expect["usage"]


def test_unstreamed_request_gets_whole_text(bridge: BridgeProcess, device: Device) -> None:
    """`stream: false` over a recorded stream: no chunks, one terminal with the whole text."""
    name = "openai_text_include_usage"
    reply = device.ask({"id": "u1", "prompt": f"[mock corpus={name}]", "stream": False})
    assert len(reply.messages) == 1
    assert reply.terminal["text"] == _case(name)["expect"]["content"]
    assert reply.terminal["usage"] == _case(name)["expect"]["usage"]


def test_refusal_unstreamed(bridge: BridgeProcess, device: Device) -> None:
    name = "openai_refusal"
    reply = device.ask({"id": "u2", "prompt": f"[mock corpus={name}]", "stream": False})
    assert reply.terminal["refusal"] == _case(name)["expect"]["refusal"]
    assert reply.terminal["text"] == ""


def test_lone_surrogate_from_the_api_is_replaced_not_fatal() -> None:
    """JSON may carry half a UTF-16 pair (`\\ud83d`); the device gets U+FFFD, not an error."""
    fold = ReplyFold("m")
    pieces = fold.feed("", '{"choices":[{"index":0,"delta":{"content":"a\\ud83db"}}]}')
    from bridge.core.protocol import delta_message

    assert json.loads(delta_message(0, pieces[0][1])) == {"seq": 0, "delta": "a\ufffdb"}
