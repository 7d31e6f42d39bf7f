"""Print the heap figures of a tool device (protocol v2, "Tools"), measured on the MicroPython VM.

Run from the repository root:

    python -m tests.device.memory_tools

It starts Mosquitto (the project's broker config) and runs
``tests/device/vm/tool_job.py`` on the VM: a device with no tools and one with
two (``set_led``, ``read_temp``), from the sources and compiled with mpy-cross.
Each connects and serves; the test, in the bridge's place, sends the device
with tools 16 calls in a burst (the most the bridge keeps waiting for one
device). The figures are the live heap (``gc.collect()`` then
``gc.mem_alloc()``) after connecting and after answering.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

from tests.device import vmkit
from tests.device.test_tools_mqtt import FakeBridge, mqtt_config
from tests.harness import Broker

CALLS = 16


def measure(broker: Broker, folder: Path, label: str, env: dict[str, str], tools: list[str]
            ) -> tuple[int, int, int]:  # fmt: skip
    """(heap after connecting, heap after serving, results answered)."""
    device = f"mem{len(tools)}{label}"
    fake = FakeBridge(broker, "memtools", device)
    served = folder / f"{device}.served"

    def drive() -> None:
        if tools:
            session = fake.wait("status", lambda v: v and v.get("online"))["session"]
            for i in range(CALLS):
                name = "set_led" if i % 2 else "read_temp"
                fake.call(f"c{i}", name, session, **({"on": bool(i % 4)} if i % 2 else {}))
            fake.wait("result", lambda v: v["id"] == f"c{CALLS - 1}")
        served.write_text("done")

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    job = folder / f"{device}.json"
    steps = [{"op": "connect"}, {"op": "serve", "until": str(served)}]
    cfg = mqtt_config(broker, device, "memtools")
    job.write_text(json.dumps({"config": cfg, "tools": tools, "steps": steps}))
    proc = vmkit.run_vm(vmkit.PROGRAMS_DIR / "tool_job.py", str(job), cwd=folder, env=env,
                        timeout=60)  # fmt: skip
    thread.join(10)
    fake.close()
    recs = vmkit.parse_records(proc.stdout)
    if proc.returncode != 0 or len(recs) != len(steps):
        raise SystemExit(f"the VM failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return recs[0]["heap"], recs[1]["heap"], len(fake.of("result"))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="memtools-") as tmp:
        folder = Path(tmp)
        broker = Broker(folder / "broker").start()
        try:
            mpy = vmkit.compile_mpy(folder / "mpy")
            print(f"MicroPython {vmkit.micropython_version()} (Unix port), live heap in bytes")
            print("| library | device | after connecting | after answering "
                  f"{CALLS} calls in a burst |")  # fmt: skip
            print("|---|---|---|---|")
            for label, env in (("mpy", vmkit.mpy_env(mpy)), ("source", vmkit.vm_env())):
                for tools in ([], ["set_led", "read_temp"]):
                    connected, served, answered = measure(broker, folder, label, env, tools)
                    name = "two tools" if tools else "no tools"
                    after = f"{served} ({answered} answers)" if tools else "(n/a)"
                    print(f"| {label} | {name} | {connected} | {after} |")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
