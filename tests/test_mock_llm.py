"""Tests of the mock OpenAI-compatible server (bridge/dev/mock_llm.py).

Why: every bridge test trusts the mock; a mock that silently ignores a
fault directive would make the fault tests pass for nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.dev.mock_llm import (
    FILLER_WORDS,
    REFUSAL_TEXT,
    MockHandle,
    reasoning_tokens,
    reply_tokens,
    running_mock,
)
from tests.streams import OWN

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-123"


def body(prompt: str | list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "mock-1", "messages": [{"role": "user", "content": prompt}], **extra}


def sse_events(text: str) -> list[dict[str, Any]]:
    """Parse an SSE body into events: {"event", "data", "comments"} (WHATWG, LF only)."""
    events: list[dict[str, Any]] = []
    data: list[str] = []
    name = "message"
    comments: list[str] = []
    for line in text.split("\n"):
        if line == "":
            if data:
                events.append({"event": name, "data": "\n".join(data), "comments": comments})
            data, name, comments = [], "message", []
        elif line.startswith(":"):
            comments.append(line)
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
    return events


def chunks(text: str) -> list[dict[str, Any]]:
    return [json.loads(e["data"]) for e in sse_events(text) if e["data"] != "[DONE]"]


def contents(text: str) -> list[str]:
    out = []
    for c in chunks(text):
        if c.get("choices") and "content" in c["choices"][0]["delta"]:
            piece = c["choices"][0]["delta"]["content"]
            if piece:
                out.append(piece)
    return out


@pytest.fixture(scope="module")
def mock() -> Iterator[MockHandle]:
    with running_mock() as handle:
        yield handle


@pytest.fixture
def client(mock: MockHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock.base_url, timeout=10) as c:
        yield c


# --------------------------------------------------------------------------- replies


def test_reply_tokens_shape() -> None:
    toks = reply_tokens("Why is  the sky [mock tokens=3 delay_ms=5] blue?")
    assert "".join(toks) == "You said: Why is the sky blue?."
    assert toks[0] == "You" and all(t.startswith(" ") for t in toks[1:])
    long = reply_tokens("hi", 7)
    assert "".join(long) == "You said: hi. " + " ".join(FILLER_WORDS[:4])
    assert reply_tokens("hi there", 2) == ["You", " said:"]
    assert "".join(reply_tokens("x", images=2)) == "I see 2 images."
    assert "".join(reply_tokens("x", tool_result="42")) == "Tool said: 42"
    assert all(t for t in reply_tokens("", 40))
    assert len(reply_tokens("a", 40)) == 40


def test_stream_matches_reply_tokens_with_usage(client: httpx.Client) -> None:
    prompt = "Tell me [mock tokens=12] about MQTT"
    r = client.post(
        "/chat/completions",
        json=body(prompt, stream=True, stream_options={"include_usage": True}),
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers.get("transfer-encoding") == "chunked"
    events = sse_events(r.text)
    assert events[-1]["data"] == "[DONE]"
    parsed = chunks(r.text)
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert contents(r.text) == reply_tokens(prompt, 12)
    finals = [p for p in parsed if p["choices"] and p["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["stop"]
    usage = parsed[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 12


def test_stream_without_include_usage_has_no_usage_chunk(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=body("hi", stream=True))
    assert all(p["choices"] for p in chunks(r.text))
    assert "".join(contents(r.text)) == "You said: hi."


def test_non_stream_completion(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=body([{"type": "text", "text": "parts work"}]))
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"]
    assert data["model"] == "mock-1"
    assert data["choices"][0]["message"]["content"] == "You said: parts work."
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 4


def test_max_tokens_gives_length(client: httpx.Client) -> None:
    prompt = "[mock tokens=10] x"
    r = client.post("/chat/completions", json=body(prompt, stream=True, max_tokens=3))
    assert contents(r.text) == reply_tokens(prompt, 10)[:3]
    assert chunks(r.text)[-1]["choices"][0]["finish_reason"] == "length"
    r = client.post("/chat/completions", json=body(prompt, max_completion_tokens=4))
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] == "".join(reply_tokens(prompt, 4))


def test_last_user_message_images_and_tool_result(client: httpx.Client) -> None:
    parts = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    r = client.post("/chat/completions", json=body(parts))
    assert r.json()["choices"][0]["message"]["content"] == "I see 1 image."
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    r = client.post("/chat/completions", json={"messages": messages})
    assert r.json()["choices"][0]["message"]["content"] == "You said: second."
    messages += [
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    r = client.post("/chat/completions", json={"messages": messages, "stream": True})
    assert "".join(contents(r.text)) == "Tool said: 21 degrees"


def test_tool_call_stream(client: httpx.Client) -> None:
    tools = [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "other"}},
    ]
    prompt = "please call tool for the weather"
    r = client.post("/chat/completions", json=body(prompt, stream=True, tools=tools))
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks(r.text)
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert len(calls) >= 3
    assert all(c["index"] == 0 for c in calls)
    assert calls[0]["id"] and calls[0]["function"]["name"] == "lookup"
    args = "".join(c["function"].get("arguments", "") for c in calls)
    assert json.loads(args) == {"q": prompt}
    assert chunks(r.text)[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # without tools the same prompt is answered normally; tool=1 also triggers
    r = client.post("/chat/completions", json=body(prompt, stream=True))
    assert "".join(contents(r.text)) == "".join(reply_tokens(prompt))
    r = client.post("/chat/completions", json=body("[mock tool=1] go", tools=tools))
    message = r.json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q":"go"}'}
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"


# --------------------------------------------------------------------------- HTTP


def test_auth_models_health_and_errors() -> None:
    with running_mock(api_key=KEY) as m, httpx.Client(base_url=m.base_url) as c:
        r = c.post("/chat/completions", json=body("hi"))
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/chat/completions", json=body("hi"), headers={"Authorization": "Bearer no"})
        assert r.status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        r = c.post("/chat/completions", json=body("hi"), headers=auth)
        assert r.status_code == 200
        models = c.get("/models", headers=auth).json()
        assert models["object"] == "list"
        assert models["data"][0] == {
            "id": "mock-1",
            "object": "model",
            "created": 0,
            "owned_by": "mock",
        }
        health = c.get(f"http://127.0.0.1:{m.port}/health")
        assert (health.status_code, health.text) == (200, "ok")
        r = c.get("/nope", headers=auth)
        assert r.status_code == 404 and "error" in r.json()
        r = c.post("/chat/completions", content=b"{not json", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["message"]
        r = c.post("/chat/completions", json={"messages": "x"}, headers=auth)
        assert r.status_code == 400
        r = c.post("/chat/completions", json=body("[mock tokens=abc]"), headers=auth)
        assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]


def test_echo_auth_puts_the_authorization_header_in_the_error() -> None:
    """A careless upstream echoing the key, whole or shortened, in its error bodies and events."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with running_mock(api_key=KEY) as m, httpx.Client(base_url=m.base_url, headers=auth) as c:
        r = c.post("/chat/completions", json=body("[mock status=401 echo_auth=5] hi"))
        assert r.status_code == 401
        assert r.json()["error"]["message"] == f"xxxxxIncorrect API key provided: Bearer {KEY}"
        r = c.post("/chat/completions", json=body("[mock status=400 echo_auth echo_keep=8] hi"))
        message = r.json()["error"]["message"]
        assert message == "xIncorrect API key provided: Bearer s\u2026test-123"
        stream = body("[mock tokens=3 error_event_at=1 echo_auth=0] hi", stream=True)
        events = sse_events(c.post("/chat/completions", json=stream).text)
        error = json.loads(events[-1]["data"])["error"]
        assert error["message"] == f"Incorrect API key provided: Bearer {KEY}"


