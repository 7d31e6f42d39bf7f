"""Pictures for models and for small screens: safe decoding, resizing, pixel formats (Pillow).

Why a module of its own: the images plugin, the mock LLM, the demo and the tests
all need the same conversions, and none of them may do I/O here. Every input is
untrusted (a camera topic, a device's upload, an API's reply): it is decoded
only after its header passed the pixel limit, by a closed list of decoders.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
from functools import cache
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from PIL import Image

# numpy and Pillow are imported where pixels are worked, not here: every bridge
# loads this module (it refuses or routes picture requests), and the two add
# about 170 ms to each start and 10 MB to a bridge that never sees a picture.

# The formats a device may ask for (docs/protocol.md "Pictures").
RGB565: Final = "rgb565"  # 16 bits a pixel, little-endian: framebuf.RGB565 on a Pico
RGB565_BE: Final = "rgb565_be"  # big-endian, as an ST7789 or ILI9341 takes it on the wire
MONO1: Final = "mono1"  # 1 bit a pixel, rows of bytes, leftmost pixel in bit 7 (MONO_HLSB)
MONO1_VLSB: Final = "mono1_vlsb"  # 1 bit a pixel, bytes of 8 rows, top in bit 0 (SSD1306)
GRAY4: Final = "gray4"  # 4 bits a pixel, left pixel in the high nibble (framebuf.GS4_HMSB)
JPEG: Final = "jpeg"
PNG: Final = "png"
FORMATS: Final = (RGB565, RGB565_BE, MONO1, MONO1_VLSB, GRAY4, JPEG, PNG)
RAW_FORMATS: Final = (RGB565, RGB565_BE, MONO1, MONO1_VLSB, GRAY4)

# Decoders tried on untrusted bytes: the common photo formats, nothing exotic.
DECODERS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


@cache
def _gray16() -> Image.Image:
    """A palette of 16 grays repeated over all 256 entries, so that any index Pillow
    picks while dithering is a valid gray once reduced modulo 16."""
    from PIL import Image  # noqa: PLC0415 (at first use: see above)

    palette = Image.new("P", (1, 1))
    palette.putpalette([(i % 16) * 17 for i in range(256) for _ in range(3)])
    return palette


class ImageError(ValueError):
    """Bytes that are not an image the bridge accepts; the message says why, for the device."""


def open_image(data: bytes, max_pixels: int, *, draft: int = 0) -> Image.Image:
    """Decode untrusted bytes into an RGB image, refusing what is not one or is too large.

    Args:
        data: the encoded image.
        max_pixels: width x height above which it is refused before decoding (a
            decompression bomb decodes a few bytes into gigabytes).
        draft: a JPEG may be decoded at a reduced scale when this many pixels on
            its longest side are enough (much faster for a 5 MP snapshot).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415 (at first use)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=DECODERS)
            width, height = opened.size
            if width < 1 or height < 1:
                raise ImageError("the image has no pixels")
            if width * height > max_pixels:
                raise ImageError(f"the image is {width}x{height}, more than {max_pixels} pixels")
            if draft and opened.format == "JPEG":
                opened.draft("RGB", (draft, draft))
            opened.load()
            im: Image.Image = ImageOps.exif_transpose(opened)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (JPEG, PNG, WebP, GIF or BMP)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image has more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image cannot be decoded: {str(exc)[:120]}") from None
    if im.mode != "RGB":
        im = _flatten(im)
    return im


def _flatten(im: Image.Image) -> Image.Image:
    """RGB, with any transparency laid on white (how a page or a screen shows it)."""
    from PIL import Image  # noqa: PLC0415 (at first use)

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def fit_within(im: Image.Image, max_side: int) -> Image.Image:
    """The image scaled down (never up) so that its longest side is at most `max_side`."""
    if max(im.size) <= max_side:
        return im
    from PIL import Image  # noqa: PLC0415 (at first use)

    scale = max_side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def jpeg_bytes(im: Image.Image, quality: int = 85) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def for_vision(data: bytes, max_side: int, max_pixels: int, quality: int = 85) -> bytes:
    """What goes upstream for any picture: decoded, at most `max_side` px, re-encoded as JPEG.

    Re-encoding is deliberate even for a small JPEG: the bytes the model gets are
    always ones this function made, never the original (metadata, location
    included) and never something that only looks like an image.
    """
    im = open_image(data, max_pixels, draft=max_side)
    return jpeg_bytes(fit_within(im, max_side), quality)


