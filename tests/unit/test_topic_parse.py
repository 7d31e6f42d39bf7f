"""`Topics`: the protocol's topic names under a prefix, and reading one back."""

from __future__ import annotations

import pytest

from bridge.core.topics import Topics


def test_device_topics_are_built_under_the_prefix() -> None:
    t = Topics("llm")
    assert (t.req("d"), t.cancel("d"), t.res("d", "r1"), t.res_filter("d")) == (
        "llm/d/req", "llm/d/cancel", "llm/d/res/r1", "llm/d/res/+")  # fmt: skip
    assert (t.state("d"), t.event("d"), t.ask("d"), t.res_base("d")) == (
        "llm/d/state", "llm/d/event", "llm/d/ask", "llm/d/res/")  # fmt: skip
    assert (t.req_filter, t.cancel_filter, t.status, t.stats) == (
        "llm/+/req", "llm/+/cancel", "llm/bridge/status", "llm/bridge/stats")  # fmt: skip
    assert t.device_filter("image", per_request=True) == "llm/+/image/+"


@pytest.mark.parametrize(
    ("prefix", "topic", "parsed"),
    [
        ("llm", "llm/kitchen/req", ("kitchen", "req", None)),
        ("llm", "llm/kitchen/res/q1", ("kitchen", "res", "q1")),
        ("home/llm", "home/llm/kitchen/cancel", ("kitchen", "cancel", None)),
        ("home/llm", "home/llm/kitchen/res/q1", ("kitchen", "res", "q1")),
        ("llm", "llm/bridge/status", ("bridge", "status", None)),
    ],
)
def test_parse_reads_device_kind_and_request(
    prefix: str, topic: str, parsed: tuple[str, str, str | None]
) -> None:
    assert Topics(prefix).parse(topic) == parsed


@pytest.mark.parametrize(
    ("prefix", "topic"),
    [
        ("llm", "other/kitchen/req"),  # another prefix
        ("llm", "llm/kitchen"),  # too short
        ("llm", "llm/kitchen/res/q1/more"),  # too long
        ("home/llm", "llm/kitchen/req"),  # a part of the prefix only
        ("home/llm", "home/kitchen/req/x"),
        ("llm", "llmx/kitchen/req"),
    ],
)
def test_parse_refuses_topics_that_are_not_ours(prefix: str, topic: str) -> None:
    assert Topics(prefix).parse(topic) is None


def test_parse_reads_back_every_device_topic_it_builds() -> None:
    t = Topics("a/b/c")
    for topic, parsed in [
        (t.req("d1"), ("d1", "req", None)),
        (t.cancel("d1"), ("d1", "cancel", None)),
        (t.res("d1", "r"), ("d1", "res", "r")),
        (t.device("d1", "image", "r"), ("d1", "image", "r")),
    ]:
        assert t.parse(topic) == parsed
