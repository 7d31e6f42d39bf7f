"""``llm-bridge device deploy`` and mip installs, against a stand-in board.

The stand-in is the MicroPython VM's REPL behind a pseudo-terminal bridged to
``socket://127.0.0.1:PORT``, which mpremote opens like a serial port. mip's
package index is served from a local folder holding umqtt.simple from
``.cache/umqtt`` in micropython-lib's layout, so nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bridge.ops.deploy import add_deploy_arguments, run_deploy
from bridge.dev.mock_llm import reply_tokens
from tests.device import vmkit
from tests.harness import API_KEY as MOCK_KEY


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, umqtt_dir: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server for a folder with ``index/`` (a mip index) and ``repo/device/``."""
    root = tmp_path_factory.mktemp("web")
    content = (umqtt_dir / "umqtt" / "simple.py").read_bytes()
    digest = hashlib.sha256(content).hexdigest()[:8]
    (root / "index" / "file" / digest[:2]).mkdir(parents=True)
    (root / "index" / "file" / digest[:2] / digest).write_bytes(content)
    for mpy in ("py", "6"):
        folder = root / "index" / "package" / mpy / "umqtt.simple"
        folder.mkdir(parents=True)
        (folder / "latest.json").write_text(
            json.dumps({"hashes": [["umqtt/simple.py", digest]], "version": "1.3.4"})
        )
    shutil.copytree(
        vmkit.DEVICE_DIR, root / "repo" / "device", ignore=shutil.ignore_patterns("__pycache__")
    )
    handler = functools.partial(_Quiet, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.fixture
def board(tmp_path: Path) -> Iterator[vmkit.SerialStandIn]:
    root = tmp_path / "board"
    (root / "lib").mkdir(parents=True)
    env = vmkit.vm_env()
    # like a Pico: the board's /lib (mip's target) and the stand-ins only
    env["MICROPYPATH"] = f".frozen:{root / 'lib'}:{vmkit.STUBS_DIR}"
    b = vmkit.SerialStandIn(root, env)
    yield b
    b.close()


def _mpremote(board: vmkit.SerialStandIn, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpremote", "connect", board.url, "resume", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _deploy(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_deploy_arguments(parser)
    return run_deploy(parser.parse_args(list(argv)))


def _config(tmp_path: Path, base_url: str) -> Path:
    cfg = {
        "mode": "direct",
        "device_id": "bench",
        "model": "mock-1",
        "api_key": MOCK_KEY,
        "base_url": base_url,
        "prompts": ["hello from deploy"],
        "gpio": {"led": None, "button": None},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_dry_run_prints_the_steps(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = _config(tmp_path, "http://127.0.0.1:9/v1")
    assert _deploy("--port", "socket://127.0.0.1:9", "--config", str(cfg), "--dry-run") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 4
    assert lines[0] == "[1/4] mpremote connect socket://127.0.0.1:9 mip install umqtt.simple"
    assert "fs cp" in lines[1] and ":picollm/" in lines[1] and "openai.py" in lines[1]
    assert lines[2].endswith(":main.py")
    assert lines[3].endswith(f"{cfg} :config.json")
    assert MOCK_KEY not in out


def test_bad_config_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mode": "direct", "api_key": "sk-secret-value"}))
    assert _deploy("--port", "x", "--config", str(bad), "--dry-run") == 2
    captured = capsys.readouterr()
    assert "needs api_key and model" in captured.err
    assert "sk-secret-value" not in captured.out + captured.err


@pytest.mark.parametrize("mpy", [False, True], ids=["py", "mpy"])
def test_deploy_to_a_stand_in_board(
    *,
    mpy: bool,
    board: vmkit.SerialStandIn,
    web: tuple[str, Path],
    mock_llm: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, _ = web
    cfg = _config(tmp_path, mock_llm.base_url)
    argv = ["--port", board.url, "--resume", "--config", str(cfg), "--mip-index", base + "/index"]
    assert _deploy(*argv, *(["--mpy"] if mpy else [])) == 0, board.output.decode()[-2000:]
    out = capsys.readouterr().out
    assert "[1/4] mpremote connect" in out and "[4/4]" in out
    root = board.root
    # the files arrived
    ext = ".mpy" if mpy else ".py"
    for src in sorted((vmkit.DEVICE_DIR / "picollm").glob("*.py")):
        copied = root / "picollm" / (src.stem + ext)
        assert copied.is_file(), copied
        if not mpy:
            assert copied.read_bytes() == src.read_bytes()
    assert (root / "main.py").read_bytes() == (vmkit.DEVICE_DIR / "main.py").read_bytes()
    assert json.loads((root / "config.json").read_text()) == json.loads(cfg.read_text())
    assert (root / "lib" / "umqtt" / "simple.py").is_file()
    # and they run: the MQTT client imports, main.py asks the mock LLM
    proc = _mpremote(board, "exec", "import picollm.mqtt; print('mqtt', 'ok')")
    assert "mqtt ok" in proc.stdout, proc.stdout + proc.stderr
    proc = _mpremote(board, "exec", "import main; main.run()")
    assert "".join(reply_tokens("hello from deploy")) in proc.stdout, proc.stdout + proc.stderr
    assert "[stop," in proc.stdout


def test_mpremote_mip_install_from_package_json(
    board: vmkit.SerialStandIn, web: tuple[str, Path]
) -> None:
    base, root = web
    package = root / "repo" / "device" / "package.json"
    proc = _mpremote(board, "mip", "install", "--index", base + "/index", str(package))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lib = board.root / "lib"
    for src in sorted((vmkit.DEVICE_DIR / "picollm").glob("*.py")):
        assert (lib / "picollm" / src.name).read_bytes() == src.read_bytes()
    assert (lib / "umqtt" / "simple.py").is_file()


def test_mip_install_on_the_device_from_the_repository_url(
    web: tuple[str, Path], tmp_path: Path
) -> None:
    base, _ = web
    code = (
        "import mip\n"
        f"mip.install('{base}/repo/device/package.json', index='{base}/index', target='lib')\n"
        "import sys\n"
        "sys.path.append('lib')\n"
        "import picollm.mqtt, picollm.direct, picollm.openai, picollm.topics\n"
        "print('installed', picollm.VERSION)\n"
    )
    script = tmp_path / "install.py"
    script.write_text(code)
    env = vmkit.vm_env()
    env["MICROPYPATH"] = f".frozen:{vmkit.STUBS_DIR}"
    proc = vmkit.run_vm(script, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "installed 0.1.0" in proc.stdout
    assert (tmp_path / "lib" / "picollm" / "openai.py").is_file()
    assert (tmp_path / "lib" / "umqtt" / "simple.py").is_file()
