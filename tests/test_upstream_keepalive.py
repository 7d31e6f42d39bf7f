"""An idle API connection is kept `BRIDGE_UPSTREAM_KEEPALIVE` seconds for the next request.

Why: httpx keeps one 5 s; a device that asks every half minute then paid a
new TCP and TLS handshake to the API before each reply (`python -m
bench.starts --idle 6` measures it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from bridge.core.netio import ShardedTransport
from tests.harness import API_KEY


def _ports_of_two_calls(base_url: str, keepalive: float, idle: float) -> tuple[Any, Any]:
    async def go() -> tuple[Any, Any]:
        transport = ShardedTransport.open(4, keepalive=keepalive)
        ports = []
        try:
            for i in range(2):
                if i:
                    await asyncio.sleep(idle)
                request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                resp = await transport.handle_async_request(
                    httpx.Request(
                        "POST", base_url + "/chat/completions", json=request,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                    )
                )  # fmt: skip
                ports.append(resp.extensions["network_stream"].get_extra_info("client_addr"))
                await resp.aread()
                await resp.aclose()
        finally:
            await transport.aclose()
        return ports[0], ports[1]

    return asyncio.run(go())


def test_a_connection_idle_less_than_the_keepalive_is_used_again(mock_llm: Any) -> None:
    first, second = _ports_of_two_calls(mock_llm.base_url, keepalive=5.0, idle=1.5)
    assert first == second


def test_a_connection_idle_longer_is_closed_and_a_new_one_made(mock_llm: Any) -> None:
    first, second = _ports_of_two_calls(mock_llm.base_url, keepalive=1.0, idle=1.5)
    assert first != second