def data_uri(jpeg: bytes) -> str:
    """An `image_url` for a JPEG, inline (the API never fetches anything of ours)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def decode_data_uri(url: str) -> bytes | None:
    """The bytes of a base64 `data:` URL, None for any other URL (left as it is)."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ImageError("an inline image must be a base64 data: URL")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise ImageError("an inline image's base64 is not valid") from None


# --- pictures for screens ------------------------------------------------------------------


def screen_size(width: int, height: int, fmt: str) -> int:
    """How many bytes a raw picture of this size and format has (0 for jpeg and png)."""
    if fmt in (RGB565, RGB565_BE):
        return width * height * 2
    if fmt == MONO1:
        return (width + 7) // 8 * height
    if fmt == MONO1_VLSB:
        return width * ((height + 7) // 8)
    if fmt == GRAY4:
        return (width + 1) // 2 * height
    return 0


def to_screen(im: Image.Image, width: int, height: int, fmt: str) -> bytes:
    """The picture cropped to the screen's aspect, scaled to `width` x `height`, in `fmt`.

    The layouts are MicroPython's `framebuf` ones, so a device copies the bytes
    into a FrameBuffer's buffer as they come. 1 is a lit (white) pixel.
    """
    import numpy as np  # noqa: PLC0415 (at first use)
    from PIL import Image, ImageOps  # noqa: PLC0415

    im = ImageOps.fit(im.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    if fmt in (RGB565, RGB565_BE):
        rgb = np.asarray(im, dtype=np.uint16)
        value = ((rgb[..., 0] >> 3) << 11) | ((rgb[..., 1] >> 2) << 5) | (rgb[..., 2] >> 3)
        return value.astype("<u2" if fmt == RGB565 else ">u2").tobytes()
    if fmt == MONO1:
        return im.convert("L").convert("1").tobytes()  # Floyd-Steinberg dithering
    if fmt == MONO1_VLSB:
        dithered = im.convert("L").convert("1")
        # A column of the picture is a row of the transposed one: packed least
        # significant bit first, it gives each column's bands of 8 pixels.
        columns = dithered.transpose(Image.Transpose.TRANSPOSE).tobytes("raw", "1;R")
        bands = (height + 7) // 8
        packed = bytearray(len(columns))
        for band in range(bands):
            packed[band * width : (band + 1) * width] = columns[band::bands]
        return bytes(packed)
    if fmt == GRAY4:
        # Pillow dithers to a palette only from RGB; the grays are taken first.
        quantized = (
            im.convert("L")
            .convert("RGB")
            .quantize(palette=_gray16(), dither=Image.Dither.FLOYDSTEINBERG)
        )
        levels = np.asarray(quantized, dtype=np.uint8) & 0x0F
        indexed = Image.frombytes("P", (width, height), levels.tobytes())
        return indexed.tobytes("raw", "P;4")
    out = io.BytesIO()
    if fmt == JPEG:
        im.save(out, "JPEG", quality=85, optimize=True)
    elif fmt == PNG:
        im.save(out, "PNG", optimize=True)
    else:
        raise ImageError(f"unknown picture format {fmt!r}")
    return out.getvalue()


def from_screen(data: bytes, width: int, height: int, fmt: str) -> Image.Image:
    """A device's picture back as an RGB image (the demo shows it, tests check it)."""
    import numpy as np  # noqa: PLC0415 (at first use)
    from PIL import Image  # noqa: PLC0415

    expected = screen_size(width, height, fmt)
    if expected and len(data) != expected:
        raise ImageError(f"{fmt} {width}x{height} has {expected} bytes, not {len(data)}")
    if fmt in (RGB565, RGB565_BE):
        value = np.frombuffer(data, dtype="<u2" if fmt == RGB565 else ">u2").reshape(height, width)
        r = ((value >> 11) & 0x1F) * 255 // 31
        g = ((value >> 5) & 0x3F) * 255 // 63
        b = (value & 0x1F) * 255 // 31
        return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), "RGB")
    if fmt == MONO1:
        return Image.frombytes("1", (width, height), data).convert("RGB")
    if fmt == MONO1_VLSB:
        bands = (height + 7) // 8
        columns = bytearray(len(data))
        for band in range(bands):
            columns[band::bands] = data[band * width : (band + 1) * width]
        transposed = Image.frombytes("1", (height, width), bytes(columns), "raw", "1;R")
        return transposed.transpose(Image.Transpose.TRANSPOSE).convert("RGB")
    if fmt == GRAY4:
        levels = Image.frombytes("P", (width, height), data, "raw", "P;4")
        gray = (np.asarray(levels, dtype=np.uint8) & 0x0F) * 17
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    return open_image(data, max(width * height, 1) * 4)


