"""Print the device library's heap figures, measured on the MicroPython VM.

Run from the repository root:

    python -m tests.device.memory

It starts Mosquitto (the project's broker config), the bridge and the mock
LLM (plain HTTP for the bridge, HTTPS with a throw-away CA for direct mode),
then streams a 4 KB and a 16 KB reply in each mode on the VM
(``-X heapsize=200K``). After every piece the VM runs ``gc.collect()`` and
reads ``gc.mem_alloc()``: the figures are the live heap before the request
(base) and its high-water mark while streaming (peak).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bridge.dev.mock_llm import reply_tokens, running_mock
from tests.device import vmkit
from tests.device.conftest import API_KEY as DIRECT_KEY
from tests.device.conftest import server_context
from tests.harness import BridgeProcess, Broker, bridge_env, wait_for_status

SIZES = (4096, 16384)


def tokens_for(size: int, prompt: str) -> int:
    n = 10
    while len("".join(reply_tokens(prompt, n))) < size:
        n += 10
    return n


def steps() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"op": "ask", "prompt": "warm up"}]
    for size in SIZES:
        prompt = f"reply of {size} bytes"
        n = tokens_for(size, prompt)
        out.append(
            {"op": "stream", "prompt": f"{prompt} [mock tokens={n}]", "measure": True,
             "keep_text": False}
        )  # fmt: skip
    return out


def smallest_heap(work: Path, cfg: dict[str, Any], mpy_dir: Path) -> int:
    """The smallest -X heapsize (4 KB steps) in which import, connect, a warm-up
    question and the 16 KB reply all run, with the library compiled to .mpy."""
    job = steps()
    job = [job[0], job[-1]]
    lo, hi = 16, 256  # KB: lo fails, hi works
    while hi - lo > 4:
        mid = (lo + hi) // 2 // 4 * 4
        folder = work / f"heap{mid}"
        folder.mkdir(exist_ok=True)
        try:
            ok = all(
                r["ok"]
                for r in vmkit.run_job(
                    folder, cfg, job, heapsize=f"{mid}K", env=vmkit.mpy_env(mpy_dir), timeout=120
                )
            )
        except AssertionError:
            ok = False
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi


def measure(work: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    results: dict[str, list[dict[str, Any]]] = {}
    smallest: dict[str, int] = {}
    mpy_dir = vmkit.compile_mpy(work / "mpy")
    broker = Broker(work / "broker").start()
    try:
        with running_mock(api_key="sk-memory") as mock:
            bridge = BridgeProcess(work / "bridge", bridge_env(broker, mock.base_url))
            bridge.env["OPENAI_API_KEY"] = "sk-memory"
            bridge.start()
            try:
                wait_for_status(broker, broker.prefix, "online")
                password = broker.add_user("memdev")
                cfg = {
                    "mode": "mqtt",
                    "device_id": "memdev",
                    "broker": {"host": "127.0.0.1", "port": broker.port, "user": "memdev",
                               "password": password},
                    "history": 0,
                }  # fmt: skip
                (work / "mqtt").mkdir()
                results["mqtt"] = vmkit.run_job(work / "mqtt", cfg, steps(), timeout=120)[1:]
                smallest["mqtt"] = smallest_heap(work / "mqtt", cfg, mpy_dir)
            finally:
                bridge.stop()
        certs = vmkit.make_certs(work / "certs")
        ctx = server_context(certs["cert"], certs["key"])
        with running_mock(ssl_context=ctx, api_key=DIRECT_KEY) as mock:
            cfg = {
                "mode": "direct",
                "model": "mock-1",
                "api_key": DIRECT_KEY,
                "base_url": mock.base_url.replace("127.0.0.1", "localhost"),
                "ca": str(certs["ca"]),
                "history": 0,
            }
            (work / "direct").mkdir()
            name = "direct (HTTPS)"
            results[name] = vmkit.run_job(work / "direct", cfg, steps(), timeout=120)[1:]
            smallest[name] = smallest_heap(work / "direct", cfg, mpy_dir)
    finally:
        broker.stop()
    return results, smallest


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        results, smallest = measure(Path(tmp))
    print(f"MicroPython {vmkit.micropython_version()} Unix port, -X heapsize={vmkit.HEAPSIZE}")
    print("live heap (gc.collect() then gc.mem_alloc() after every piece):")
    print()
    print("| mode | reply | pieces | heap before | peak while streaming | growth |")
    print("|---|---|---|---|---|---|")
    for mode, recs in results.items():
        for size, rec in zip(SIZES, recs, strict=True):
            if not rec["ok"]:
                print(f"{mode}: {rec}", file=sys.stderr)
                return 1
            grow = rec["heap_peak"] - rec["heap_base"]
            print(
                f"| {mode} | {rec['length']} B (asked {size // 1024} KB) | {rec['pieces']} "
                f"| {rec['heap_base']} B | {rec['heap_peak']} B | {grow} B |"
            )
    print()
    print("smallest heap (-X heapsize, 4 KB steps) that runs import + connect + a question")
    print("+ the 16 KB reply, library compiled with mpy-cross:")
    print()
    for mode, kb in smallest.items():
        print(f"- {mode}: {kb} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
