"""The README's "Try it" commands, verbatim, from a fresh clone with Debian's own Python.

Why: the README says the bridge runs on Debian 12, Raspberry Pi OS and Ubuntu,
whose python3 refuses `pip install` outside a virtual environment (PEP 668);
the first command a maker copies must work there as written. The commands are
read out of README.md, so this breaks when the README changes; they run in a
`git clone` of the committed repository (nothing beside it, no `.venv`, no
`.env`) with `/usr/bin/python3` first on a Debian `PATH`. Installing hits the
package index (pip's cache keeps a rerun quick).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO

SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
#: Variables of this test run that a maker's shell would not have.
FOREIGN = ("OPENAI_", "BRIDGE_", "MOCK_LLM_", "PYTHON", "VIRTUAL_ENV", "SSE_CORPUS_DIR")


def try_it_block(readme: str) -> list[str]:
    """The lines of the first console block under the "## Try it" heading."""
    section = readme.split("\n## Try it", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```console\n(.*?)\n```", section, re.S)
    assert match, "README.md's 'Try it' section has no ```console block"
    return match.group(1).splitlines()


def output_pattern(line: str) -> re.Pattern[str]:
    """A README output line as a pattern: numbers (ports) and (parenthesised paths) vary."""
    parts = re.split(r"(\d+|\([^)]*\))", line)
    regex = "".join(
        r"\d+" if p.isdigit() else r"\([^)]*\)" if p.startswith("(") else re.escape(p)
        for p in parts
    )
    return re.compile(rf"^{regex}$")


def test_try_it_block_is_commands_then_their_output() -> None:
    lines = try_it_block((REPO / "README.md").read_text(encoding="utf-8"))
    commands = [line for line in lines if line.startswith("$ ")]
    assert commands and lines[0].startswith("$ ")
    assert any("demo" in c for c in commands)
    assert output_pattern("[demo] on 127.0.0.1:46363 (x)").match("[demo] on 127.0.0.1:5 (y z)")
    assert not output_pattern("[demo] done: tokens=12").match("[demo] failed: tokens=12")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not SYSTEM_PYTHON.exists(),
    reason="no /usr/bin/python3: the README's set-up is written for Debian-family systems",
)
def test_readme_demo_runs_from_a_fresh_clone_with_system_python(tmp_path: Path) -> None:
    lines = try_it_block((REPO / "README.md").read_text(encoding="utf-8"))
    commands = [line[2:] for line in lines if line.startswith("$ ")]
    expected = [line for line in lines if not line.startswith("$ ")]

    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
    env["PATH"] = SYSTEM_PATH
    found = subprocess.run(
        ["bash", "-c", "command -v python3"], env=env, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == str(SYSTEM_PYTHON)

    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=clone,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=840,
    )
    output = proc.stdout.splitlines()
    assert proc.returncode == 0, "\n".join(output[-40:])
    # Every output line the README shows, in its order (other lines, e.g. pip's, may be between).
    rest = iter(output)
    for line in expected:
        pattern = output_pattern(line)
        assert any(pattern.match(got) for got in rest), (line, "\n".join(output[-40:]))
