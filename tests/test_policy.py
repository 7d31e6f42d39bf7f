"""Per-device policy (bridge/plugins/policy.py) in real bridge processes behind Mosquitto.

Each refusal has its own error code; the `max_tokens` cap shortens replies;
the counters live in SQLite in BRIDGE_DATA_DIR and survive a restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.core.settings import ConfigError, PolicyConfig, load_settings
from bridge.plugins.policy import Counters, utc_day
from tests.harness import BridgeProcess, Broker, Device


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of this module's own (the prefix "llm" stays free of other tests' bridges)."""
    b = Broker(tmp_path_factory.mktemp("policy-broker")).start()
    yield b
    b.stop()


POLICY = {
    "default": {"models": ["mock-1", "mock-2"]},
    "devices": {
        "pol-small": {"max_request_bytes": 300},
        "pol-any": {"models": []},
        "pol-rate": {"requests_per_minute": 2},
        "pol-budget": {"tokens_per_day": 5},
        "pol-draw": {"tokens_per_day": 5},
        "pol-streams": {"max_streams": 1},
        "pol-cap": {"max_tokens": 3},
    },
}


def test_each_refusal_has_its_own_code(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device], tmp_path: Path
) -> None:
    proc = start_bridge(
        BRIDGE_POLICY=json.dumps(POLICY),
        BRIDGE_DATA_DIR=str(tmp_path / "data"),
        BRIDGE_TOPIC_PREFIX="llm",
    )

    small = make_device("pol-small")
    assert small.ask({"id": "s1", "prompt": "short"}).terminal.get("done") is True
    big = small.ask({"id": "s2", "prompt": "x" * 400})
    assert big.error_code == "too_large", big.terminal
    assert "300" in big.terminal["error"]["message"]

    # The default profile applies to a device the policy does not name.
    stranger = make_device("pol-stranger")
    assert stranger.ask({"id": "m1", "prompt": "hi"}).terminal["model"] == "mock-1"
    assert stranger.ask({"id": "m2", "prompt": "hi", "model": "mock-2"}).terminal.get("done")
    other = stranger.ask({"id": "m3", "prompt": "hi", "model": "gpt-expensive"})
    assert other.error_code == "model_not_allowed", other.terminal
    # A picture is checked by its image model (the image API's cost), not the chat model.
    picture = {"prompt": "a cat", "width": 8, "height": 8, "format": "png"}
    drawn = stranger.ask({"id": "i1", "image": picture})
    assert drawn.error_code == "model_not_allowed", drawn.terminal
    assert "gpt-image-1" in drawn.terminal["error"]["message"]  # OPENAI_IMAGE_MODEL
    assert stranger.ask({"id": "i2", "image": {**picture, "model": "mock-2"}}).terminal.get("done")
    # A device's own `models: []` lifts the default's list.
    anymodel = make_device("pol-any")
    assert anymodel.ask({"id": "a1", "prompt": "hi", "model": "gpt-expensive"}).terminal.get("done")

    rate = make_device("pol-rate")
    assert rate.ask({"id": "r1", "prompt": "one"}).terminal.get("done") is True
    assert rate.ask({"id": "r2", "prompt": "two"}).terminal.get("done") is True
    third = rate.ask({"id": "r3", "prompt": "three"})
    assert third.error_code == "rate_limited", third.terminal
    assert "2 requests a minute" in third.terminal["error"]["message"]

    budget = make_device("pol-budget")
    first = budget.ask({"id": "b1", "prompt": "spend [mock tokens=10]"})
    assert first.terminal["usage"]["total_tokens"] > 5
    second = budget.ask({"id": "b2", "prompt": "again"})
    assert second.error_code == "budget_exceeded", second.terminal

    # A picture costs what the image API reports (the mock: a token a word of the prompt
    # and one a 64x64 tile of the picture it draws, at BRIDGE_IMAGE_SIZE).
    draw = make_device("pol-draw")
    drawn = draw.ask({"id": "d1", "image": {**picture, "model": "mock-2"}})
    usage = drawn.terminal["usage"]
    assert usage["prompt_tokens"] == 2 and usage["completion_tokens"] > 5, drawn.terminal
    after = draw.ask({"id": "d2", "prompt": "and now a word"})
    assert after.error_code == "budget_exceeded", after.terminal

    streams = make_device("pol-streams")
    streams.send({"id": "t1", "prompt": "[mock tokens=15 delay_ms=30] slow"})
    busy = streams.ask({"id": "t2", "prompt": "meanwhile"})
    assert busy.error_code == "too_many_streams", busy.terminal
    assert streams.wait("t1").terminal.get("done") is True
    assert streams.ask({"id": "t3", "prompt": "after"}).terminal.get("done") is True

    cap = make_device("pol-cap")
    capped = cap.ask({"id": "c1", "prompt": "[mock tokens=20] long", "max_tokens": 50})
    assert len(capped.messages) - 1 == 3 and capped.terminal["finish_reason"] == "length"
    unasked = cap.ask({"id": "c2", "prompt": "[mock tokens=20] long"})
    assert len(unasked.messages) - 1 == 3
    lower = cap.ask({"id": "c3", "prompt": "[mock tokens=20] long", "max_completion_tokens": 2})
    assert len(lower.messages) - 1 == 2

    logs = proc.logs()
    for code in ("too_large", "model_not_allowed", "rate_limited", "budget_exceeded"):
        assert f": {code}: " in logs


