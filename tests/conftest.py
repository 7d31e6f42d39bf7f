"""Fixtures: a real Mosquitto, the mock LLM on loopback, and the bridge as a process."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.dev.mock_llm import running_mock
from tests.harness import API_KEY, BridgeProcess, Broker, Device, bridge_env, wait_for_status

_ids = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _no_client_takeover(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that logged in twice as one user on the shared broker.

    The broker makes every client id its user name, so a second connection of
    a user replaces the first (whose paho then reconnects, without its
    subscriptions): such a test would pass or fail by timing. Tests that take
    over a connection on purpose run a broker of their own.
    """
    brokers = [
        request.getfixturevalue(name)
        for name in ("broker", "own_broker")
        if name in request.fixturenames
    ]
    before = [len(b.takeovers()) for b in brokers]
    yield
    for b, n in zip(brokers, before, strict=True):
        new = b.takeovers()[n:]
        assert not new, f"two connections of one broker user replaced each other: {new[:3]}"


@pytest.fixture(scope="session")
def mock_llm() -> Iterator[object]:
    with running_mock(api_key=API_KEY) as handle:
        yield handle


@pytest.fixture(scope="session")
def bridge(
    broker: Broker, mock_llm: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeProcess]:
    """The shared bridge, for tests that only need one that is up."""
    proc = BridgeProcess(
        tmp_path_factory.mktemp("bridge"),
        bridge_env(broker, mock_llm.base_url, BRIDGE_CLIENT_ID="bridge-shared"),  # type: ignore[attr-defined]
    ).start()
    wait_for_status(broker, "llm", "online")
    yield proc
    proc.stop()
    assert API_KEY not in proc.logs()


@pytest.fixture
def start_bridge(
    broker: Broker, mock_llm: object, tmp_path: Path
) -> Iterator[Callable[..., BridgeProcess]]:
    """Start a bridge of this test's own, with extra BRIDGE_* settings; stopped after the test.

    It gets a topic prefix of its own (`proc.prefix`) unless one is given, so
    that the shared bridge does not answer its requests too.
    """
    started: list[BridgeProcess] = []

    def start(
        *, wait: bool = True, base_url: str | None = None, **env: str | int | float
    ) -> BridgeProcess:
        env.setdefault("BRIDGE_TOPIC_PREFIX", f"t{next(_ids)}")
        e = bridge_env(broker, base_url or mock_llm.base_url, **env)  # type: ignore[attr-defined]
        proc = BridgeProcess(tmp_path / f"bridge{len(started)}", e).start()
        started.append(proc)
        if wait:
            wait_for_status(broker, e["BRIDGE_TOPIC_PREFIX"], "online")
        return proc

    yield start
    for proc in started:
        proc.stop()
        assert API_KEY not in proc.logs()


@pytest.fixture
def device(broker: Broker) -> Iterator[Device]:
    """A device with an id of its own, subscribed to its replies."""
    d = Device(broker, f"dev{next(_ids)}")
    yield d
    d.close()


@pytest.fixture
def make_device(broker: Broker) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(device_id: str | None = None, prefix: str = "llm", subscribe: bool = True) -> Device:
        d = Device(broker, device_id or f"dev{next(_ids)}", prefix, subscribe=subscribe)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


# --- a broker and bridges of one module's own (integrations tests) ----------------------------

StartBridge = Callable[..., BridgeProcess]


@pytest.fixture(scope="module", name="own_broker")
def own_broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Mosquitto of this module's own: no other bridge answers or publishes on it."""
    b = Broker(tmp_path_factory.mktemp("broker-integrations")).start()
    yield b
    b.stop()


@pytest.fixture(name="own_bridge")
def own_bridge_fixture(own_broker: Broker, mock_llm: Any, tmp_path: Path) -> Iterator[StartBridge]:
    """Start bridges on `own_broker` with extra BRIDGE_* settings; stopped after the test."""
    started: list[BridgeProcess] = []

    def start(*, wait: bool = True, **env: str | int | float) -> BridgeProcess:
        e = bridge_env(own_broker, mock_llm.base_url, **env)
        proc = BridgeProcess(tmp_path / f"bridge{len(started)}", e).start()
        started.append(proc)
        if wait:
            wait_for_status(own_broker, "llm", "online")
        return proc

    yield start
    for proc in started:
        proc.stop()
        assert API_KEY not in proc.logs()
        logs = proc.logs()
        # No plugin of ours failed (the core logs "plugin X.y failed" with the traceback).
        for mine in ("StatePlugin", "HomeAssistantPlugin", "state.py", "homeassistant.py"):
            assert mine not in logs, logs[-3000:]


@pytest.fixture(name="own_device")
def own_device_fixture(own_broker: Broker) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(device_id: str | None = None) -> Device:
        d = Device(own_broker, device_id or f"st{next(_ids)}")
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
