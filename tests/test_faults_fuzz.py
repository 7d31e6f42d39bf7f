"""Fault suite, part 3: fuzzed request payloads, topics and MQTT v5 response topics.

A client allowed to publish anywhere (user `fuzzer`, on a Mosquitto of this
module's own) sends what hypothesis makes: arbitrary bytes, JSON objects with
random fields and types, near-valid requests, huge strings, deep nesting,
invalid UTF-8, lone surrogates and NaN, to `P/D/req` and `P/D/cancel` with
valid and invalid device ids. Each example has a device id of its own, so what
it gets back is its own. The bridge must stay up, answer every addressable
request exactly once (on its id when it has a valid one, else on an id it
makes), answer nothing it cannot address, and keep its memory flat.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.dev.mock_llm import reply_tokens
from tests.harness import BridgeProcess, Broker, Reply, bridge_env, rss_kb, wait_for_status

pytestmark = pytest.mark.faults

P = "fz"
MAX_BYTES = 65536
ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
SALVAGE_RE = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_\-]{1,64})"')
MADE_RE = re.compile(r"[0-9a-f]{12}")


# --- the oracle: docs/protocol.md, "Addressing errors" -------------------------------------


def valid_device(d: str) -> bool:
    return ID_RE.fullmatch(d) is not None and d != "bridge"


def expected_rid(payload: bytes) -> str | None:
    """The request id a reply must use, or None when the bridge must make one."""
    salvaged = SALVAGE_RE.search(payload[:256])
    salvage = salvaged.group(1).decode() if salvaged else None
    if len(payload) > MAX_BYTES:
        return salvage
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return salvage
    if not text.startswith("{"):
        return None  # a plain-text prompt (or nothing): no id
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return salvage
    rid = data.get("id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and ID_RE.fullmatch(rid) else None


def expected_topic(device: str, payload: bytes, response_topic: str | None) -> str | None:
    """Where the reply must go; None: on `P/D/res/<an id the bridge makes>`."""
    base = f"{P}/{device}/res/"
    if (
        response_topic is not None
        and response_topic.startswith(base)
        and len(response_topic) > len(base)
    ):
        return response_topic
    # any other response topic is refused, answered like the request would be (19bf875)
    rid = expected_rid(payload)
    return base + rid if rid else None


# --- strategies -----------------------------------------------------------------------------

# Topic text Mosquitto accepts (no control characters, surrogates, noncharacters, wildcards).
topic_chars = st.characters(
    blacklist_categories=("Cs", "Cc"), blacklist_characters="/+#\ufffe\uffff"
).filter(lambda c: not 0xFDD0 <= ord(c) <= 0xFDEF and (ord(c) & 0xFFFF) < 0xFFFE)
topic_text = st.text(topic_chars, max_size=70)
valid_ids = st.from_regex(r"[A-Za-z0-9_\-]{1,64}", fullmatch=True)
some_ids = st.one_of(valid_ids, st.text(max_size=80), st.integers(), st.none(), st.booleans())

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [
    "id", "prompt", "messages", "system", "model", "stream", "max_tokens",
    "max_completion_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
    "frequency_penalty", "reasoning_effort", "tools", "tool_choice", "chunk_bytes", "chunk_ms",
    "chunk_sentences", "n", "colour",
]  # fmt: skip
field_names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})
image_part = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.fixed_dictionaries({"url": st.text(max_size=30)}),
    }
)
content = st.one_of(
    st.text(max_size=60),
    st.none(),
    st.lists(st.one_of(text_part, image_part, json_values), max_size=3),
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "x"])
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles},
        optional={"content": content, "name": json_values, "tool_call_id": json_values},
    ),
    max_size=4,
)


def near_valid() -> st.SearchStrategy[dict[str, Any]]:
    """Requests close to valid: right field names, values right or of a random type."""
    return st.fixed_dictionaries(
        {},
        optional={
            "id": some_ids,
            "prompt": st.one_of(st.text(max_size=200), json_values),
            "messages": st.one_of(messages, json_values),
            "system": st.one_of(st.text(max_size=50), json_values),
            "model": st.one_of(st.sampled_from(["mock-1", "mock-x"]), json_values),
            "stream": st.one_of(st.booleans(), json_values),
            "max_tokens": st.one_of(st.integers(-5, 50), json_values),
            "temperature": st.one_of(st.floats(-1, 3), json_values),
            "stop": st.one_of(st.lists(st.text(max_size=5), max_size=6), json_values),
            "seed": st.one_of(st.integers(), json_values),
            "tools": json_values,
            "tool_choice": json_values,
            "chunk_bytes": st.one_of(st.integers(-1, 100_000), json_values),
            "chunk_ms": st.one_of(st.integers(-1, 20_000), json_values),
            "chunk_sentences": json_values,
        },
    )


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def nested(depth: int, with_id: bool) -> bytes:
    head = b'{"id":"deep%d",' % depth if with_id else b"{"
    return head + b'"prompt":"x","tools":' + b"[" * depth + b"]" * depth + b"}"


payloads = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(field_names, json_values, max_size=8).map(dumps),
    near_valid().map(dumps),
    # huge strings, around the size limit
    st.tuples(valid_ids, st.integers(1000, 2 * MAX_BYTES)).map(
        lambda t: dumps({"id": t[0], "prompt": "a" * t[1]})
    ),
    st.integers(1000, 2 * MAX_BYTES).map(lambda n: b"b" * n),
    # deep nesting, with and without an id in front
    st.tuples(st.integers(1, 30_000), st.booleans()).map(lambda t: nested(*t)),
    # invalid UTF-8 inside a request that names its id
    st.tuples(valid_ids, st.binary(min_size=1, max_size=20)).map(
        lambda t: b'{"id":"%s","prompt":"\xff%s"}' % (t[0].encode(), t[1])
    ),
    # JSON that decodes to text UTF-8 cannot hold, and numbers JSON does not have
    st.sampled_from(
        [
            b'{"id":"sur1","prompt":"\\ud800"}',
            b'{"id":"sur2","prompt":"a\\udfff b"}',
            b'{"id":"sur3","prompt":"x","system":"\\ud83d"}',
            b'{"id":"nan1","prompt":"x","tools":[{"type":"function","function":'
            b'{"name":"f","parameters":{"a":NaN}}}]}',
            b'{"id":"inf1","prompt":"x","tools":[{"type":"function","function":'
            b'{"name":"f","parameters":{"a":1e999}}}]}',
            b'{"id":"inf2","prompt":"x","temperature":-Infinity}',
            b'{"id":"big1","prompt":"x","seed":' + b"9" * 5000 + b"}",
            b'{"id":"ok1","prompt":"\\ud83d\\ude00 fine"}',
        ]
    ),
)


@dataclass
class Example:
    device: str
    kind: str  # req, cancel, other (a topic the bridge does not serve)
    payload: bytes
    cancel: bytes | None
    response_topic: str | None
    correlation: bytes | None

    def __repr__(self) -> str:
        def cut(b: bytes | None) -> str:
            return repr(b) if b is None or len(b) <= 300 else f"{b[:300]!r}... ({len(b)} bytes)"

        return (
            f"Example(device={self.device!r}, kind={self.kind}, payload={cut(self.payload)},"
            f" cancel={cut(self.cancel)}, response_topic={self.response_topic!r})"
        )


_n = itertools.count()


@st.composite
def examples(draw: st.DrawFn) -> Example:
    n = next(_n)
    if draw(st.integers(0, 4)) == 0:  # a fuzzed device id (most of them invalid)
        device = draw(st.one_of(topic_text, st.sampled_from(["bridge", ""])))
        if device not in ("bridge", ""):
            device = f"{n:06d}{device}"
    else:
        device = f"{n:06d}"
    kind = draw(st.sampled_from(["req"] * 8 + ["cancel", "other"]))
    payload = draw(payloads)
    cancel = None
    if kind == "req" and draw(st.integers(0, 5)) == 0:
        rid = expected_rid(payload) or "x"
        cancel = draw(st.one_of(st.just(rid.encode()), st.just(dumps({"id": rid})), payloads))
    response_topic = correlation = None
    if kind == "req" and draw(st.integers(0, 6)) == 0:
        base = f"{P}/{device}/res/"
        response_topic = draw(
            st.one_of(
                st.builds(lambda t: base + t, topic_text.filter(bool)),
                st.builds(lambda t: f"{P}/other/res/{t}", topic_text),
                topic_text.filter(bool),
            )
        )
        correlation = draw(st.one_of(st.none(), st.binary(max_size=40)))
    return Example(device, kind, payload, cancel, response_topic, correlation)


# --- the fuzzing client ---------------------------------------------------------------------


class Fuzzer:
    """An MQTT v5 client that may publish anywhere and hears every reply under `P/`."""

    def __init__(self, broker: Broker) -> None:
        self.by_topic: dict[str, list[bytes]] = defaultdict(list)
        self.cond = threading.Condition()
        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        c.username_pw_set("fuzzer", broker.users["fuzzer"])
        c.on_message = self._on_message
        ready = threading.Event()
        c.on_connect = lambda *a: ready.set()
        c.on_subscribe = lambda *a: ready.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert ready.wait(5)
        ready.clear()
        c.subscribe(f"{P}/+/res/#", qos=1)
        assert ready.wait(5)
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.by_topic[msg.topic].append(msg.payload)
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes, props: Properties | None = None) -> None:
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(5)
        assert info.is_published(), f"publish to {topic!r} not acknowledged"

    def topics_of(self, device: str) -> dict[str, list[bytes]]:
        base = f"{P}/{device}/res/"
        with self.cond:
            return {t: list(m) for t, m in self.by_topic.items() if t.startswith(base)}

    def wait_terminal(self, device: str, timeout: float) -> dict[str, list[bytes]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = self.topics_of(device)
                if any(b'"done"' in m or b'"error"' in m for ms in got.values() for m in ms):
                    return got
                left = deadline - time.monotonic()
                assert left > 0, f"no terminal for device {device!r}; got {got}"
                self.cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def terminal_is_last_and_only(topic: str, raw: list[bytes]) -> Reply:
    return Reply(topic, [json.loads(m) for m in raw]).check()


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory: pytest.TempPathFactory, mock_llm: Any) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = Broker(tmp / "broker")
    broker.add_user("fuzzer", reload=False)
    with (broker.dir / "acl").open("a") as f:
        f.write("\n# the fuzz test's client may publish and read anything\nuser fuzzer\n")
        f.write("topic readwrite #\n")
    broker.start()
    proc = BridgeProcess(
        Path(tmp / "bridge"),
        bridge_env(
            broker,
            mock_llm.base_url,
            BRIDGE_TOPIC_PREFIX=P,
            # The `bridge` user itself: a worker user would rewrite the ACL, and the
            # fuzzer's block appended above with it.
            BRIDGE_MQTT_URL=broker.url("bridge"),
            BRIDGE_MAX_REQUEST_BYTES=MAX_BYTES,
            BRIDGE_LOG_LEVEL="INFO",
            BRIDGE_DATA_DIR=str(tmp / "data"),
        ),
    ).start()
    fuzzer = None
    try:
        wait_for_status(broker, P, "online")
        fuzzer = Fuzzer(broker)
        yield broker, proc, fuzzer
    finally:
        if fuzzer is not None:
            fuzzer.close()
        proc.stop()
        broker.stop()


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.addressed: set[str] = set()
        self.unaddressed: set[str] = set()


def run_one(fuzzer: Fuzzer, proc: BridgeProcess, ex: Example, tally: Tally) -> None:
    props = None
    if ex.response_topic is not None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = ex.response_topic
        if ex.correlation is not None:
            props.CorrelationData = ex.correlation
    topic = {"req": f"{P}/{ex.device}/req", "cancel": f"{P}/{ex.device}/cancel"}.get(
        ex.kind, f"{P}/{ex.device}/req/extra"
    )
    fuzzer.publish(topic, ex.payload, props)
    if ex.cancel is not None:
        fuzzer.publish(f"{P}/{ex.device}/cancel", ex.cancel)
    if ex.kind != "req" or not valid_device(ex.device):
        tally.unaddressed.add(ex.device)
        tally.counts["not addressable"] += 1
        return
    tally.addressed.add(ex.device)
    got = fuzzer.wait_terminal(ex.device, timeout=5)
    assert len(got) == 1, f"replies on several topics: {got}"
    (where, raw), = got.items()  # fmt: skip
    reply = terminal_is_last_and_only(where, raw)
    want = expected_topic(ex.device, ex.payload, ex.response_topic)
    base = f"{P}/{ex.device}/res/"
    if want is not None:
        assert where == want, (ex, where, reply.terminal)
        tally.counts["on its response topic" if where == ex.response_topic else "on its id"] += 1
    else:
        assert MADE_RE.fullmatch(where[len(base) :]), (ex, where)
        tally.counts["on a made id"] += 1
    t = reply.terminal
    tally.counts["done" if t.get("done") else t["error"]["code"]] += 1
    assert proc.proc is not None and proc.proc.poll() is None, "the bridge died"


def fuzz_round(fuzzer: Fuzzer, proc: BridgeProcess, examples_count: int) -> Tally:
    tally = Tally()

    @settings(
        max_examples=examples_count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # no shrinking: a failure costs a timeout per try
        report_multiple_bugs=False,
    )
    @given(examples())
    def one(ex: Example) -> None:
        run_one(fuzzer, proc, ex, tally)

    one()
    return tally


def test_fuzzed_payloads_and_topics(fuzz_setup: Any) -> None:
    _broker, proc, fuzzer = fuzz_setup
    assert proc.proc is not None
    pid = proc.proc.pid
    warm = fuzz_round(fuzzer, proc, 150)
    time.sleep(0.5)
    rss_before = rss_kb(pid)
    tally = fuzz_round(fuzzer, proc, 400)
    time.sleep(0.5)
    rss_after = rss_kb(pid)

    # nothing answered that could not be addressed; nothing answered twice
    time.sleep(0.5)
    for device in warm.unaddressed | tally.unaddressed:
        if device not in warm.addressed | tally.addressed:
            assert fuzzer.topics_of(device) == {}, device
    for device in warm.addressed | tally.addressed:
        for where, raw in fuzzer.topics_of(device).items():
            terminal_is_last_and_only(where, raw)

    # still serving
    fuzzer.publish(f"{P}/after/req", b'{"id":"after1","prompt":"still there?"}')
    got = fuzzer.wait_terminal("after", timeout=15)
    reply = terminal_is_last_and_only(f"{P}/after/res/after1", got[f"{P}/after/res/after1"])
    assert reply.text == "".join(reply_tokens("still there?"))
    assert proc.proc.poll() is None

    growth = rss_after - rss_before
    print(
        f"fuzz: {dict(sorted(tally.counts.items()))}; bridge RSS {rss_before} kB after the"
        f" warm-up, {rss_after} kB after 400 more examples ({growth:+d} kB)"
    )
    assert growth < 10_000, f"RSS grew by {growth} kB over 400 fuzzed requests"