def test_counters_survive_a_restart(
    start_bridge: Callable[..., BridgeProcess], make_device: Callable[..., Device], tmp_path: Path
) -> None:
    policy = {"devices": {"pol-r2": {"requests_per_minute": 2}, "pol-b2": {"tokens_per_day": 3}}}
    env = {
        "BRIDGE_POLICY": json.dumps(policy),
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        "BRIDGE_TOPIC_PREFIX": "llm",
    }
    first = start_bridge(**env)
    rate, budget = make_device("pol-r2"), make_device("pol-b2")
    assert rate.ask({"id": "x1", "prompt": "one"}).terminal.get("done") is True
    assert rate.ask({"id": "x2", "prompt": "two"}).terminal.get("done") is True
    assert budget.ask({"id": "y1", "prompt": "spend it all"}).terminal.get("done") is True
    assert first.stop() == 0

    counters = Counters(tmp_path / "data" / "counters.sqlite3")
    try:
        assert len(counters.requests_since("pol-r2", 0)) == 2
        day = counters.usage(utc_day(time.time()))
        assert day["pol-b2"][0] == 1 and day["pol-b2"][1] > 3
    finally:
        counters.close()

    start_bridge(**env)
    again = rate.ask({"id": "x3", "prompt": "three"})
    assert again.error_code == "rate_limited", again.terminal
    spent = budget.ask({"id": "y2", "prompt": "more"})
    assert spent.error_code == "budget_exceeded", spent.terminal


def test_policy_from_a_toml_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("BRIDGE_POLICY", "BRIDGE_DATA_DIR", "BRIDGE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "bridge.toml"
    conf.write_text(
        "data_dir = '/var/lib/llm-bridge'\n"
        "[policy.default]\nmodels = ['gpt-4o-mini']\nrequests_per_minute = 10\nmax_tokens = 300\n"
        "[policy.devices.kitchen]\nrequests_per_minute = 30\ntokens_per_day = 1000\n"
    )
    s = load_settings(conf)
    assert s.data_dir == Path("/var/lib/llm-bridge")
    kitchen = s.policy.limits("kitchen")
    assert (kitchen.requests_per_minute, kitchen.tokens_per_day, kitchen.max_tokens) == (
        30,
        1000,
        300,
    )
    assert kitchen.models == ["gpt-4o-mini"]
    assert s.policy.limits("garage") == s.policy.default
    assert s.policy.counts

    conf.write_text("[policy.devices.'bad id']\nmax_tokens = 3\n")
    with pytest.raises(ConfigError, match="BRIDGE_POLICY"):
        load_settings(conf)
    conf.write_text("[policy.default]\nrequests_per_mnute = 3\n")
    with pytest.raises(ConfigError, match="BRIDGE_POLICY"):
        load_settings(conf)
    assert not PolicyConfig().counts
