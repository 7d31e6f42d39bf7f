"""`bench.cpushare`'s windows: each kind's share of a core from the load generator's start."""

from __future__ import annotations

import pytest

from bench.cpushare import bursts, kind_of
from bench.procs import CLK_TCK


def test_a_process_is_known_by_its_command_line() -> None:
    assert kind_of("/venv/bin/python -m bench.loadgen --spec x.json") == "load"
    assert kind_of("/venv/bin/python -m bridge run") == "bridge"
    assert kind_of("/usr/sbin/mosquitto -c m.conf") == "mosquitto"
    assert kind_of("/venv/bin/python -m bridge.dev.mock_llm --port 1") == "mock"
    assert kind_of("/bin/sh -c true") is None


def test_windows_start_at_the_load_generators_first_tick() -> None:
    load, bridge = 11, 12
    tick = 1 / CLK_TCK
    # The bridge works before the load generator starts: not in its windows.
    samples = [
        (0.00, {0: 0, load: 0, bridge: 0}),
        (0.02, {0: 2, load: 0, bridge: 2}),
        (0.10, {0: 3, load: 1, bridge: 2}),  # the load generator's first tick
        (0.12, {0: 5, load: 1, bridge: 4}),
        (0.16, {0: 7, load: 2, bridge: 5}),
        (0.21, {0: 9, load: 2, bridge: 7}),
    ]
    (burst,) = bursts(samples, {load: "load", bridge: "bridge"}, window=0.05, windows=2)
    first, second = burst
    # Window 0 holds what the sample at 0.10 and the one after it (0.12) brought.
    assert first == pytest.approx({"bridge": 2 * tick / 0.05, "load": tick / 0.05,
                                   "machine": 3 * tick / 0.05})  # fmt: skip
    # Window 1 (from 0.15) holds what the sample at 0.16 brought; 0.21 is past both.
    assert second == pytest.approx({"bridge": tick / 0.05, "load": tick / 0.05,
                                    "machine": 2 * tick / 0.05})  # fmt: skip
