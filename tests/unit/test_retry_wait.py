"""`Bridge._retry_wait`: when a failed API call is tried again, and after how long."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bridge.core import protocol as p
from bridge.core.errors import (
    UPSTREAM_ERROR,
    UPSTREAM_PROTOCOL,
    UPSTREAM_STATUS,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNREACHABLE,
    UpstreamError,
)
from bridge.core.job import Job
from bridge.core.service import Bridge
from tests.unit import fakes
from tests.unit.fakes import settings

PLENTY = 600.0


@pytest.fixture(scope="module")
def bridge() -> Bridge:
    s = settings(upstream_retries=3, upstream_retry_base=0.5, upstream_retry_max_wait=3.0)
    return Bridge(s)


def job(seq: int = 0) -> Job:
    j = Job("dev", "r1", "llm/dev/res/r1", p.parse_request(b"hi", 100), b"")
    j.seq = seq
    return j


def status(code: int, retry_after: float | None = None) -> UpstreamError:
    return UpstreamError(UPSTREAM_STATUS, f"upstream answered {code}", code, retry_after)


def test_waits_double_from_the_base_up_to_the_cap(bridge: Bridge) -> None:
    waits = [bridge._retry_wait(status(503), n, job(), PLENTY) for n in range(3)]
    assert waits == [0.5, 1.0, 2.0]
    b = Bridge(settings(upstream_retries=9, upstream_retry_base=0.5, upstream_retry_max_wait=3.0))
    assert b._retry_wait(status(503), 5, job(), PLENTY) == 3.0


def test_gives_up_after_the_configured_retries(bridge: Bridge) -> None:
    assert bridge._retry_wait(status(503), 3, job(), PLENTY) is None


@pytest.mark.parametrize("code", [408, 409, 425, 429, 500, 502, 503, 504])
def test_statuses_that_may_pass_are_retried(bridge: Bridge, code: int) -> None:
    assert bridge._retry_wait(status(code), 0, job(), PLENTY) == 0.5


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413, 422, 501])
def test_statuses_that_will_not_pass_are_not_retried(bridge: Bridge, code: int) -> None:
    assert bridge._retry_wait(status(code), 0, job(), PLENTY) is None


@pytest.mark.parametrize(
    ("code", "retried"),
    [(UPSTREAM_TIMEOUT, True), (UPSTREAM_UNREACHABLE, True), (UPSTREAM_PROTOCOL, True),
     (UPSTREAM_ERROR, False)],
)  # fmt: skip
def test_failures_without_a_status(bridge: Bridge, code: str, retried: bool) -> None:
    wait = bridge._retry_wait(UpstreamError(code, "x"), 0, job(), PLENTY)
    assert (wait is not None) is retried


def test_never_after_a_piece_of_the_reply_was_published(bridge: Bridge) -> None:
    assert bridge._retry_wait(status(503), 0, job(seq=1), PLENTY) is None


def test_retry_after_lengthens_the_wait(bridge: Bridge) -> None:
    assert bridge._retry_wait(status(429, retry_after=2.5), 0, job(), PLENTY) == 2.5
    # ...but never shortens it
    assert bridge._retry_wait(status(429, retry_after=0.1), 1, job(), PLENTY) == 1.0


def test_retry_after_beyond_the_cap_gives_up(bridge: Bridge) -> None:
    assert bridge._retry_wait(status(429, retry_after=3.5), 0, job(), PLENTY) is None


def test_no_wait_that_would_outlast_the_request_s_deadline(bridge: Bridge) -> None:
    assert bridge._retry_wait(status(503), 1, job(), time_left=1.0) is None
    assert bridge._retry_wait(status(503), 1, job(), time_left=1.01) == 1.0


def test_the_bridge_retries_in_memory_and_publishes_one_reply() -> None:
    """The waits above, used: a 503 and a 429, then the reply; the device sees only the reply."""

    async def main() -> None:
        answers = [httpx.Response(503), httpx.Response(429, headers={"retry-after-ms": "1"}),
                   fakes.reply_stream("ok")]  # fmt: skip
        b, link = fakes.bridge(
            lambda _r: answers.pop(0), upstream_retries=2, upstream_retry_base=0.001
        )
        b.submit("dev", b'{"id":"r2","prompt":"hi"}')
        await fakes.settle(b)
        assert [s.message.get("delta") for s in link.sent] == ["ok", None]
        assert "done" in link.sent[-1].message and answers == []

    asyncio.run(main())
