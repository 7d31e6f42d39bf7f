"""`Job`: the usage summed over every API reply, and the tokens a request is charged."""

from __future__ import annotations

from typing import Any

from bridge.core import protocol as p
from bridge.core.job import Job
from bridge.core.reply import ReplyFold


def job() -> Job:
    return Job("dev", "r1", "llm/dev/res/r1", p.parse_request(b"hi", 100), b"")


def test_every_round_s_usage_is_added() -> None:
    j = job()
    j.add_usage({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    j.add_usage({"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21,
                 "completion_tokens_details": {"reasoning_tokens": 3}})  # fmt: skip
    assert j.usage == {"prompt_tokens": 30, "completion_tokens": 6, "total_tokens": 36}
    assert j.tokens_used == 36


def test_a_missing_total_is_the_sum_of_its_parts() -> None:
    j = job()
    j.add_usage({"prompt_tokens": 7, "completion_tokens": 2})
    assert j.usage == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def test_values_that_are_not_counts_are_ignored() -> None:
    j = job()
    bad: list[Any] = [None, "15", [1], {"total_tokens": -3}, {"total_tokens": True},
                      {"total_tokens": 2.5}, {"total_tokens": "9"}, {}]  # fmt: skip
    for usage in bad:
        j.add_usage(usage)
    assert j.usage is None and j.tokens_used == 0
    j.add_usage({"total_tokens": 4, "prompt_tokens": "x"})
    assert j.usage == {"total_tokens": 4}


def test_what_came_without_usage_is_estimated_at_a_token_per_4_characters() -> None:
    j = job()
    j.estimated_chars = 9
    assert j.tokens_used == 3  # rounded up
    j.add_usage({"total_tokens": 10})
    assert j.tokens_used == 13


def test_one_reply_reports_the_provider_s_own_usage_more_report_the_sum() -> None:
    j = job()
    j.fold = ReplyFold("m")
    j.fold.usage = {"total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}
    j.add_usage(j.fold.usage)
    j.rounds = 1
    assert j.reported_usage == {"total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}
    j.fold = ReplyFold("m")
    j.fold.usage = {"total_tokens": 6}
    j.add_usage(j.fold.usage)
    j.rounds = 2
    assert j.reported_usage == {"total_tokens": 11}
