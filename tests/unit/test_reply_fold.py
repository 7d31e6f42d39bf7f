"""`ReplyFold`: provider chunks in, the pieces a device gets and the reply's end out.

The streams are `httpx.Response`s built in memory and read with httpx-sse, as the
upstream client reads them (the style of httpx-sse's own tests).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource

from bridge.core.errors import UPSTREAM_ERROR, UPSTREAM_PROTOCOL, ProtocolError
from bridge.core.reply import DELTA, REFUSAL, ReplyFold


def response(body: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> str:
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}}
    if finish is not None:
        choice["finish_reason"] = finish
    return f"data: {json.dumps({'choices': [choice], **top})}\n\n"


def fold(body: str, keep_text: bool = True) -> tuple[ReplyFold, list[tuple[str, str]]]:
    """Feed every event of `body` to a new fold; return it and all the pieces it gave."""
    f = ReplyFold("asked-model", keep_text=keep_text)
    pieces: list[tuple[str, str]] = []
    for sse in EventSource(response(body)).iter_sse():
        pieces += f.feed(sse.event, sse.data)
    return f, pieces


def test_content_pieces_come_out_in_order_and_the_end_is_kept() -> None:
    body = (
        chunk({"role": "assistant", "content": ""}, model="gpt-x")
        + chunk({"content": "Hel"})
        + chunk({"content": "lo"})
        + chunk(finish="stop")
        + 'data: {"choices":[],"usage":{"total_tokens":7}}\n\n'
        + "data: [DONE]\n\n"
    )
    f, pieces = fold(body)
    assert pieces == [(DELTA, "Hel"), (DELTA, "lo")]
    assert (f.text, f.finish_reason, f.usage, f.model) == ("Hello", "stop", {"total_tokens": 7},
                                                           "gpt-x")  # fmt: skip
    assert f.done and f.complete and f.chars == 5


def test_without_keep_text_the_text_is_not_held() -> None:
    f, pieces = fold(chunk({"content": "abc"}, finish="stop"), keep_text=False)
    assert pieces == [(DELTA, "abc")] and f.text == "" and f.chars == 3


def test_the_model_asked_for_stands_when_the_provider_names_none() -> None:
    f, _ = fold(chunk({"content": "x"}, finish="stop"))
    assert f.model == "asked-model"


def test_only_choice_0_is_published() -> None:
    body = 'data: {"choices":[{"index":1,"delta":{"content":"other"}},' \
           '{"index":0,"delta":{"content":"mine"}}]}\n\n'  # fmt: skip
    assert fold(body)[1] == [(DELTA, "mine")]


def test_reasoning_is_never_published() -> None:
    body = chunk({"reasoning_content": "thinking..."}) + chunk({"reasoning": "more"})
    f, pieces = fold(body + chunk({"content": "answer"}, finish="stop"))
    assert pieces == [(DELTA, "answer")] and f.chars == 6


def test_content_given_as_parts_is_published_as_text() -> None:
    body = chunk({"content": [{"type": "text", "text": "a"}, {"type": "image"},
                              {"type": "text", "text": "b"}]})  # fmt: skip
    assert fold(body)[1] == [(DELTA, "a"), (DELTA, "b")]


def test_refusal_pieces_are_published_and_joined() -> None:
    f, pieces = fold(chunk({"refusal": "I can't "}) + chunk({"refusal": "help"}, finish="stop"))
    assert pieces == [(REFUSAL, "I can't "), (REFUSAL, "help")]
    assert f.refusal == "I can't help" and f.text == ""


def test_tool_call_fragments_are_joined_by_index() -> None:
    body = (
        chunk(
            {"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "b", "arguments": ""}}]}
        )
        + chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "a"}}]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]})
        + chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]})
        + chunk(
            {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, finish="tool_calls"
        )
    )
    f, pieces = fold(body)
    assert pieces == []
    assert f.tool_calls == [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x":1}'}},
        {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
    ]
    assert f.finish_reason == "tool_calls"


def test_tool_call_fragments_without_an_index_follow_their_id() -> None:
    body = (
        chunk({"tool_calls": [{"id": "c1", "function": {"name": "a", "arguments": "{"}}]})
        + chunk({"tool_calls": [{"function": {"arguments": "}"}}]})
        + chunk({"tool_calls": [{"id": "c2", "function": {"name": "b", "arguments": "[]"}}]})
    )
    calls = fold(body)[0].tool_calls
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [("c1", "{}"), ("c2", "[]")]


def test_the_last_finish_reason_and_usage_win() -> None:
    body = chunk(finish="length") + chunk(finish="stop", usage={"total_tokens": 1}) + chunk(
        usage={"total_tokens": 2})  # fmt: skip
    f, _ = fold(body)
    assert (f.finish_reason, f.usage) == ("stop", {"total_tokens": 2})


@pytest.mark.parametrize(
    "body",
    [
        'data: {"choices":[{"index":0,"delta":{},"usage":{"total_tokens":4}}]}\n\n',
        'data: {"choices":[],"x_groq":{"usage":{"total_tokens":4}}}\n\n',
    ],
)
def test_usage_is_found_where_providers_put_it(body: str) -> None:
    assert fold(body)[0].usage == {"total_tokens": 4}


def test_a_stream_cut_before_its_end_is_not_complete() -> None:
    f, _ = fold(chunk({"content": "half"}))
    assert not f.complete


def test_a_finish_reason_without_done_is_complete() -> None:
    f, _ = fold(chunk({"content": "x"}, finish="stop"))
    assert f.complete and not f.done


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ('data: {"error":{"message":"overloaded","code":529}}\n\n', UPSTREAM_ERROR,
         "overloaded (529)"),
        ('event: error\ndata: {"message":"boom","type":"server"}\n\n', UPSTREAM_ERROR,
         "boom (server)"),
        ("event: error\ndata: plain words\n\n", UPSTREAM_ERROR, "plain words"),
        ("data: {not json\n\n", UPSTREAM_PROTOCOL, "malformed event from the API"),
        ("data: [1, 2]\n\n", UPSTREAM_PROTOCOL, "not a JSON object"),
    ],
)  # fmt: skip
def test_errors_inside_the_stream_end_the_reply(body: str, code: str, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        fold(chunk({"content": "before"}) + body)
    assert caught.value.code == code
    assert words in caught.value.message


def test_comments_and_empty_events_give_nothing() -> None:
    _, pieces = fold(": keep-alive\n\n" + "event: ping\ndata:\n\n" + chunk({"content": "x"}))
    assert pieces == [(DELTA, "x")]
