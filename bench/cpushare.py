"""`python -m bench.cpushare -- BENCH ARGS`: who has the cores while a burst starts.

Why: the bench's table gives each system's CPU over a whole case, which hides
the first few hundred milliseconds, when C requests arrive at once and the
bridge, the mock API, the load generator and Mosquitto all want a core
(docs/performance.md, "Fair start"). This runs `python -m bench` with the
arguments after `--`, reads the CPU of every process it starts from /proc
every 5 ms, and prints, for each case (each load generator), the first
`--windows` windows of `--window-ms` from the load generator's first CPU
tick (its start-up, the warm-up requests, then the burst): each kind's
share of one core, and the whole machine's (`machine`: every process,
this sampler and the bench driver too; 200% is both cores full). /proc
counts CPU in clock ticks (10 ms here), so a process's share in one 50 ms
window is a multiple of 20%.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from collections import defaultdict

from bench.procs import CLK_TCK, cpu_ticks, machine_cpu_s, process_tree

# What a process is, from its command line (first match wins).
KINDS = (
    ("loadgen", "load"),
    ("mock_llm", "mock"),
    ("mosquitto", "mosquitto"),
    ("bridge run", "bridge"),
    ("bench.baseline", "baseline"),
)
# (monotonic seconds, pid -> CPU ticks); pid 0: the whole machine's busy ticks
Sample = tuple[float, dict[int, int]]
MACHINE = 0


def kind_of(cmdline: str) -> str | None:
    return next((kind for mark, kind in KINDS if mark in cmdline), None)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def bursts(
    samples: list[Sample], kinds: dict[int, str], window: float, windows: int
) -> list[list[dict[str, float]]]:
    """For each load generator, `windows` windows from the sample in which its first CPU
    tick shows: the share of one core each kind used in each window (the ticks between
    two samples count in the window of the later one)."""
    out = []
    kinds = {**kinds, MACHINE: "machine"}
    for pid in (p for p, k in kinds.items() if k == "load"):
        start = next(
            (t for (_, a), (t, b) in itertools.pairwise(samples)
             if b.get(pid, 0) > a.get(pid, b.get(pid, 0))),
            None,
        )  # fmt: skip
        if start is None:
            continue
        ticks: list[dict[str, int]] = [defaultdict(int) for _ in range(windows)]
        for (_, before), (t, after) in itertools.pairwise(samples):
            i = int((t - start) / window)
            if not 0 <= i < windows:
                continue
            for p, n in after.items():
                if p in kinds:
                    ticks[i][kinds[p]] += n - before.get(p, n)
        out.append([{k: n / CLK_TCK / window for k, n in w.items()} for w in ticks])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv \
        else (argv, [])  # fmt: skip
    ap = argparse.ArgumentParser(prog="python -m bench.cpushare", description=__doc__)
    ap.add_argument("--window-ms", type=float, default=50.0)
    ap.add_argument("--windows", type=int, default=16, help="windows shown per case")
    args = ap.parse_args(ours)
    proc = subprocess.Popen([sys.executable, "-m", "bench", *bench_args])
    samples: list[Sample] = []
    kinds: dict[int, str] = {}
    while proc.poll() is None:
        row = {MACHINE: round(machine_cpu_s()[0] * CLK_TCK)}
        for pid in process_tree(proc.pid):
            n = cpu_ticks(pid)
            if n is None:
                continue
            row[pid] = n
            if pid not in kinds:
                kind = kind_of(_cmdline(pid))
                if kind is not None:
                    kinds[pid] = kind
        samples.append((time.monotonic(), row))
        time.sleep(0.005)
    window = args.window_ms / 1000
    names = sorted({k for _, k in KINDS})
    for n, burst in enumerate(bursts(samples, kinds, window, args.windows), 1):
        print(f"\ncase {n}: share of one core from the load generator's start")
        print(f"{'ms':>6}  " + " ".join(f"{k:>9}" for k in names) + f" {'machine':>8}")
        for i, w in enumerate(burst):
            cells = " ".join(f"{w.get(k, 0.0):>9.0%}" for k in names)
            print(f"{i * args.window_ms:>6.0f}  {cells} {w.get('machine', 0.0):>8.0%}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