# --- binary pieces on P/D/upload/R and P/D/image/R ------------------------------------------

PIECE_HEADER: Final = struct.Struct("<IBBH")
"""seq (u32), kind (u8), format (u8), reserved (u16, 0); little-endian, 8 bytes.

The same header as the voice frames (docs/protocol.md, protocol v2), so one
device routine reads both; for pictures the last field is unused."""

DATA: Final = 0
END: Final = 1
ERROR: Final = 2

# Format codes in a piece's header (for an upload, the code of what is uploaded;
# an encoded file, whatever its kind, is `jpeg`'s code or `png`'s).
FORMAT_CODES: Final = {RGB565: 1, RGB565_BE: 2, MONO1: 3, MONO1_VLSB: 4, GRAY4: 5, JPEG: 6, PNG: 7}
FORMAT_NAMES: Final = {v: k for k, v in FORMAT_CODES.items()}


def pack_piece(seq: int, kind: int, fmt: int, payload: bytes = b"") -> bytes:
    """One binary message: the 8-byte header, then raw bytes (never base64)."""
    return PIECE_HEADER.pack(seq, kind, fmt, 0) + payload


def unpack_piece(data: bytes) -> tuple[int, int, int, bytes]:
    """(seq, kind, format, payload) of one message; ValueError when it is not a piece."""
    if len(data) < PIECE_HEADER.size:
        raise ValueError(f"a piece has an {PIECE_HEADER.size}-byte header; got {len(data)} bytes")
    seq, kind, fmt, _ = PIECE_HEADER.unpack_from(data)
    if kind not in (DATA, END, ERROR):
        raise ValueError(f"unknown piece kind {kind}")
    return seq, kind, fmt, bytes(data[PIECE_HEADER.size :])


def pieces(
    data: bytes, fmt: str, size: int, summary: dict[str, object] | None = None
) -> list[bytes]:
    """A picture cut into DATA pieces of at most `size` bytes, then the END piece, whose
    payload is `summary` as JSON (as a voice stream's end frame carries its summary)."""
    code = FORMAT_CODES[fmt]
    view = memoryview(data)
    out = [
        pack_piece(n, DATA, code, bytes(view[i : i + size]))
        for n, i in enumerate(range(0, len(data), size))
    ]
    tail = json.dumps(summary, separators=(",", ":")).encode() if summary else b""
    out.append(pack_piece(len(out), END, code, tail))
    return out


def error_text(payload: bytes) -> str:
    """What an ERROR piece says: `{"code":…,"message":…}` (the voice frames' form), or text."""
    try:
        body = json.loads(payload)
    except ValueError:
        return payload[:200].decode("utf-8", "replace")
    if isinstance(body, dict):
        return str(body.get("message") or body.get("code") or "")[:200]
    return str(body)[:200]