def test_status_retry_after_and_fail_times(mock: MockHandle, client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=body("[mock status=429 retry_after=2] hi"))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    r = client.post("/chat/completions", json=body("x"), headers={"X-Mock": "status=503"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    prompt = "[mock status=500 fail_times=2 run=ft1] hello"
    statuses = [
        client.post("/chat/completions", json=body(prompt, stream=True)).status_code
        for _ in range(4)
    ]
    assert statuses == [500, 500, 200, 200]
    other = client.post("/chat/completions", json=body(prompt.replace("ft1", "ft2")))
    assert other.status_code == 500  # another directive string has its own counter
    mock.server.reset_fail_counts()
    assert client.post("/chat/completions", json=body(prompt)).status_code == 500


def test_header_directive_wins(client: httpx.Client) -> None:
    prompt = "[mock tokens=9] hi"
    r = client.post("/chat/completions", json=body(prompt), headers={"X-Mock": "tokens=4"})
    assert r.json()["choices"][0]["message"]["content"] == "".join(reply_tokens(prompt, 4))


def test_cut_after_breaks_the_body(client: httpx.Client) -> None:
    prompt = "[mock tokens=10 cut_after=3] cut me"
    got: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/chat/completions", json=body(prompt, stream=True)) as r,
    ):
        assert r.status_code == 200
        got.extend(r.iter_lines())
    text = "\n".join(got) + "\n\n"
    assert contents(text) == reply_tokens(prompt, 10)[:3]
    assert "[DONE]" not in text and 'finish_reason":"stop' not in text
    # the client's pool recovers: the next request on the same client works
    assert client.post("/chat/completions", json=body("after")).status_code == 200


def test_malformed_at(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=body("[mock tokens=5 malformed_at=2] m", stream=True))
    datas = [e["data"] for e in sse_events(r.text)]
    assert datas[-1] == "[DONE]"
    bad = []
    for i, d in enumerate(datas[:-1]):
        try:
            json.loads(d)
        except ValueError:
            bad.append(i)
    assert bad == [2]  # role chunk, content 1, then the broken content 2


@pytest.mark.parametrize("key", ["error_event_at", "event_error_at"])
def test_error_events(client: httpx.Client, key: str) -> None:
    r = client.post("/chat/completions", json=body(f"[mock tokens=6 {key}=2] e", stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    last = events[-1]
    assert json.loads(last["data"])["error"]["code"] == "mock_error"
    assert last["event"] == ("error" if key == "event_error_at" else "message")
    assert all(e["data"] != "[DONE]" for e in events)
    assert len(contents(r.text)) == 2


def test_hang_until_read_timeout(mock: MockHandle) -> None:
    timeout = httpx.Timeout(5, read=0.3)
    with httpx.Client(base_url=mock.base_url, timeout=timeout) as c:
        start = time.monotonic()
        with (
            pytest.raises(httpx.ReadTimeout),
            c.stream("POST", "/chat/completions", json=body("[mock hang=1] h", stream=True)) as r,
        ):
            assert r.status_code == 200
            r.read()
        assert 0.25 < time.monotonic() - start < 3


def test_delays(client: httpx.Client) -> None:
    start = time.monotonic()
    r = client.post("/chat/completions", json=body("[mock first_byte_delay_ms=200] x"))
    assert r.status_code == 200 and time.monotonic() - start >= 0.19
    arrivals = []
    start = time.monotonic()
    with client.stream(
        "POST", "/chat/completions", json=body("[mock tokens=5 delay_ms=60] x", stream=True)
    ) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    assert arrivals[-1] >= 0.28
    assert arrivals[-1] - arrivals[0] >= 0.2  # they arrive spread out, not in one write


def test_server_default_delay() -> None:
    with running_mock(delay_ms=40) as m, httpx.Client(base_url=m.base_url) as c:
        start = time.monotonic()
        c.post("/chat/completions", json=body("[mock tokens=5] x", stream=True))
        assert time.monotonic() - start >= 0.19
        start = time.monotonic()
        c.post("/chat/completions", json=body("[mock tokens=5 delay_ms=0] x", stream=True))
        assert time.monotonic() - start < 0.19  # the directive beat the server's 40 ms


def test_reasoning_refusal_keepalive_content_type(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=body("[mock reasoning=3 tokens=2] r", stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks(r.text) if c["choices"]]
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    assert reasoning == reasoning_tokens(3)
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert first_content > max(i for i, d in enumerate(deltas) if "reasoning_content" in d)

    r = client.post("/chat/completions", json=body("[mock refusal=1] r", stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks(r.text) if c["choices"]]
    assert "".join(d.get("refusal", "") for d in deltas) == REFUSAL_TEXT
    assert not any(d.get("content") for d in deltas)

    r = client.post("/chat/completions", json=body("[mock keepalive=1 tokens=3] k", stream=True))
    assert r.text.count(": keep-alive\n") >= 5
    assert contents(r.text) == reply_tokens("k", 3)

    r = client.post("/chat/completions", json=body("[mock content_type=text/plain] c", stream=True))
    assert r.headers["content-type"] == "text/plain"


def test_stamp(client: httpx.Client) -> None:
    got: list[tuple[int, int]] = []
    with client.stream(
        "POST", "/chat/completions", json=body("[mock stamp=1 tokens=4 delay_ms=30] s", stream=True)
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                got.append((int(delta["content"].rstrip()), time.monotonic_ns()))
    assert len(got) == 4
    stamps = [s for s, _ in got]
    assert all(b - a >= 25_000_000 for a, b in itertools.pairwise(stamps))
    assert all(0 <= recv - sent < 1_000_000_000 for sent, recv in got)


# --------------------------------------------------------------------------- corpus

CORPUS = OWN


@pytest.mark.parametrize(
    "name",
    [
        "openai_text_usage_chunk",
        "crlf_line_endings",
        "cr_line_endings",
        "truncated_mid_event",
        "multi_events_per_read",
        "utf8_split_across_reads",
    ],
)
def test_corpus_replay_byte_exact(client: httpx.Client, name: str) -> None:
    """The project's own provider streams (the default corpus), byte for byte, in their reads."""
    expected = (CORPUS / f"{name}.sse").read_bytes()
    meta = json.loads((CORPUS / f"{name}.json").read_text())
    pieces: list[bytes] = []
    with client.stream("POST", "/chat/completions", json=body(f"[mock corpus={name}]")) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        pieces.extend(r.iter_raw())
    assert b"".join(pieces) == expected
    bounds = meta.get("transport", {}).get("chunk_boundaries")
    if bounds:
        offsets = set()
        total = 0
        for p in pieces:
            total += len(p)
            offsets.add(total)
        assert set(bounds) <= offsets


def test_corpus_split_and_missing(client: httpx.Client) -> None:
    expected = (CORPUS / "mistral_text.sse").read_bytes()
    headers = {"X-Mock": "corpus=mistral_text split=64"}
    with client.stream("POST", "/chat/completions", json=body("x"), headers=headers) as r:
        pieces = list(r.iter_raw())
    assert b"".join(pieces) == expected
    assert len(pieces) >= len(expected) // 64 and max(map(len, pieces)) <= 64
    r = client.post("/chat/completions", json=body("[mock corpus=../etc/passwd]"))
    assert r.status_code == 404
    r = client.post("/chat/completions", json=body("[mock corpus=no_such_case]"))
    assert r.status_code == 404


# --------------------------------------------------------------------------- connections


def test_keep_alive_reuses_one_connection() -> None:
    with running_mock(api_key=KEY) as m, httpx.Client(base_url=m.base_url) as c:
        auth = {"Authorization": f"Bearer {KEY}"}
        for i in range(5):
            r = c.post("/chat/completions", json=body(f"n{i}", stream=True), headers=auth)
            assert "".join(contents(r.text)) == f"You said: n{i}."
            assert c.post("/chat/completions", json=body("x")).status_code == 401
            assert c.get("/missing", headers=auth).status_code == 404
            r = c.post("/chat/completions", json=body("[mock status=429]"), headers=auth)
            assert r.status_code == 429
        assert m.server.connections == 1


def test_200_concurrent_streams() -> None:
    n = 200

    async def main(base_url: str) -> list[str]:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as c:

            async def one(i: int) -> str:
                r = await c.post(
                    "/chat/completions", json=body(f"[mock delay_ms=40 tokens=8] c{i}", stream=True)
                )
                return "".join(contents(r.text))

            return await asyncio.gather(*(one(i) for i in range(n)))

    with running_mock() as m:
        texts = asyncio.run(main(m.base_url))
        assert texts == ["".join(reply_tokens(f"c{i}", 8)) for i in range(n)]
        assert m.server.peak_connections >= n // 2  # they really overlapped


def test_fast_mode_long_reply(client: httpx.Client) -> None:
    """Fast mode (no delay) sends a long reply whole; its speed is measured in bench/."""
    r = client.post("/chat/completions", json=body("[mock tokens=20000] f", stream=True))
    assert r.text.count('"content":"') == 20001  # role chunk + 20000 tokens


def test_mock_requests_endpoint() -> None:
    with running_mock(api_key=KEY) as m, httpx.Client(base_url=m.base_url) as c:
        auth = {"Authorization": f"Bearer {KEY}", "X-Custom": "Yes"}
        c.post("/chat/completions", json=body("rec", temperature=0.5), headers=auth)
        root = f"http://127.0.0.1:{m.port}"
        recorded = c.get(f"{root}/mock/requests").json()
        assert len(recorded) == 1
        entry = recorded[0]
        assert entry["method"] == "POST" and entry["path"] == "/v1/chat/completions"
        assert entry["headers"]["authorization"] == f"Bearer {KEY}"
        assert entry["headers"]["x-custom"] == "Yes"
        assert entry["body"]["temperature"] == 0.5
        assert m.server.requests == recorded
        assert c.delete(f"{root}/mock/requests").status_code == 200
        assert c.get(f"{root}/mock/requests").json() == []
        for i in range(1005):
            m.server.record("GET", f"/{i}", {}, None)
        assert len(m.server.requests) == 1000
        assert m.server.requests[-1]["path"] == "/1004"


def test_https(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    with running_mock(ssl_context=server_ctx) as m:
        assert m.base_url.startswith("https://127.0.0.1:")
        with httpx.Client(base_url=m.base_url, verify=client_ctx) as c:
            r = c.post("/chat/completions", json=body("secure", stream=True))
            assert "".join(contents(r.text)) == "You said: secure."
        with pytest.raises(httpx.ConnectError), httpx.Client(base_url=m.base_url) as c:
            c.get("/models")  # not trusted by the default CAs


def test_cli_runs_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.dev.mock_llm", "--port", "0", "--api-key", KEY],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("mock LLM listening on http://127.0.0.1:")
        base = line.rsplit(" ", 1)[1]
        r = httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.json()["data"][0]["id"] == "mock-1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _streamed_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls of a streamed reply, assembled from their fragments by index."""
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks(text):
        for frag in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            call = calls.setdefault(frag["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or frag.get("id", "")
            call["name"] = call["name"] or frag.get("function", {}).get("name", "")
            call["arguments"] += frag.get("function", {}).get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def test_scripted_tool_calls_for_several_rounds_then_the_results(client: httpx.Client) -> None:
    tools = [
        {"type": "function", "function": {"name": "lamp__set_led"}},
        {"type": "function", "function": {"name": "read_temp"}},
    ]
    prompt = "[mock call=set_led(on:true;level:3;who:me)+read_temp rounds=2] lamp on"
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    for round_ in range(2):
        r = client.post(
            "/chat/completions", json={"messages": messages, "tools": tools, "stream": True}
        )
        calls = _streamed_calls(r.text)
        assert [c["name"] for c in calls] == ["lamp__set_led", "read_temp"]
        assert json.loads(calls[0]["arguments"]) == {"on": True, "level": 3, "who": "me"}
        assert json.loads(calls[1]["arguments"]) == {}
        assert len({c["id"] for c in calls}) == 2
        assert chunks(r.text)[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls
            ],
        }  # fmt: skip
        results = [
            {"role": "tool", "tool_call_id": c["id"], "content": f"r{round_}{i}"}
            for i, c in enumerate(calls)
        ]
        messages += [assistant, *results]
    r = client.post("/chat/completions", json={"messages": messages, "tools": tools})
    answer = r.json()["choices"][0]
    assert answer["finish_reason"] == "stop"
    assert answer["message"]["content"] == "Tool said: r10; r11"


def test_scripted_call_of_an_unknown_tool_and_cut_arguments(client: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "set_led"}}]
    r = client.post(
        "/chat/completions",
        json=body("[mock call=launch(x:1) bad_args] go", tools=tools),
    )
    call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "launch"
    with pytest.raises(ValueError):
        json.loads(call["arguments"])
