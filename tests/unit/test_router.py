"""The `Router`: topic filters to handlers, and what the broker is asked to subscribe."""

from __future__ import annotations

import logging

import pytest

from bridge.core.plugin import Inbound
from bridge.core.router import Router


def msg(topic: str) -> Inbound:
    return Inbound(topic, b"x", retain=False, qos=1)


def test_the_first_matching_route_takes_the_message() -> None:
    got: list[tuple[str, str]] = []
    r = Router()
    r.add("llm/+/req", lambda m: got.append(("req", m.topic)))
    r.add("llm/#", lambda m: got.append(("all", m.topic)))
    assert r.route(msg("llm/kitchen/req"))
    assert r.route(msg("llm/kitchen/cancel"))
    assert r.route(msg("llm"))  # '#' matches its parent level too
    assert got == [("req", "llm/kitchen/req"), ("all", "llm/kitchen/cancel"), ("all", "llm")]


def test_a_message_no_route_matches_is_reported() -> None:
    r = Router()
    r.add("llm/+/req", lambda m: None)
    assert not r.route(msg("llm/kitchen/req/extra"))
    assert not r.route(msg("other/kitchen/req"))


def test_a_handler_that_raises_is_logged_and_the_message_counts_as_taken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(m: Inbound) -> None:
        raise ValueError("bad handler")

    r = Router()
    r.add("a/+", broken)
    with caplog.at_level(logging.ERROR, logger="bridge.core.router"):
        assert r.route(msg("a/b"))
    assert "handler for a/+ failed on a/b" in caplog.text


def test_each_filter_is_subscribed_once_at_its_highest_qos() -> None:
    r = Router()
    r.add("llm/+/req", lambda m: None, qos=1)
    r.add("llm/+/state", lambda m: None, qos=0)
    r.add("llm/+/state", lambda m: None, qos=1)
    r.add("llm/+/req", lambda m: None, qos=0)
    assert sorted(r.subscriptions()) == [("llm/+/req", 1), ("llm/+/state", 1)]


def test_the_order_of_adding_decides_not_how_specific_a_filter_is() -> None:
    got: list[str] = []
    r = Router()
    r.add("llm/#", lambda m: got.append("all"))
    r.add("llm/+/req", lambda m: got.append("req"))
    r.add("llm/+/req", lambda m: got.append("second req"))  # same filter again: never reached
    assert r.route(msg("llm/kitchen/req"))
    assert got == ["all"]


def test_wildcards_at_the_first_level_do_not_match_dollar_topics() -> None:
    r = Router()
    r.add("+/bridge/stats", lambda m: None)
    r.add("#", lambda m: None)
    assert not r.route(msg("$SYS/bridge/stats"))
    assert r.route(msg("llm/bridge/stats"))


def test_a_worker_leaves_its_group_by_the_shared_filters_only() -> None:
    r = Router()
    r.add("llm/+/req", lambda m: None, shared=True)
    r.add("llm/+/cancel", lambda m: None)
    assert r.shared_subscriptions("g") == ["$share/g/llm/+/req"]
    assert r.shared_subscriptions("") == []
