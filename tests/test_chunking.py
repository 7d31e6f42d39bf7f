"""Device-friendly chunking (chunk_bytes, chunk_ms, chunk_sentences) and the crash journal."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from bridge.core.chunking import Chunker, cut_utf8
from bridge.core.journal import Journal
from bridge.dev.mock_llm import reply_tokens
from tests.harness import BridgeProcess, Device
from tests.streams import load


def test_cut_utf8_never_splits_a_character() -> None:
    assert cut_utf8("aé€😀", 3) == ("aé", "€😀")
    assert cut_utf8("€€", 4) == ("€", "€")
    assert cut_utf8("😀x", 2) == ("😀", "x")  # wider than the limit: sent whole
    assert cut_utf8("abc", 10) == ("abc", "")


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40),
       st.integers(min_value=8, max_value=40))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_size_rule_keeps_text_and_bounds(deltas: list[str], limit: int) -> None:
    c = Chunker(max_bytes=limit)
    out = [piece for d in deltas for piece in c.feed(d)] + c.flush()
    assert "".join(out) == "".join(deltas)
    for piece in out:
        assert len(piece.encode()) <= limit or len(piece) == 1
    for piece in out[:-1]:
        # every piece but the last is as full as a character boundary allows
        assert len(piece.encode()) > limit - 4


_WORDS = ["Hi", " there", ".", " How", " are", " you", "?", " 好", "。", "\n"]


@given(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_sentence_rule_sends_whole_sentences(deltas: list[str]) -> None:
    c = Chunker(sentences=True)
    out = [piece for d in deltas for piece in c.feed(d)]
    rest = c.flush()
    assert "".join(out + rest) == "".join(deltas)
    for piece in out:
        assert piece.rstrip().endswith((".", "?", "。")) or piece.endswith("\n"), piece


def test_no_rule_passes_through() -> None:
    assert Chunker().feed("abc") == ["abc"]


def test_journal_survives_the_process(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path, 4)
    a = j.add("llm/d/res/a", None)
    b = j.add("llm/d/res/b", b"\x01\x02")
    c = j.add("llm/d/res/c", None)
    j.set_seq(a, 7)
    j.set_seq(b, 3)
    j.remove(c)
    # No close(): as after kill -9, the next process reads what the page holds.
    again = Journal(path, 4)
    got = sorted((x.topic, x.seq, x.correlation) for x in again.pending)
    assert got == [("llm/d/res/a", 7, None), ("llm/d/res/b", 3, b"\x01\x02")]
    # Until their terminals are acknowledged, a second crash loses none of them...
    third = Journal(path, 4)
    assert sorted(x.topic for x in third.pending) == ["llm/d/res/a", "llm/d/res/b"]
    assert third.add("x", None) >= 0 and third.add("y", None) >= 0
    assert third.add("z", None) == -1  # ...and their slots are not handed out again
    # ...then they are gone.
    for gone in again.pending:
        again.remove(gone.slot)
    assert {x.topic for x in Journal(path, 4).pending} == {"x", "y"}
    j.close()
    again.close()
    third.close()


def test_journal_full_or_long_topic_is_not_journaled(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", 1)
    assert j.add("x" * 1200, None) == -1  # the service refuses such a request beforehand
    assert j.add("t", None) == 0
    assert j.add("u", None) == -1
    j.close()


# --- end to end ------------------------------------------------------------------------------


def _whole(prompt: str, tokens: int) -> str:
    return "".join(reply_tokens(prompt, tokens))


def test_chunk_bytes_end_to_end(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask({"id": "cb", "prompt": "size me [mock tokens=60]", "chunk_bytes": 32})
    assert reply.text == _whole("size me", 60)
    deltas = [m["delta"] for m in reply.messages[:-1]]
    assert len(deltas) < 60 / 3
    assert all(len(d.encode()) <= 32 for d in deltas)
    assert all(len(d.encode()) > 24 for d in deltas[:-1])


def test_chunk_sentences_end_to_end(bridge: BridgeProcess, device: Device) -> None:
    msgs = [
        {"role": "user", "content": "One. Two! [mock corpus=mistral_text]"},
    ]
    reply = device.ask({"id": "cs", "messages": msgs, "chunk_sentences": True})
    deltas = [m["delta"] for m in reply.messages[:-1]]
    assert "".join(deltas) == load("own", "mistral_text").expect["content"]
    assert len(deltas) >= 2
    for d in deltas[:-1]:
        assert d.rstrip().endswith((".", "!", "?", ":")) or d.endswith("\n"), d


def test_chunk_ms_merges_by_time(bridge: BridgeProcess, device: Device) -> None:
    t0 = time.monotonic()
    reply = device.ask(
        {"id": "cm", "prompt": "time me [mock tokens=40 delay_ms=10]", "chunk_ms": 100}
    )
    elapsed = time.monotonic() - t0
    assert reply.text == _whole("time me", 40)
    n = len(reply.messages) - 1
    assert 2 <= n <= max(3, int(elapsed / 0.1) + 2), (n, elapsed)


def test_held_text_is_published_before_an_error(bridge: BridgeProcess, device: Device) -> None:
    reply = device.ask(
        {"id": "ce", "prompt": "[mock tokens=10 error_event_at=5]", "chunk_bytes": 1000}
    )
    assert reply.error_code == "upstream_error"
    assert reply.text == "".join(reply_tokens("", 10)[:5])
    assert len(reply.messages) == 2


@pytest.mark.parametrize("bad", [{"chunk_bytes": 4}, {"chunk_ms": 0}, {"chunk_sentences": "yes"}])
def test_bad_chunk_fields(bridge: BridgeProcess, device: Device, bad: dict[str, object]) -> None:
    reply = device.ask({"id": "cx", "prompt": "x", **bad})
    assert reply.error_code == "bad_request"


def test_journal_answers_requests_of_a_killed_bridge(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device], tmp_path: Path
) -> None:
    env = {"BRIDGE_CLIENT_ID": "journal-test", "BRIDGE_TOPIC_PREFIX": "jt",
           "BRIDGE_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    proc = start_bridge(**env)
    dev = make_device(prefix="jt")
    for i in range(3):
        dev.send({"id": f"k{i}", "prompt": f"[mock tokens=300 delay_ms=10] {i}"})
    deadline = time.monotonic() + 5
    while min(len(dev.replies.get(f"k{i}", [])) for i in range(3)) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    start_bridge(**env)
    for i in range(3):
        deadline = time.monotonic() + 10
        while not any("error" in m for m in dev.replies.get(f"k{i}", [])):
            assert time.monotonic() < deadline, dev.replies[f"k{i}"][-2:]
            time.sleep(0.02)
        msgs = dev.replies[f"k{i}"]
        seqs = [m["seq"] for m in msgs]
        assert seqs == sorted(set(seqs)), seqs  # increasing, no repeat
        assert msgs[-1]["error"]["code"] == "interrupted"
        assert sum(1 for m in msgs if "error" in m or "done" in m) == 1
