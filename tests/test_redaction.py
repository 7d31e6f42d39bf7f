"""The API key never leaves the bridge, not even in part.

No run of 8 consecutive characters of the key may appear in a published
message, a log line or an exception, however an upstream echoes it: whole,
shortened ("sk-abc…xyz"), or where the bridge cuts an error's text.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import given, settings, strategies as st

from bridge.core import protocol as p
from bridge.core.errors import UpstreamError
from bridge.core.settings import load_settings
from bridge.core.upstream import SECRET_RUN, Redactor, Upstream
from tests.harness import API_KEY, BridgeProcess, Device

RUNS = {API_KEY[i : i + SECRET_RUN] for i in range(len(API_KEY) - SECRET_RUN + 1)}


def leaked(text: str) -> list[str]:
    """The runs of 8 characters of the key found in `text`."""
    return sorted(run for run in RUNS if run in text)


# --- the redactor ----------------------------------------------------------------------------


@st.composite
def echoing_texts(draw: st.DrawFn) -> str:
    """Text mixing junk (with the key's own characters) and pieces of the key of any length."""
    parts = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            parts.append(draw(st.text(alphabet=API_KEY + " …*\"'", max_size=30)))
        else:
            start = draw(st.integers(0, len(API_KEY) - 1))
            end = draw(st.integers(start + 1, len(API_KEY)))
            parts.append(API_KEY[start:end])
    return "".join(parts)


@given(echoing_texts())
@settings(max_examples=500, deadline=None)
def test_redactor_leaves_no_run_of_eight_key_characters(text: str) -> None:
    redacted = Redactor(API_KEY)(text)
    assert not leaked(redacted), (text, redacted)
    if not leaked(text):
        assert redacted == text  # nothing else is touched


def test_redactor_examples() -> None:
    r = Redactor(API_KEY)
    assert r(f"key {API_KEY}!") == "key ***!"
    assert r("Bearer sk-test-DO…4f9a7c2e1b") == "Bearer ***…***"
    assert r("sk-test") == "sk-test"  # 7 characters: allowed
    assert Redactor("k3y")("a k3y b") == "a *** b"  # a short key still goes whole
    assert Redactor("")("text") == "text"


# --- the upstream client, in process ---------------------------------------------------------


def _status_error(body: bytes, content_type: str) -> UpstreamError:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        return httpx.Response(401, headers={"content-type": content_type}, content=body)

    async def run() -> UpstreamError:
        settings = load_settings(OPENAI_BASE_URL="http://upstream.test/v1", OPENAI_API_KEY=API_KEY)
        up = Upstream(settings, transport=httpx.MockTransport(handler))
        try:
            async with up.stream({"model": "m"}):
                pass
        except UpstreamError as exc:
            return exc
        finally:
            await up.aclose()
        raise AssertionError("no error")

    return asyncio.run(run())


def _json_error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "code": "invalid_api_key"}}).encode()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        # the key across the 300-character cut of a JSON error's message
        (_json_error("x" * 250 + f"Incorrect API key: Bearer {API_KEY}"), "application/json"),
        (_json_error("x" * 280 + f"Bearer {API_KEY}"), "application/json"),
        # the key across the 200-character cut of a body that is not JSON
        (("y" * 190 + API_KEY).encode(), "text/plain"),
        # a shortened key, as providers show it
        (_json_error("Incorrect API key provided: sk-test-DO-NO…a7c2e1b"), "application/json"),
        ((f"auth={API_KEY[:12]}…{API_KEY[-12:]}").encode(), "text/html"),
    ],
)
def test_an_upstream_error_is_redacted_before_it_is_cut(body: bytes, content_type: str) -> None:
    exc = _status_error(body, content_type)
    assert exc.code == p.UPSTREAM_STATUS and exc.status == 401
    assert exc.message.startswith("upstream answered 401: ")
    assert "***" in exc.message
    assert not leaked(exc.message) and not leaked(str(exc)) and not leaked(repr(exc))


# --- end to end: Mosquitto, the bridge process, the mock LLM ---------------------------------


@pytest.mark.parametrize(
    "directives",
    [
        "status=401 echo_auth=0",  # the whole key
        # the key starts at P + 35 ("Incorrect API key provided: Bearer "): across the
        # 300-character cut of an error's message, with 25, 15 and 9 of its characters before
        "status=401 echo_auth=240",
        "status=400 echo_auth=250",
        "status=401 echo_auth=256",
        "status=401 echo_auth=0 echo_keep=15",  # shortened: "Bearer sk-test-…LEAK-4f9a7c2e1b"
        "status=401 echo_auth=245 echo_keep=20",
        "tokens=5 error_event_at=2 echo_auth=0 echo_keep=14",  # an error inside the stream
        "tokens=5 event_error_at=1 echo_auth=0 echo_keep=16",  # an `event: error`
        "tokens=5 error_event_at=1 echo_auth=0",
    ],
)
def test_an_echoed_key_reaches_neither_device_nor_log(
    bridge: BridgeProcess, device: Device, directives: str
) -> None:
    rid = "echo" + "".join(ch for ch in directives if ch.isdigit())
    reply = device.ask({"id": rid, "prompt": f"hi [mock {directives}]"})
    assert reply.error_code in (p.UPSTREAM_STATUS, p.UPSTREAM_ERROR)
    message = reply.terminal["error"]["message"]
    assert "Incorrect API key provided: Bearer" in message and "***" in message, message
    device.quiet_after(rid, 0.2)
    published = b"".join(payload for _, payload in device.raw).decode()
    assert not leaked(published), message
    assert not leaked(bridge.logs())
