"""Profile the system under test with py-spy during a case, and summarize the samples.

Why here: the optimisation must start from where the bridge spends its time
under the benchmark's own load, not from guesses. `python -m bench --profile DIR`
records our bridge in every case with `py-spy record --format raw` (collapsed
stacks, one file per case) and prints the functions that hold most samples.
py-spy takes CPU of its own on a 2-core machine, so figures of a profiled
run are not the benchmark's figures: measure and profile in separate runs.

`python -m bench.profile FILE.txt` summarizes a collapsed-stack file again.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.procs import Proc

SITE_MARK = "site-packages/"


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter, or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, log_path: Path, rate: int = 200) -> Proc:
    binary = py_spy()
    if binary is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    args = [binary, "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
    args += ["--rate", str(rate), "--nonblocking", "--subprocesses"]
    return Proc("py-spy", args, log_path)


def stop(proc: Proc) -> None:
    """py-spy writes its file when interrupted (SIGINT), then exits."""
    if proc.alive():
        proc.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(20)
    proc.stop()


def _short(frame: str) -> str:
    """`func (paho/mqtt/client.py:12)` -> `func (paho/mqtt/client.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if SITE_MARK in path:
        path = path.split(SITE_MARK, 1)[1]
    return f"{name} ({path})"


def _package(frame: str) -> str:
    path = frame.rsplit("(", 1)[1].rstrip(")")
    return path.split("/", 1)[0] if "/" in path else path


_ENTRY = ("<frozen", "asyncio/", "bridge/cli.py", "bridge/__main__.py", "runpy")


def _is_frame_of_entry(frame: str) -> bool:
    path = frame.rsplit("(", 1)[1]
    return path.startswith(_ENTRY) or frame.startswith("<module>")


def summarize(path: Path, top: int = 15) -> str:
    """Top functions by own samples and by samples under them (inclusive), and by package."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        pkg[_package(frames[-1])] += n
    if not total:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total} samples"]
    lines.append("  own time (the function itself):")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    # Frames under nearly every sample (entry point, event loop) say nothing: left out.
    inner = Counter({f: n for f, n in incl.items() if not _is_frame_of_entry(f)})
    lines.append("  inclusive (the function and what it calls; entry and event loop left out):")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inner.most_common(top)]
    lines.append("  own time by package or file:")
    lines += [f"    {100 * n / total:5.1f}%  {p}" for p, n in pkg.most_common(10)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    for f in args.files:
        print(summarize(f, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
