"""Fixtures: a real Mosquitto, the mock LLM on loopback, and the bridge as a process."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.mock_llm import running_mock
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
