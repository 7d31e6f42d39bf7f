"""The Python client (`bridge.dev.client`): ask, stream, cancel on task cancellation,
errors, and the openai-SDK-shaped `MqttOpenAI` (`bridge.dev.mqtt_openai`), against a real
Mosquitto and the bridge as a process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest

from bridge.dev.client import BridgeClient, BridgeError
from bridge.dev.mqtt_openai import ChatCompletion, MqttOpenAI
from tests.harness import API_KEY, BridgeProcess, Broker, Watcher

_ids = itertools.count()


def _device(broker: Broker) -> str:
    name = f"cl{next(_ids)}"
    broker.add_user(name)
    return name


def _terminal(w: Watcher, device: str, timeout: float = 5.0) -> dict[str, Any]:
    m = w.wait_for(
        lambda m: (
            m.topic.startswith(f"llm/{device}/res/") and ("done" in m.json or "error" in m.json)
        ),
        timeout,
    )
    return m.json  # type: ignore[no-any-return]


def test_ask_stream_and_last(broker: Broker, bridge: BridgeProcess) -> None:
    dev = _device(broker)

    async def main() -> None:
        async with BridgeClient(broker.url(dev), dev) as llm:
            assert await llm.ask("hello there") == "You said: hello there."
            assert llm.last is not None and llm.last.finish_reason == "stop"
            pieces = [p async for p in llm.stream("[mock tokens=6] six")]
            assert len(pieces) == 6
            assert llm.last.usage and llm.last.usage["completion_tokens"] == 6
            whole = [p async for p in llm.stream("in one", stream=False)]
            assert whole == [] and llm.last.text == "You said: in one."
            with pytest.raises(BridgeError) as err:
                await llm.ask("[mock status=400] no")
            assert err.value.code == "upstream_status" and err.value.status == 400

    asyncio.run(main())


def test_task_cancellation_cancels_the_request(broker: Broker, bridge: BridgeProcess) -> None:
    dev = _device(broker)
    w = Watcher(broker, [f"llm/{dev}/res/+"])
    try:

        async def main() -> None:
            async with BridgeClient(broker.url(dev), dev) as llm:
                task = asyncio.create_task(llm.ask("[mock tokens=400 delay_ms=20] long"))
                while len(w.msgs) < 3:  # streaming has started
                    await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                end = await asyncio.to_thread(_terminal, w, dev)
                assert end["error"]["code"] == "cancelled"
                assert end["seq"] < 100  # stopped early, not after all 400 tokens

                # Leaving a stream early cancels too.
                async for _piece in llm.stream("[mock tokens=400 delay_ms=20] again",
                                               request_id="early"):  # fmt: skip
                    break
                early = await asyncio.to_thread(
                    w.wait_for, lambda m: m.topic.endswith("/res/early") and "error" in m.json
                )
                assert early.json["error"]["code"] == "cancelled"

        asyncio.run(main())
    finally:
        w.close()


def test_idle_timeout(broker: Broker, bridge: BridgeProcess) -> None:
    dev = _device(broker)

    async def main() -> None:
        async with BridgeClient(broker.url(dev), dev, idle_timeout=0.5) as llm:
            with pytest.raises(BridgeError) as err:
                await llm.ask("[mock first_byte_delay_ms=1500] slow")
            assert err.value.code == "timeout"

    asyncio.run(main())


def test_openai_shaped_client(broker: Broker, bridge: BridgeProcess) -> None:
    dev = _device(broker)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]

    async def main() -> None:
        async with MqttOpenAI(broker.url(dev), dev) as client:
            done = await client.chat.completions.create(model="mock-1", messages=msgs)
            assert isinstance(done, ChatCompletion)
            assert done.choices[0].message.content == "You said: Hi there."
            assert done.choices[0].message.role == "assistant"
            assert done.choices[0].finish_reason == "stop"
            assert done.usage is not None and done.usage.total_tokens > 0
            assert done.model == "mock-1"

            stream = await client.chat.completions.create(
                model="mock-1", messages=msgs, stream=True, max_tokens=50,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            assert text == "You said: Hi there."
            assert chunks[0].choices[0].delta.role == "assistant"
            assert all(c.object == "chat.completion.chunk" for c in chunks)
            assert chunks[-1].choices[0].finish_reason == "stop"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

            tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
            call = await client.chat.completions.create(
                messages=[{"role": "user", "content": "call tool please"}], tools=tools
            )
            tc = call.choices[0].message.tool_calls
            assert call.choices[0].finish_reason == "tool_calls"
            assert tc and tc[0].function.name == "lookup"
            assert json.loads(tc[0].function.arguments or "{}") == {"q": "call tool please"}

            with pytest.raises(TypeError):
                await client.chat.completions.create(messages=msgs, logprobs=True)
            with pytest.raises(BridgeError) as err:
                await client.chat.completions.create(
                    messages=[{"role": "user", "content": "[mock status=401] x"}]
                )
            assert err.value.code == "upstream_status"

    asyncio.run(main())


def test_same_answer_as_the_openai_sdk_direct(
    broker: Broker, bridge: BridgeProcess, mock_llm: Any
) -> None:
    """Code written for the openai SDK sees the same completion through MQTT as over HTTP."""
    openai = pytest.importorskip("openai")
    dev = _device(broker)
    msgs = [{"role": "user", "content": "[mock tokens=9] compare me"}]

    async def main() -> None:
        direct = openai.AsyncOpenAI(base_url=mock_llm.base_url, api_key=API_KEY)
        via_http = await direct.chat.completions.create(model="mock-1", messages=msgs)
        await direct.close()
        async with MqttOpenAI(broker.url(dev), dev) as client:
            via_mqtt = await client.chat.completions.create(model="mock-1", messages=msgs)
        assert via_mqtt.choices[0].message.content == via_http.choices[0].message.content
        assert via_mqtt.choices[0].finish_reason == via_http.choices[0].finish_reason
        assert via_mqtt.usage is not None and via_http.usage is not None
        assert via_mqtt.usage.total_tokens == via_http.usage.total_tokens

    asyncio.run(main())
