"""picollm.image on the real MicroPython VM through Mosquitto and the bridge.

An upload read from a file larger than the VM's whole heap (so never held
whole), and generated pictures received into a `framebuf.FrameBuffer` (read
back with `FrameBuffer.pixel`) and into a file.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
from pathlib import Path
from typing import Any

from PIL import Image

from bridge.dev.mock_llm import picture, picture_cells
from bridge.plugins import imaging
from tests.device import vmkit
from tests.harness import Broker

_ids = itertools.count()
HEAP = "128K"


def run_steps(
    tmp_path: Path, broker: Broker, steps: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    device_id = f"vmpic{next(_ids)}"
    config = {
        "mode": "mqtt",
        "device_id": device_id,
        "prefix": broker.prefix,
        "broker": {"host": "127.0.0.1", "port": broker.port, "user": device_id,
                   "password": broker.add_user(device_id), "keepalive": 30},
        "reply_timeout_ms": 10000,
        "history": 0,
    }  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps({"config": config, "steps": steps}))
    proc = vmkit.run_vm(
        vmkit.PROGRAMS_DIR / "picture_job.py", "job.json", cwd=tmp_path, heapsize=HEAP, timeout=60
    )
    records = vmkit.parse_records(proc.stdout)
    assert proc.returncode == 0 and len(records) == len(steps), proc.stdout + proc.stderr
    return records


def test_upload_from_a_file_larger_than_the_heap(
    bridge: Any, broker: Broker, mock_llm: Any, tmp_path: Path
) -> None:
    noisy = picture("a cluttered shelf [mock noise]", 640, 480, noise=True)
    out = io.BytesIO()
    noisy.save(out, "JPEG", quality=95)
    photo = out.getvalue()
    assert len(photo) > 2 * 128 * 1024  # twice the VM's whole heap
    (tmp_path / "shelf.jpg").write_bytes(photo)
    rec, frame = run_steps(tmp_path, broker, [
        {"op": "ask_about", "prompt": "What is on it? vmshelf [mock images_max_side=768]",
         "path": "shelf.jpg", "piece": 4096},
        {"op": "ask_about", "prompt": "And now? vmframe", "frame": [96, 64], "piece": 2048},
    ])  # fmt: skip
    assert rec["ok"], rec
    assert rec["text"] == "I see 1 image."
    body = next(
        r for r in reversed(mock_llm.requests) if "vmshelf" in json.dumps(r.get("body") or "")
    )
    assert body["images"] == [
        {"format": "JPEG", "width": 640, "height": 480, "media_type": "image/jpeg"}
    ]
    # a raw frame from a buffer in memory, as a camera hands it over
    assert frame["ok"] and frame["text"] == "I see 1 image.", frame
    sent = next(
        r for r in reversed(mock_llm.requests) if "vmframe" in json.dumps(r.get("body") or "")
    )
    url = sent["body"]["messages"][-1]["content"][1]["image_url"]["url"]
    seen = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    assert seen.size == (96, 64)
    left, right = seen.getpixel((2, 32)), seen.getpixel((93, 32))
    assert left[0] < 30 and right[0] > 220 and right[1] < 40  # the ramp, black to red


def test_generated_pictures_land_in_a_framebuffer_and_a_file(
    bridge: Any, broker: Broker, tmp_path: Path
) -> None:
    width, height = 96, 48
    cells = picture_cells("a kite")
    n = len(cells)
    # The API's 1024x1024 picture is cropped to 2:1: the middle half of its rows.
    points, colours = [], []
    for r in range(n // 4, 3 * n // 4):
        for c in range(n):
            points.append([(2 * c + 1) * width // (2 * n), (2 * (r - n // 4) + 1) * height // n])
            colours.append(cells[r][c])
    steps = [
        {"op": "generate", "prompt": "a kite", "width": width, "height": height,
         "format": fmt, "sink": "framebuf", "points": points}
        for fmt in ("mono1", "rgb565", "mono1_vlsb")
    ] + [
        {"op": "generate", "prompt": "a kite", "width": width, "height": height,
         "format": "png", "sink": "file", "path": "kite.png"},
        {"op": "generate", "prompt": "x [mock status=400]", "width": 8, "height": 8,
         "format": "mono1", "sink": "framebuf", "points": []},
    ]  # fmt: skip
    mono, rgb, vlsb, png, bad = run_steps(tmp_path, broker, steps)
    for rec, fmt in ((mono, "mono1"), (rgb, "rgb565"), (vlsb, "mono1_vlsb")):
        assert rec["ok"], rec
        assert rec["info"]["bytes"] == imaging.screen_size(width, height, fmt)
        assert rec["info"]["format"] == fmt
    for got_mono, got_rgb, got_vlsb, (red, green, blue) in zip(
        mono["pixels"], rgb["pixels"], vlsb["pixels"], colours, strict=True
    ):
        assert got_rgb == ((red >> 3) << 11) | ((green >> 2) << 5) | (blue >> 3)
        if (red, green, blue) in ((0, 0, 0), (255, 255, 255)):
            assert got_mono == got_vlsb == (1 if red else 0)
    assert png["ok"] and png["info"]["bytes"] == (tmp_path / "kite.png").stat().st_size
    assert Image.open(tmp_path / "kite.png").size == (width, height)
    assert bad == {"ok": False, "code": "upstream_status", "message": bad["message"]}
