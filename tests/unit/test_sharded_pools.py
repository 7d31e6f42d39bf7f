"""`ShardedTransport`: small upstream pools behind one transport, a request to the least busy."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bridge.core.netio import SHARD_CONNECTIONS, ShardedTransport


class Recording(httpx.AsyncBaseTransport):
    """A pool that answers every request at once with a streamed body, and says who it is."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.requests = 0
        self.closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.fail:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, headers={"x-pool": self.name}, stream=Body(self.name.encode()))

    async def aclose(self) -> None:
        self.closed = True


class Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closes = 0

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield self.data

    async def aclose(self) -> None:
        self.closes += 1


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_open_responses_spread_over_the_pools_and_a_closed_one_frees_its_pool() -> None:
    pools = [Recording("a"), Recording("b"), Recording("c")]
    t = ShardedTransport(pools)  # type: ignore[arg-type]

    async def go() -> None:
        async with httpx.AsyncClient(transport=t, base_url="http://x") as c:
            r1 = await c.send(c.build_request("GET", "/"), stream=True)
            r2 = await c.send(c.build_request("GET", "/"), stream=True)
            r3 = await c.send(c.build_request("GET", "/"), stream=True)
            assert t.busy() == [1, 1, 1]  # three open responses, one in each pool
            assert [r.headers["x-pool"] for r in (r1, r2, r3)] == ["a", "b", "c"]
            await r2.aclose()
            assert t.busy() == [1, 0, 1]
            r4 = await c.send(c.build_request("GET", "/"), stream=True)
            assert r4.headers["x-pool"] == "b"  # the pool that had a free place
            assert await r4.aread() == b"b"  # read to the end: closed, its pool freed
            assert t.busy() == [1, 0, 1]
            for r in (r1, r3):
                await r.aclose()
            assert t.busy() == [0, 0, 0]

    run(go())
    assert [p.requests for p in pools] == [1, 2, 1]


def test_a_response_closed_twice_is_counted_once() -> None:
    t = ShardedTransport([Recording("a"), Recording("b")])  # type: ignore[list-item]

    async def go() -> None:
        resp = await t.handle_async_request(httpx.Request("GET", "http://x/"))
        assert t.busy() == [1, 0]
        await resp.aclose()
        await resp.aclose()
        assert t.busy() == [0, 0]

    run(go())


def test_a_request_that_fails_leaves_its_pool_free() -> None:
    t = ShardedTransport([Recording("a", fail=True)])  # type: ignore[list-item]

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await t.handle_async_request(httpx.Request("GET", "http://x/"))
        assert t.busy() == [0]

    run(go())


def test_closing_the_transport_closes_every_pool() -> None:
    pools = [Recording("a"), Recording("b")]
    run(ShardedTransport(pools).aclose())  # type: ignore[arg-type]
    assert all(p.closed for p in pools)


@pytest.mark.parametrize("total", [1, 16, 17, 520])
def test_open_makes_small_pools_that_hold_the_total(total: int) -> None:
    t = ShardedTransport.open(total, trust_env=False)
    assert t.shards == -(-total // SHARD_CONNECTIONS)
    assert t.shards * SHARD_CONNECTIONS >= total
    run(t.aclose())


def test_no_pools_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one pool"):
        ShardedTransport([])
