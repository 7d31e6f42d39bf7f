"""`Upstream.models()` (`GET /models`) on its own: the ids in order and bounded, and every
failure an `UpstreamError` with the key redacted (a unit test with httpx's MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bridge.core.errors import UpstreamError
from bridge.core.settings import Settings
from bridge.core.upstream import Upstream

KEY = "sk-models-test-1234567890abcdef"


def _models(handler: object) -> list[str]:
    settings = Settings(openai_base_url="https://api.example/v1", openai_api_key=KEY)

    async def main() -> list[str]:
        up = Upstream(settings, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
        try:
            return await up.models()
        finally:
            await up.aclose()

    return asyncio.run(main())


def test_models_lists_ids_in_order_without_duplicates_or_junk() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        junk = [{"id": ""}, {"id": 3}, "x", {"id": "c" * 201}]
        data = [{"id": "b"}, {"id": "a"}, {"id": "b"}, *junk]
        return httpx.Response(200, json={"object": "list", "data": data})

    assert _models(handler) == ["b", "a"]
    assert str(seen[0].url) == "https://api.example/v1/models"
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("response", "code"),
    [
        (httpx.Response(401, json={"error": {"message": f"bad key {KEY}"}}), "upstream_status"),
        (httpx.Response(200, content=b"not json"), "upstream_protocol"),
        (httpx.Response(200, json={"data": {"id": "x"}}), "upstream_protocol"),
    ],
)
def test_models_failures_are_upstream_errors_without_the_key(
    response: httpx.Response, code: str
) -> None:
    with pytest.raises(UpstreamError) as info:
        _models(lambda _request: response)
    assert info.value.code == code
    assert KEY not in info.value.message and KEY not in json.dumps(info.value.args)
