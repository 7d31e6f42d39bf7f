"""Direct mode's `client.images.generate()` on the MicroPython VM against the HTTPS mock LLM.

The picture (a 788 KB PNG, over 1 MB as base64) is far larger
than the VM's 200 KB heap, so it can only arrive by being decoded and written
a socket read at a time.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from bridge.dev.mock_llm import picture
from tests.device import vmkit
from tests.device.conftest import API_KEY


def _records(stdout: str) -> dict[str, Any]:
    return {
        line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2])
        for line in stdout.splitlines()
        if line.startswith("R ")
    }


def _png(prompt: str, size: int) -> bytes:
    out = io.BytesIO()
    picture(prompt, size, size, noise=True).save(out, "PNG")
    return out.getvalue()


def test_generate_streams_the_picture_to_a_file_and_a_writer(
    tls_mock: Any, certs: dict[str, Path], tmp_path: Path
) -> None:
    proc = vmkit.run_vm(
        vmkit.PROGRAMS_DIR / "image_direct.py",
        tls_mock.base_url,
        API_KEY,
        str(certs["ca"]),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert API_KEY not in proc.stdout + proc.stderr
    r = _records(proc.stdout)
    assert r["checks"] == {
        "model_int": "TypeError",
        "model_empty": "ValueError",
        "prompt_empty": "ValueError",
        "size_bad": "ValueError",
        "format_bad": "ValueError",
        "out_bad": "TypeError",
        "timeout_bad": "ValueError",
    }
    # b64_json: the file holds exactly the mock's picture, decoded
    expected = _png("a noisy cat", 512)
    assert len(expected) > 3 * 200 * 1024  # nearly four times the whole heap
    written = (tmp_path / "cat.png").read_bytes()
    assert written == expected
    assert r["b64"]["bytes"] == len(expected)
    assert Image.open(tmp_path / "cat.png").size == (512, 512)
    # url: fetched from the mock, copied to the writer in pieces
    dog = _png("a noisy dog", 256)
    assert r["url"]["written"] == r["url"]["bytes"] == len(dog)
    assert r["url"]["sha256"] == hashlib.sha256(dog).hexdigest()
    assert r["url"]["url"].startswith("https://localhost:")
    assert r["url"]["largest"] <= 4096
    assert r["status"] == {"code": "upstream_status"}
    kite = io.BytesIO()
    picture("a kite", 64, 32).save(kite, "PNG")
    assert r["create"] == {  # uopenai's name for it: images.generations.create
        "bytes": len(kite.getvalue()),
        "sha256": hashlib.sha256(kite.getvalue()).hexdigest(),
    }
    generations = [q for q in tls_mock.requests if q["path"].endswith("/images/generations")]
    assert generations[-1]["headers"]["authorization"] == f"Bearer {API_KEY}"
    fetches = [q for q in tls_mock.requests if q["path"].startswith("/mock/images/")]
    assert fetches and "authorization" not in fetches[-1]["headers"]
    assert base64.b64encode(written)  # a real file, not a stub
