"""The images plugin's parts one at a time: upload assembly, the camera cache, the request
body, the mock's image endpoint and vision check, and Upstream.generate_image."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from bridge.core import protocol as p
from bridge.core.errors import ProtocolError, UpstreamError
from bridge.core.settings import load_settings
from bridge.core.upstream import Upstream
from bridge.dev.mock_llm import picture, running_mock
from bridge.plugins import imaging
from bridge.plugins.images import (
    UPLOADS_PER_DEVICE,
    Cameras,
    ImagesPlugin,
    PictureError,
    Uploads,
    add_images,
)

KEY = "sk-units-0123456789"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def piece(seq: int, data: bytes = b"", kind: int = imaging.DATA) -> bytes:
    return imaging.pack_piece(seq, kind, imaging.FORMAT_CODES["jpeg"], data)


# --- uploads -------------------------------------------------------------------------------


def test_upload_is_assembled_in_order_and_redeliveries_are_ignored() -> None:
    async def go() -> tuple[bytes, int]:
        up = Uploads(10_000, 5)
        up.feed("d", "r", piece(0, b"ab"), 100)
        up.feed("d", "r", piece(0, b"ab"), 100)  # QoS 1 redelivery
        task = asyncio.create_task(up.take("d", "r", 100))
        await asyncio.sleep(0.01)
        up.feed("d", "r", piece(1, b"cd"), 100)
        up.feed("d", "r", piece(2, kind=imaging.END), 100)
        result = await task
        assert len(up) == 0 and up.held == 0  # taken and forgotten
        return result

    assert run(go()) == (b"abcd", imaging.FORMAT_CODES["jpeg"])


@pytest.mark.parametrize(
    ("pieces", "code", "words"),
    [
        ([piece(0, b"ab"), piece(2, b"cd")], p.BAD_REQUEST, "piece 2 came after piece 0"),
        ([piece(0, b"x" * 60), piece(1, b"x" * 60)], p.TOO_LARGE, "100 bytes"),
        ([piece(0, b"camera broke", imaging.ERROR)], p.BAD_REQUEST, "camera broke"),
        ([b"\x00\x01"], p.BAD_REQUEST, "header"),
        ([piece(0, kind=imaging.END)], p.BAD_REQUEST, "empty"),
    ],
)
def test_broken_uploads_end_with_their_error(pieces: list[bytes], code: str, words: str) -> None:
    async def go() -> None:
        up = Uploads(10_000, 5)
        for m in pieces:
            up.feed("d", "r", m, 100)
        with pytest.raises(PictureError, match=words) as info:
            await up.take("d", "r", 100)
        assert info.value.code == code
        assert up.held == 0

    run(go())


def test_uploads_are_bounded_in_total_and_per_device() -> None:
    async def go() -> None:
        up = Uploads(150, 5)
        up.feed("a", "r1", piece(0, b"x" * 100), 1000)
        up.feed("b", "r1", piece(0, b"x" * 100), 1000)  # past the total: refused
        with pytest.raises(PictureError) as info:
            await up.take("b", "r1", 1000)
        assert info.value.code == p.OVERLOADED
        assert up.held == 100
        for n in range(UPLOADS_PER_DEVICE + 2):  # the oldest unclaimed ones make room
            up.feed("c", f"r{n}", piece(0, b"y"), 1000)
        assert sum(1 for key in up._uploads if key[0] == "c") == UPLOADS_PER_DEVICE

    run(go())


def test_stalled_upload_times_out_and_unclaimed_ones_expire() -> None:
    async def go() -> None:
        up = Uploads(10_000, 0.2)
        up.feed("d", "r", piece(0, b"ab"), 100)
        with pytest.raises(PictureError, match=r"incomplete after 0.2 s \(1 pieces, no end\)"):
            await up.take("d", "r", 100)
        up.feed("d", "lost", piece(0, b"ab"), 100)
        await asyncio.sleep(0.25)
        up.expire()
        assert len(up) == 0 and up.held == 0

    run(go())


# --- cameras -------------------------------------------------------------------------------


def test_camera_cache_latest_next_clear_and_bounds() -> None:
    async def go() -> None:
        cams = Cameras(max_bytes=10, total_bytes=15)
        cams.feed("cam/a", b"aaaa")
        assert await cams.latest("cam/a", 0.1) == b"aaaa"
        waiting = asyncio.create_task(cams.latest("cam/b", 1))
        await asyncio.sleep(0.01)
        cams.feed("cam/b", b"bbbbbbbb")
        assert await waiting == b"bbbbbbbb"
        cams.feed("cam/c", b"cccccc")  # 4 + 8 + 6 > 15: the oldest (a) goes
        with pytest.raises(PictureError, match="no picture on cam/a within 50 ms"):
            await cams.latest("cam/a", 0.05)
        cams.feed("cam/b", b"")  # a cleared retained message
        cams.feed("cam/c", b"x" * 11)  # too large: ignored, and the old one is gone
        assert cams.held == 0

    run(go())


# --- the request body ----------------------------------------------------------------------


def test_images_join_the_last_user_message() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "what is this?"},
        ]
    }
    add_images(body, ["data:image/jpeg;base64,AA", "data:image/jpeg;base64,BB"])
    assert body["messages"][0]["content"] == "first"
    assert body["messages"][2]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AA"}},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,BB"}},
    ]


def test_pictures_turned_off_are_refused_at_admission() -> None:
    plugin = ImagesPlugin(load_settings(images=False))
    request = p.parse_request(
        b'{"image":{"prompt":"x","width":8,"height":8,"format":"png"}}', 10_000
    )
    with pytest.raises(ProtocolError, match="turned off") as info:
        plugin.admit("d", request, 10)
    assert info.value.code == p.BAD_REQUEST
    plugin.admit("d", p.parse_request(b'{"prompt":"no pictures"}', 10_000), 10)


@pytest.mark.parametrize(
    ("spec", "code", "words"),
    [
        (b'"width":2048,"height":2048,"format":"rgb565"', p.TOO_LARGE, "8388608 bytes"),
        (b'"width":1024,"height":1024,"format":"rgb565","piece_bytes":64', p.BAD_REQUEST,
         "more than 8192 pieces"),
    ],
)  # fmt: skip
def test_pictures_too_large_or_in_too_many_pieces_are_refused(
    spec: bytes, code: str, words: str
) -> None:
    plugin = ImagesPlugin(load_settings(image_max_bytes=4 * 1024 * 1024))
    request = p.parse_request(b'{"image":{"prompt":"x",' + spec + b"}}", 10_000)
    with pytest.raises(ProtocolError, match=words) as info:
        plugin.admit("d", request, 10)
    assert info.value.code == code


# --- the mock ------------------------------------------------------------------------------


def test_mock_draws_the_prompt_and_checks_vision_parts() -> None:
    with running_mock(api_key=KEY) as mock:
        client = httpx.Client(base_url=mock.base_url, headers={"Authorization": f"Bearer {KEY}"})
        r = client.post("/images/generations", json={"prompt": "a boat", "size": "64x32"})
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(png)).tobytes() == picture("a boat", 64, 32).tobytes()
        url_form = {"prompt": "a boat", "size": "64x32", "response_format": "url"}
        r = client.post("/images/generations", json=url_form)
        fetched = httpx.get(r.json()["data"][0]["url"])
        assert fetched.content == png
        for bad in ({"size": "huge"}, {"n": 2}, {"response_format": "gif"}, {"prompt": ""}):
            assert (
                client.post("/images/generations", json={"prompt": "x", **bad}).status_code == 400
            )
        r = client.post("/images/generations", json={"prompt": "x [mock status=503]"})
        assert r.status_code == 503

        def ask(url: str) -> httpx.Response:
            parts = [{"type": "text", "text": "see [mock images_max_side=100]"},
                     {"type": "image_url", "image_url": {"url": url}}]  # fmt: skip
            return client.post("/chat/completions",
                               json={"messages": [{"role": "user", "content": parts}]})  # fmt: skip

        small = imaging.data_uri(imaging.jpeg_bytes(picture("s", 100, 50)))
        assert ask(small).json()["choices"][0]["message"]["content"] == "I see 1 image."
        assert mock.requests[-1]["images"] == [
            {"format": "JPEG", "width": 100, "height": 50, "media_type": "image/jpeg"}
        ]
        large = imaging.data_uri(imaging.jpeg_bytes(picture("l", 101, 50)))
        png_uri = "data:image/png;base64," + base64.b64encode(png).decode()
        for url in (large, png_uri, "data:image/jpeg;base64,AAAA"):
            r = ask(url)
            assert r.status_code == 400 and "not an inline JPEG" in r.text


# --- Upstream.generate_image ---------------------------------------------------------------


def test_generate_image_b64_url_errors_and_size_bound() -> None:
    with running_mock(api_key=KEY) as mock:
        settings = load_settings(OPENAI_BASE_URL=mock.base_url, OPENAI_API_KEY=KEY)

        async def go() -> None:
            up = Upstream(settings)
            try:
                made = await up.generate_image("a kite", model="m", size="96x48", max_bytes=10**6)
                data = made.data
                assert Image.open(io.BytesIO(data)).size == (96, 48)
                # the mock reports usage as gpt-image-1 does: it comes with chat-style keys
                assert (
                    made.usage is not None
                    and made.usage["total_tokens"]
                    == (made.usage["prompt_tokens"] + made.usage["completion_tokens"])
                    > 0
                )
                via_url = await up.generate_image(
                    "a kite [mock url]", model="m", size="96x48", max_bytes=10**6
                )
                assert via_url.data == data
                fetch = mock.requests[-1]
                assert fetch["path"].startswith("/mock/images/")
                assert "authorization" not in fetch["headers"]  # the key stays with the API
                with pytest.raises(UpstreamError) as info:
                    await up.generate_image("x [mock status=429]", model="m", size="64x64",
                                            max_bytes=10**6)  # fmt: skip
                assert (info.value.code, info.value.status, info.value.retryable) == (
                    p.UPSTREAM_STATUS, 429, True,
                )  # fmt: skip
                for prompt in ("big", "big [mock url]"):
                    with pytest.raises(UpstreamError, match="larger than 100 bytes"):
                        await up.generate_image(prompt, model="m", size="64x64", max_bytes=100)
            finally:
                await up.aclose()

        run(go())


def test_image_api_keys_never_reach_an_error_message() -> None:
    images_key = "sk-images-only-9876543210"
    with running_mock(api_key=images_key) as mock:
        settings = load_settings(
            OPENAI_BASE_URL="http://127.0.0.1:9/v1",
            OPENAI_API_KEY=KEY,
            OPENAI_IMAGES_BASE_URL=mock.base_url,
            OPENAI_IMAGES_API_KEY=images_key,
        )

        async def go() -> None:
            up = Upstream(settings)
            try:
                made = await up.generate_image("ok", model="m", size="64x64", max_bytes=10**6)
                assert made.data.startswith(b"\x89PNG")  # the image API's own key was accepted
                for echo in ("echo_auth=0", "echo_auth=3 echo_keep=12"):
                    with pytest.raises(UpstreamError) as info:
                        await up.generate_image(f"x [mock status=401 {echo}]", model="m",
                                                size="64x64", max_bytes=10**6)  # fmt: skip
                    message = info.value.message
                    assert "Incorrect API key provided" in message
                    assert images_key not in message and images_key[:12] not in message
                    assert KEY not in message
            finally:
                await up.aclose()

        run(go())
