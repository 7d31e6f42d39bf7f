"""Picture conversions (bridge/plugins/imaging.py): safe decoding, vision JPEGs, screen formats.

The screen formats are checked against MicroPython's own `framebuf` on the
real VM: the bytes the bridge sends, put in a FrameBuffer, show the pixels
the picture has.
"""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from bridge.dev.mock_llm import PICTURE_COLOURS, picture, picture_cells
from bridge.plugins import imaging
from tests.device.vmkit import run_vm


def encoded(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def test_vision_jpeg_is_resized_re_encoded_and_stripped_of_metadata() -> None:
    big = picture("a big snapshot", 2592, 1944)  # 5 MP, as a camera sends it
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # the camera's make
    original = encoded(big, "JPEG", quality=95, exif=exif)
    out = imaging.for_vision(original, 768, 40_000_000)
    im = Image.open(io.BytesIO(out))
    assert im.format == "JPEG"
    assert im.size == (768, 576)
    assert b"SecretCam" not in out
    assert len(out) < len(original) / 5


def test_small_pictures_are_not_enlarged() -> None:
    out = imaging.for_vision(encoded(picture("small", 64, 48)), 768, 40_000_000)
    assert Image.open(io.BytesIO(out)).size == (64, 48)


def test_transparency_is_laid_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    im = imaging.open_image(encoded(clear), 1000)
    assert im.mode == "RGB"
    assert im.getpixel((4, 4)) == (255, 255, 255)


def _png_of_size(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size with a tiny body: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a not really", "not an image"),
        (b"hello, world", "not an image"),
        (b"", "not an image"),
        (_png_of_size(30_000, 30_000), "pixels"),
        (_png_of_size(5000, 5000), "more than 1000000 pixels"),
    ],
)
def test_non_images_and_bombs_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(imaging.ImageError, match=message):
        imaging.for_vision(data, 768, 1_000_000)


def test_truncated_image_is_refused() -> None:
    whole = encoded(picture("cut", 320, 240), "JPEG")
    with pytest.raises(imaging.ImageError, match="cannot be decoded"):
        imaging.open_image(whole[: len(whole) // 2], 1_000_000)


@pytest.mark.parametrize("fmt", imaging.RAW_FORMATS)
def test_screen_formats_have_the_framebuf_sizes(fmt: str) -> None:
    for width, height in ((128, 64), (13, 7), (1, 1)):
        data = imaging.to_screen(picture("size", 64, 64), width, height, fmt)
        assert len(data) == imaging.screen_size(width, height, fmt)
        assert imaging.from_screen(data, width, height, fmt).size == (width, height)


def _cell_centres(width: int, height: int) -> list[tuple[int, int, tuple[int, int, int]]]:
    cells = picture_cells("checks")
    n = len(cells)
    return [
        ((2 * c + 1) * width // (2 * n), (2 * r + 1) * height // (2 * n), cells[r][c])
        for r in range(n)
        for c in range(n)
    ]


def test_rgb565_round_trip_is_exact_for_the_mock_colours() -> None:
    source = picture("checks", 256, 128)
    for fmt in (imaging.RGB565, imaging.RGB565_BE):
        back = imaging.from_screen(imaging.to_screen(source, 128, 64, fmt), 128, 64, fmt)
        for x, y, colour in _cell_centres(128, 64):
            assert back.getpixel((x, y)) == colour
    le = imaging.to_screen(Image.new("RGB", (1, 1), (255, 0, 0)), 1, 1, imaging.RGB565)
    be = imaging.to_screen(Image.new("RGB", (1, 1), (255, 0, 0)), 1, 1, imaging.RGB565_BE)
    assert (le, be) == (b"\x00\xf8", b"\xf8\x00")


def test_mono1_is_dithered() -> None:
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    for fmt in (imaging.MONO1, imaging.MONO1_VLSB):
        back = np.asarray(imaging.from_screen(imaging.to_screen(grey, 64, 64, fmt), 64, 64, fmt))
        lit = (back[..., 0] > 0).mean()
        assert 0.4 < lit < 0.6  # half the pixels lit, not all or none
    gray4 = imaging.to_screen(grey, 64, 64, imaging.GRAY4)
    levels = {b >> 4 for b in gray4} | {b & 15 for b in gray4}
    assert levels <= {7, 8}  # 128 lies between levels 7 (119) and 8 (136)


FRAMEBUF_PROGRAM = """
import framebuf, json
with open("spec.json") as f:
    spec = json.load(f)
with open(spec["path"], "rb") as f:
    buf = bytearray(f.read())
mode = getattr(framebuf, spec["mode"])
fb = framebuf.FrameBuffer(buf, spec["width"], spec["height"], mode)
print(json.dumps([fb.pixel(x, y) for x, y in spec["points"]]))
"""


@pytest.mark.device
@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        (imaging.MONO1, "MONO_HLSB"),
        (imaging.MONO1_VLSB, "MONO_VLSB"),
        (imaging.RGB565, "RGB565"),
        (imaging.GRAY4, "GS4_HMSB"),
    ],
)
def test_micropython_framebuf_reads_the_pixels(tmp_path, fmt: str, mode: str) -> None:
    width, height = 120, 60  # not multiples of 8 on purpose: padded rows and bands
    data = imaging.to_screen(picture("checks", 480, 240), width, height, fmt)
    (tmp_path / "pic.bin").write_bytes(data)
    (tmp_path / "fb.py").write_text(FRAMEBUF_PROGRAM)
    points = [(x, y) for x, y, _ in _cell_centres(width, height)]
    spec = {"path": "pic.bin", "mode": mode, "width": width, "height": height, "points": points}
    # in a file: this VM dies on a long command-line argument
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_vm(tmp_path / "fb.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for value, (_, _, colour) in zip(got, _cell_centres(width, height), strict=True):
        if fmt == imaging.RGB565:
            r, g, b = colour
            assert value == ((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3)
        elif fmt == imaging.GRAY4:
            luma = round(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])
            assert abs(value * 17 - luma) <= 17, (value, colour)
        elif colour in ((0, 0, 0), (255, 255, 255)):
            assert value == (1 if colour == (255, 255, 255) else 0)
    assert set(PICTURE_COLOURS) >= {c for _, _, c in _cell_centres(width, height)}


def test_pieces_carry_the_voice_header_and_end_with_a_marker() -> None:
    data = bytes(range(256)) * 10
    out = imaging.pieces(data, imaging.MONO1, 1000)
    assert [len(m) for m in out] == [1008, 1008, 568, 8]
    parsed = [imaging.unpack_piece(m) for m in out]
    assert [(s, k, f) for s, k, f, _ in parsed] == [(0, 0, 3), (1, 0, 3), (2, 0, 3), (3, 1, 3)]
    assert b"".join(d for *_, d in parsed) == data
    assert out[1][:8] == b"\x01\x00\x00\x00\x00\x03\x00\x00"
    with pytest.raises(ValueError, match="header"):
        imaging.unpack_piece(b"\x00\x00")
    end = imaging.unpack_piece(imaging.pieces(b"ab", imaging.PNG, 8, {"bytes": 2})[-1])
    assert end == (1, imaging.END, 7, b'{"bytes":2}')
    assert imaging.error_text(b'{"code":"cancelled","message":"camera off"}') == "camera off"
    assert imaging.error_text(b"plain words") == "plain words"
