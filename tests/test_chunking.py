"""Device-friendly chunking (chunk_bytes, chunk_ms, chunk_sentences) and the crash journal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from bridge.core.chunking import Chunker, split_utf8
from bridge.core.journal import Journal, JournalBusy
from bridge.dev.mock_llm import reply_tokens
from tests.harness import REPO, BridgeProcess, Device
from tests.streams import load


def test_split_utf8_never_splits_a_character() -> None:
    assert split_utf8("aé€😀".encode(), 3, whole=True) == (["aé", "€", "😀"], b"")
    assert split_utf8("€€".encode(), 4, whole=True) == (["€", "€"], b"")
    # a character wider than the limit is sent whole rather than never
    assert split_utf8("😀x".encode(), 2, whole=True) == (["😀", "x"], b"")
    assert split_utf8(b"abc", 10, whole=True) == (["abc"], b"")
    # without `whole`, less than a full piece is left over
    assert split_utf8("aé€😀".encode(), 3, whole=False) == (["aé", "€", "😀"], b"")
    assert split_utf8("aé€".encode(), 4, whole=False) == (["aé"], "€".encode())


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


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("sentences", [False, True])
@pytest.mark.parametrize("max_ms", [0, 500])
def test_size_rule_sends_a_piece_the_moment_it_is_full(sentences: bool, max_ms: int) -> None:
    """protocol.md: "a chunk is sent as soon as it is full", whatever other rule is set."""
    c = Chunker(max_bytes=9, sentences=sentences, max_ms=max_ms)
    assert c.feed("You") == []
    assert c.feed(" said:") == ["You said:"]  # exactly 9 bytes
    assert not c.holding
    assert c.feed("abcdefgh") == []
    assert c.feed("é") == ["abcdefgh"]  # the next character does not fit: full at 8
    assert c.flush() == ["é"]


def test_sentence_rule_sends_a_sentence_when_its_end_comes() -> None:
    c = Chunker(sentences=True)
    assert c.feed("It is 3.") == []  # "3.14" or a sentence end: the next character says
    assert c.feed("14 today.") == []
    assert c.feed(" Next") == ["It is 3.14 today. "]
    assert c.feed(" one?\n") == ["Next one?\n"]
    assert c.feed("好。") == ["好。"]  # a CJK terminator needs no space
    assert c.feed("a\nb") == ["a\n"]  # a line break ends one too
    assert c.flush() == ["b"]


def test_sentence_end_split_over_deltas_with_closing_quotes() -> None:
    c = Chunker(sentences=True)
    assert c.feed('He said "Stop') == []
    assert c.feed(".") == []
    assert c.feed('"') == []
    assert c.feed(")") == []
    assert c.feed("  And") == ['He said "Stop.")  ']
    assert c.feed("…") == []
    assert c.feed("x") == []  # "…x": not an end
    assert c.feed(" y… ") == ["And…x y… "]
    assert not c.holding


def test_size_rule_cuts_a_long_sentence_at_n_bytes() -> None:
    c = Chunker(max_bytes=8, sentences=True)
    assert c.feed("abcdefghij") == ["abcdefgh"]
    assert c.feed(". k") == ["ij. "]
    assert c.feed("lmnopqrstuvwxyz. A") == ["klmnopqr", "stuvwxyz", ". "]
    assert c.flush() == ["A"]


def test_time_rule_holds_text_for_chunk_ms() -> None:
    clock = FakeClock()
    c = Chunker(max_ms=100, clock=clock)
    assert c.due_in() is None
    assert c.feed("a") == []
    assert c.due_in() == pytest.approx(0.1)
    clock.now += 0.06
    assert c.feed("b") == []
    assert c.due_in() == pytest.approx(0.04)  # counted from the oldest text held
    clock.now += 0.04
    assert c.due_in() == pytest.approx(0.0)
    assert c.flush() == ["ab"]
    assert c.due_in() is None
    clock.now += 5
    assert c.feed("c") == []
    assert c.due_in() == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("rules", "first", "second", "sent"),
    [
        ({"sentences": True}, "Hi.", " there", ["Hi. "]),
        ({"max_bytes": 8}, "abcd", "efghij", ["abcdefgh"]),
        ({"max_bytes": 8, "sentences": True}, "ab.", " cdefghijkl", ["ab. ", "cdefghij"]),
    ],
)
def test_time_rule_counts_from_the_text_still_held(
    rules: dict[str, int], first: str, second: str, sent: list[str]
) -> None:
    """Text sent by another rule takes its age with it: what is left is as old as its delta."""
    clock = FakeClock()
    c = Chunker(max_ms=100, clock=clock, **rules)
    assert c.feed(first) == []
    clock.now += 0.06
    assert c.feed(second) == sent
    assert c.holding
    assert c.due_in() == pytest.approx(0.1)  # not 0.04: that text left already


_TRICKY = [".", "!", "?", "…", '"', ")", "]", " ", "  ", "\n", "。", "\uff01", "é", "😀",
           "ab", " cd", "3.14", "x. y", '.") z']  # fmt: skip
_END_AT = re.compile(r"(?:[.!?\u2026][\"')\]]*\s|[\u3002\uff01\uff1f]|\n)\s*$")
_END_IN = re.compile(r"[.!?\u2026][\"')\]]*\s|[\u3002\uff01\uff1f]|\n")


@given(
    st.lists(st.tuples(st.sampled_from(_TRICKY), st.booleans()), min_size=1, max_size=60),
    st.sampled_from([0, 8, 9, 13]),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_every_rule_combination(
    deltas: list[tuple[str, bool]], size: int, sentences: bool, timed: bool
) -> None:
    """Nothing lost or reordered; a piece leaves only when full or at a sentence end (or
    when its time is up), and then at once: after each delta no full piece and no whole
    sentence end is held."""
    c = Chunker(max_bytes=size, sentences=sentences, max_ms=100 if timed else 0)
    sent = ""
    held = ""
    for d, time_is_up in deltas:
        if timed and time_is_up:  # what the caller's timer does
            flushed = c.flush()
            assert "".join(flushed) == held
            sent += held
            held = ""
        pieces = c.feed(d)
        held += d
        for piece in pieces:
            assert held.startswith(piece)
            held = held[len(piece) :]
            sent += piece
            if size:
                assert len(piece.encode()) <= size
            full = size and len(piece.encode()) > size - 4
            if size or sentences or timed:
                assert full or (sentences and _END_AT.search(sent)), (sent, piece)
        assert c.holding == bool(held)
        if not (size or sentences or timed):
            assert not held
        if size:
            assert len(held.encode()) < size
        if sentences:
            assert not _END_IN.search(held), (sent, held)
    rest = c.flush()
    assert "".join(rest) == held
    assert sent + held == "".join(d for d, _ in deltas)
    assert all(len(piece.encode()) <= size for piece in rest) if size else len(rest) <= 1


def _half_times(deltas: list[str], rules: dict[str, int]) -> tuple[float, float]:
    """CPU seconds for feeding the first and the second half of `deltas` (best of 5)."""
    half = len(deltas) // 2
    best = [float("inf"), float("inf")]
    for _ in range(5):
        c = Chunker(**rules)
        for i, part in enumerate((deltas[:half], deltas[half:])):
            t = time.process_time()
            for d in part:
                c.feed(d)
            best[i] = min(best[i], time.process_time() - t)
        c.flush()
    return best[0], best[1]


_RULES = [{"sentences": 1}, {"sentences": 1, "max_bytes": 65536}, {"max_bytes": 65536},
          {"max_ms": 10000}, {"sentences": 1, "max_ms": 10000}]  # fmt: skip


@pytest.mark.parametrize("rules", _RULES)
@pytest.mark.parametrize("kind", ["words", "dots"])
def test_feeding_is_linear_in_the_reply(rules: dict[str, int], kind: str) -> None:
    """The second half of a long reply with no sentence end costs what the first did.

    Before, every delta re-joined and re-scanned all the held text: the second
    half cost ~3x the first (and 12,000 tokens ~10 s of the event loop).
    """
    n = 8000
    deltas = reply_tokens("hi", n) if kind == "words" else ["."] * n
    first, second = _half_times(deltas, rules)
    assert second < 2 * first + 0.005, (first, second)


def test_a_long_run_of_terminators_is_scanned_in_linear_time() -> None:
    """200,000 dots in one delta (no space: no sentence end) must not make the regex backtrack."""
    c = Chunker(sentences=True)
    t = time.process_time()
    assert c.feed("." * 200_000) == []
    assert c.feed(")" * 200_000) == []
    assert time.process_time() - t < 0.5
    assert c.feed(" x") == ["." * 200_000 + ")" * 200_000 + " "]


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


def test_a_reply_with_no_sentence_end_does_not_delay_another_device(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device]
) -> None:
    """Streams are independent: 40,000 words without a sentence end for one device
    (chunk_sentences holds them all) leave another device's short request fast.

    Before, each delta re-scanned all the held text on the event loop: the
    short request waited for seconds (10 s behind 12,000 tokens)."""
    proc = start_bridge()
    slow, quick = make_device(prefix=proc.prefix), make_device(prefix=proc.prefix)
    slow.send({"id": "long", "prompt": "hi [mock tokens=40000]", "chunk_sentences": True})
    deadline = time.monotonic() + 10
    while not slow.messages("long"):  # "You said: hi. ": the rest is one endless sentence
        assert time.monotonic() < deadline, "no first sentence"
        time.sleep(0.005)
    t0 = time.monotonic()
    reply = quick.ask({"id": "short", "prompt": "quick [mock tokens=5]"}, timeout=1.5)
    took = time.monotonic() - t0
    still_streaming = not any("done" in m for m in slow.messages("long"))
    assert reply.text == _whole("quick", 5)
    long = slow.wait("long", timeout=30)
    assert long.text == _whole("hi", 40000)
    assert [m["delta"] for m in long.messages[:-1]] == ["You said: hi. ", long.text[14:]]
    assert still_streaming, "the long reply ended before the short one: nothing was measured"
    assert took < 1.5, took


def test_chunk_bytes_piece_leaves_when_full_with_chunk_ms(
    bridge: BridgeProcess, device: Device
) -> None:
    """ "You" + " said:" is exactly 9 bytes: sent then, not when the next token
    overfills it (400 ms later) nor when chunk_ms (5 s) ends."""
    t0 = time.monotonic()
    device.send({"id": "full", "prompt": "ab [mock tokens=3 delay_ms=400]", "chunk_bytes": 9,
                 "chunk_ms": 5000})  # fmt: skip
    deadline = time.monotonic() + 10
    while not device.messages("full"):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    first = time.monotonic()
    reply = device.wait("full")
    end = time.monotonic()
    assert [m.get("delta") for m in reply.messages] == ["You said:", " ab.", None]
    assert end - first > 0.2, (first - t0, end - t0)


def test_chunk_ms_counts_from_the_text_still_held(bridge: BridgeProcess, device: Device) -> None:
    """Tokens every 400 ms, chunk_ms 1400, whole sentences: the first sentence leaves at its
    end (token 4, " alpha", ~1.6 s); "alpha" is held from then, so the reply's end (~2.4 s)
    comes before its 1400 ms are up (~3.0 s). Before, the timer started with "You" (~0.4 s)
    fired at ~1.8 s and sent "alpha" alone. (Margins of 600 ms either way.)"""
    ask = {"id": "aged", "prompt": "ab [mock tokens=6 delay_ms=400]", "chunk_sentences": True,
           "chunk_ms": 1400}  # fmt: skip
    reply = device.ask(ask)
    deltas = [m["delta"] for m in reply.messages[:-1]]
    assert deltas == ["You said: ab. ", "alpha bravo charlie"]


def test_a_journal_held_by_a_live_process_cannot_be_adopted_until_it_dies(
    tmp_path: Path,
) -> None:
    """Workers of a group tell a dead peer's journal by its lock: the kernel drops it
    when the process dies, even by kill -9."""
    path = tmp_path / "inflight-bridge-2.journal"
    code = (
        "import sys, time\n"
        "from bridge.core.journal import Journal\n"
        "j = Journal(__import__('pathlib').Path(sys.argv[1]), 4)\n"
        "j.set_seq(j.add('llm/d/res/a', None, 'd', 'a'), 5)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdout.readline() == b"ready\n"
        assert Journal.adopt(path, 4) is None
        with pytest.raises(JournalBusy, match="held by another process"):
            Journal(path, 4, wait=0.2)
    finally:
        owner.kill()
        owner.wait()
    adopted = Journal.adopt(path, 4)
    assert adopted is not None
    assert [(x.topic, x.seq, x.device, x.key) for x in adopted.pending] == [
        ("llm/d/res/a", 5, "d", "a")
    ]
    adopted.close()
