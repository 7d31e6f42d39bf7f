"""`llm-bridge` as a user runs it: configuration mistakes, `chat`, `demo`, `mock-llm`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bridge.dev.mock_llm import reply_tokens
from tests.harness import REPO, BridgeProcess, Broker, free_port, wait_port


def llm_bridge(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    base["PYTHONPATH"] = str(REPO)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], env=base, cwd=cwd, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"BRIDGE_MQTT_URL": "http://broker:1883"}, "BRIDGE_MQTT_URL: must start with mqtt://"),
        ({"BRIDGE_MQTT_URL": "mqtt://u:hunter2@host:99999"}, "BRIDGE_MQTT_URL: has a port"),
        ({"BRIDGE_MAX_STREAMS": "many"}, "BRIDGE_MAX_STREAMS: Input should be a valid integer"),
        ({"BRIDGE_MAX_STREAMS": "0"}, "BRIDGE_MAX_STREAMS"),
        ({"OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL: must be an http:// or https:// URL"),
        ({"BRIDGE_TOPIC_PREFIX": "a/+/b"}, "BRIDGE_TOPIC_PREFIX"),
        ({"BRIDGE_RESPONSE_QOS": "2"}, "BRIDGE_RESPONSE_QOS"),
        ({"BRIDGE_CONFIG": "/nonexistent.toml"}, "config file /nonexistent.toml does not exist"),
    ],
)
def test_configuration_mistake_is_one_line_and_status_2(
    tmp_path: Path, env: dict[str, str], fragment: str
) -> None:
    result = llm_bridge("run", env=env, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


def test_config_file_and_dotenv(tmp_path: Path) -> None:
    """A TOML file is read; `.env` beats it; the environment beats both."""
    from bridge.core.settings import load_settings

    (tmp_path / "bridge.toml").write_text('topic_prefix = "fromfile"\nmax_streams = 3\n'
                                         'openai_model = "file-model"\n')  # fmt: skip
    (tmp_path / ".env").write_text("BRIDGE_MAX_STREAMS=5\n")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        s = load_settings(tmp_path / "bridge.toml")
        assert (s.topic_prefix, s.max_streams, s.openai_model) == ("fromfile", 5, "file-model")
        os.environ["BRIDGE_MAX_STREAMS"] = "7"
        try:
            assert load_settings(tmp_path / "bridge.toml").max_streams == 7
        finally:
            del os.environ["BRIDGE_MAX_STREAMS"]
    finally:
        os.chdir(old)


def test_yaml_config_file(tmp_path: Path) -> None:
    from bridge.core.settings import load_settings

    (tmp_path / "bridge.yaml").write_text("topic_prefix: home/llm\nresponse_qos: 0\n")
    s = load_settings(tmp_path / "bridge.yaml")
    assert s.topic_prefix == "home/llm" and s.response_qos == 0


def test_mqtt_url_parsing() -> None:
    from bridge.core.settings import MqttUrl

    u = MqttUrl.parse("mqtts://dev%40x:p%3Ass@example.org")
    assert (u.tls, u.host, u.port, u.username) == (True, "example.org", 8883, "dev@x")
    assert u.password is not None and u.password.get_secret_value() == "p:ss"
    assert "p:ss" not in u.display() and "p%3Ass" not in repr(u)
    assert MqttUrl.parse("mqtt://h").port == 1883


def test_chat_prints_the_stream_and_fails_on_error(bridge: BridgeProcess, broker: Broker) -> None:
    broker.add_user("clidev")
    url = broker.url("clidev")
    ok = llm_bridge("chat", "Hello from the CLI", "--device", "clidev", "--mqtt-url", url)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "".join(reply_tokens("Hello from the CLI"))
    whole = llm_bridge("chat", "once", "--no-stream", "-d", "clidev", "--mqtt-url", url)
    assert whole.returncode == 0 and whole.stdout.strip() == "".join(reply_tokens("once"))
    bad = llm_bridge("chat", "[mock status=404]", "--device", "clidev", "--mqtt-url", url)
    assert bad.returncode == 1
    assert "upstream_status" in bad.stderr and "404" in bad.stderr


def test_chat_with_wrong_password_fails_clearly(broker: Broker) -> None:
    url = f"mqtt://clidev2:wrong@127.0.0.1:{broker.port}"
    result = llm_bridge("chat", "hi", "--device", "clidev2", "--mqtt-url", url, timeout=30)
    assert result.returncode == 1
    assert "refused" in result.stderr or "could not connect" in result.stderr


def test_demo_streams_an_answer(tmp_path: Path) -> None:
    result = llm_bridge("demo", "--prompt", "Is the demo alive?", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "".join(reply_tokens("Is the demo alive?"))
    assert "bridge: online" in result.stderr and "finish_reason=stop" in result.stderr


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "demo", "--keep-running"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    seen = ""
    while "still serving" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    assert "still serving" in seen
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=20)
    assert "stopped" in err and "Traceback" not in err


def test_mock_llm_command(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "mock-llm", "--port", str(port)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_port(port)
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models")
        assert r.status_code == 200 and r.json()["data"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0
