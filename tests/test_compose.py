"""compose.yaml, the Dockerfile, broker/start.sh and docs/deploy.md, checked without Docker.

No Docker engine runs here, so compose.yaml is parsed and held against the files
that exist; docs/deploy.md is then followed command by command: the
`llm-bridge` commands run for real (against Mosquitto started with the
project's broker/ files and a bridge process, as compose would start them), the
`docker compose` commands are checked against compose.yaml, and the machine
set-up commands are a known list.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from bridge.cli import build_parser
from bridge.core.settings import load_settings
from bridge.ops.brokerconf import render_config
from bridge.ops.provision import set_env_var
from tests.harness import (
    API_KEY,
    REPO,
    BridgeProcess,
    free_port,
    mosquitto_binary,
    wait_port,
)

COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
CONTAINER_CONFIG = "/mosquitto/config"


def conf_listeners(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^listener\s+(\d+)", text, re.M)]


def volumes(service: str) -> dict[str, tuple[str, str]]:
    """container path -> (host path, options) of a service's bind mounts."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        host, container, *opts = v.split(":")
        out[container] = (host, ":".join(opts))
    return out


def dockerfile() -> dict[str, list[str]]:
    """Each Dockerfile instruction's arguments (continuation lines joined)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


# --- compose.yaml and the Dockerfile ---------------------------------------------------


def test_services_profiles_and_dependencies() -> None:
    assert set(SERVICES) == {"mosquitto", "bridge", "mock-llm"}
    assert SERVICES["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert SERVICES["bridge"]["build"] == "." and (REPO / "Dockerfile").is_file()
    assert SERVICES["mock-llm"]["image"] == SERVICES["bridge"]["image"]
    assert SERVICES["mock-llm"]["profiles"] == ["mock-llm"]
    assert "profiles" not in SERVICES["mosquitto"] and "profiles" not in SERVICES["bridge"]
    assert SERVICES["bridge"]["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}
    for name in ("mosquitto", "bridge"):
        assert SERVICES[name]["restart"] == "unless-stopped"
        assert SERVICES[name]["user"] == "${LOCAL_UID:-1000}:${LOCAL_GID:-1000}"


def test_mosquitto_ports_mounts_and_command_match_broker_files() -> None:
    m = SERVICES["mosquitto"]
    conf = (REPO / "broker" / "mosquitto.conf").read_text()
    published = {int(p.rsplit(":", 1)[1]) for p in m["ports"]}
    assert published == set(conf_listeners(conf)) == {1883, 8883, 9001}
    mounts = volumes("mosquitto")
    host, opts = mounts[CONTAINER_CONFIG]
    assert (REPO / host).resolve() == REPO / "broker" and opts == "ro"
    data = re.search(r"^persistence_location\s+(\S+)", conf, re.M)
    assert data and data.group(1).rstrip("/") in mounts  # persistence lands in data/mosquitto
    assert mounts[data.group(1).rstrip("/")][0] == "./data/mosquitto"
    assert "persistence true" in conf
    # Every file mosquitto.conf names in /mosquitto/config is in broker/ or made there.
    made = {"passwd", "certs/ca.crt", "certs/server.crt", "certs/server.key"}
    for path in re.findall(rf"{CONTAINER_CONFIG}/(\S+)", conf):
        assert (REPO / "broker" / path).exists() or path in made, path
    # The command runs broker/start.sh from the mounted folder.
    assert m["command"][0] == "sh"
    script = m["command"][1]
    assert script.startswith(CONTAINER_CONFIG + "/")
    assert (REPO / "broker" / script.removeprefix(CONTAINER_CONFIG + "/")).is_file()
    assert m["healthcheck"]["test"][:2] == ["CMD", "nc"] and "1883" in m["healthcheck"]["test"]


def test_bridge_and_mock_commands_are_llm_bridge_commands() -> None:
    parser = build_parser()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"llm-bridge": "bridge.cli:main"}
    d = dockerfile()
    assert json.loads(d["ENTRYPOINT"][-1]) == ["llm-bridge"]
    cmd = json.loads(d["CMD"][-1])
    assert parser.parse_args(cmd).func.__name__ == "cmd_run"
    # Every COPY source exists, and .dockerignore lets it in (and keeps secrets out).
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for copy in d["COPY"]:
        *sources, _dest = copy.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
            assert f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], src
    assert "*" in ignore  # everything else stays out of the image
    assert not [i for i in ignore if i.startswith("!") and i[1:] in (".env", "data", "broker")]

    bridge = SERVICES["bridge"]
    check = bridge["healthcheck"]["test"]
    assert check[:2] == ["CMD", "llm-bridge"]
    assert parser.parse_args(check[2:]).func.__name__ == "cmd_broker_check"
    mock = SERVICES["mock-llm"]
    args = parser.parse_args(mock["command"])
    assert args.func.__name__ == "cmd_mock_llm" and args.host == "0.0.0.0" and args.port == 8000
    assert "8000/health" in " ".join(mock["healthcheck"]["test"])
    for name in SERVICES:
        hc = SERVICES[name]["healthcheck"]
        assert hc["test"][0] in ("CMD", "CMD-SHELL") and hc["interval"] and hc["retries"] >= 1


def test_bridge_settings_env_and_mounts() -> None:
    bridge = SERVICES["bridge"]
    assert bridge["env_file"] == ".env" and (REPO / ".env.example").is_file()
    env = bridge["environment"]
    mounts = volumes("bridge")
    host, opts = mounts[str(Path(env["BRIDGE_CONFIG"]).parent) + "/bridge.toml"]
    assert opts == "ro" and (REPO / host).is_file()
    assert mounts[env["BRIDGE_DATA_DIR"]][0] == "./data/bridge"
    # The mounted config file loads, with limits for unknown devices.
    settings = load_settings(REPO / host)
    assert settings.policy.default.requests_per_minute > 0
    assert settings.policy.default.tokens_per_day > 0
    # Every variable compose.yaml interpolates is in .env.example, and so are
    # the ones the bridge needs.
    example = (REPO / ".env.example").read_text()
    names = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    used = set(re.findall(r"\$\{([A-Z_]+)", (REPO / "compose.yaml").read_text()))
    assert used <= names, used - names
    assert {"OPENAI_API_KEY", "OPENAI_BASE_URL", "BRIDGE_MQTT_URL"} <= names
    assert re.search(r"^# OPENAI_BASE_URL=http://mock-llm:8000/v1$", example, re.M)


@pytest.mark.parametrize("with_certs", [False, True])
def test_start_script_drops_tls_listener_without_certificate(
    tmp_path: Path, with_certs: bool
) -> None:
    shutil.copy(REPO / "broker" / "mosquitto.conf", tmp_path / "mosquitto.conf")
    if with_certs:
        (tmp_path / "certs").mkdir()
        for name in ("server.crt", "server.key"):
            (tmp_path / "certs" / name).write_text("x")
    run = subprocess.run(
        ["sh", str(REPO / "broker" / "start.sh")],
        env={**os.environ, "CONF_DIR": str(tmp_path), "MOSQUITTO_DRY_RUN": "1",
             "MOSQUITTO_OUT": str(tmp_path / "out.conf")},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    want = [1883, 8883, 9001] if with_certs else [1883, 9001]
    assert conf_listeners(run.stdout) == want
    assert ("8883 is off" in run.stderr) is not with_certs
    # The same text render_config makes for the same listeners.
    ports = {p: p for p in want}
    expected = render_config(config_dir=Path(CONTAINER_CONFIG), data_dir=Path("/mosquitto/data"),
                             ports=ports, host="HOST")  # fmt: skip
    got = render_config(config_dir=Path(CONTAINER_CONFIG), data_dir=Path("/mosquitto/data"),
                        ports=ports, host="HOST", source=tmp_path / "out.conf")  # fmt: skip
    assert got == expected


# --- docs/deploy.md, followed ----------------------------------------------------------

HOST_SETUP = {
    "curl -fsSL https://get.docker.com | sh",
    "sudo usermod -aG docker $USER",
    "sudo apt-get install -y git python3-venv",
    "git clone REPOSITORY_URL llm-bridge",
    "cd llm-bridge",
    "python3 -m venv .venv",
    ".venv/bin/pip install .",
    "source .venv/bin/activate",
    "git pull",
}


def deploy_commands() -> list[str]:
    text = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", text, re.S)
    return [line[2:] for b in blocks for line in b.splitlines() if line.startswith("$ ")]


class Site:
    """A Pi as docs/deploy.md leaves it: the project folder, Mosquitto and the bridge."""

    def __init__(self, root: Path, mock_url: str) -> None:
        self.root = root
        self.mock_url = mock_url
        self.port = free_port()
        self.tls_port = free_port()
        self.mosquitto: subprocess.Popen[bytes] | None = None
        self.bridge: BridgeProcess | None = None
        self.passwords: dict[str, str] = {}
        for name in ("acl", "mosquitto.conf", "start.sh"):
            shutil.copy(REPO / "broker" / name, root / "broker" / name)
        for name in (".env.example", "bridge.toml"):
            shutil.copy(REPO / name, root / name)
        (root / "device").mkdir()

    def env(self) -> dict[str, str]:
        """.env as the containers see it, with the broker where this test runs it."""
        out = {}
        for line in (self.root / ".env").read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip()
        for name in ("BRIDGE_MQTT_URL", "BRIDGE_CHECK_MQTT_URL"):
            out[name] = out[name].replace("@mosquitto:1883", f"@127.0.0.1:{self.port}")
        return out

    def llm_bridge(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        """`llm-bridge ARGS` in the project folder (so it reads .env, as on the Pi)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
        env["PYTHONPATH"] = str(REPO)
        if args[:2] == ["broker", "check"]:  # as in the bridge container: the broker's address
            env["BRIDGE_CHECK_MQTT_URL"] = self.env()["BRIDGE_CHECK_MQTT_URL"]
        return subprocess.run(
            [sys.executable, "-m", "bridge", *args], cwd=self.root, env=env,
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    def start_broker(self) -> None:
        """What the mosquitto service does: broker/start.sh, then Mosquitto."""
        out = self.root / "data" / "mosquitto.conf.container"
        run = subprocess.run(
            ["sh", str(self.root / "broker" / "start.sh")],
            env={**os.environ, "CONF_DIR": str(self.root / "broker"),
                 "MOSQUITTO_DRY_RUN": "1", "MOSQUITTO_OUT": str(out)},
            capture_output=True, check=True,
        )  # fmt: skip
        assert run.returncode == 0
        ports = {1883: self.port}
        if 8883 in conf_listeners(out.read_text()):
            ports[8883] = self.tls_port
        conf = render_config(
            config_dir=self.root / "broker", data_dir=self.root / "data" / "mosquitto",
            ports=ports, source=out, log_file=self.root / "data" / "mosquitto.log",
            run_as=getpass.getuser() if os.geteuid() == 0 else None,
        )  # fmt: skip
        (self.root / "data" / "mosquitto.conf").write_text(conf)
        self.mosquitto = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.root / "data" / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports.values():
            wait_port(port)

    def stop_broker(self) -> None:
        if self.mosquitto is not None:
            self.mosquitto.terminate()
            self.mosquitto.wait(5)
            self.mosquitto = None

    def compose_up(self) -> None:
        env = self.env()
        env.update(BRIDGE_CONFIG=str(self.root / "bridge.toml"),
                   BRIDGE_DATA_DIR=str(self.root / "data" / "bridge"))  # fmt: skip
        env = {k: v for k, v in env.items() if k.startswith(("BRIDGE_", "OPENAI_"))}
        if self.mosquitto is None:
            self.start_broker()
        if self.bridge is None:
            self.bridge = BridgeProcess(self.root / "run", env).start()
            deadline = time.monotonic() + 15
            while True:  # the bridge's health check, as compose runs it
                check = self.llm_bridge(["broker", "check", "--timeout", "2"])
                if check.returncode == 0:
                    break
                assert time.monotonic() < deadline, check.stderr
        assert self.env()["BRIDGE_MQTT_URL"]  # made by broker init

    def can_connect(self, user: str, password: str, *, tls: bool = False) -> bool:
        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        c.username_pw_set(user, password)
        if tls:
            c.tls_set_context(
                ssl.create_default_context(cafile=str(self.root / "broker/certs/ca.crt"))
            )
        codes: list[int] = []
        c.on_connect = lambda *a: codes.append(a[3].value)
        c.connect("127.0.0.1", self.tls_port if tls else self.port)
        deadline = time.monotonic() + 3
        while not codes and time.monotonic() < deadline:
            c.loop(0.05)
        c.disconnect()
        return codes == [0]

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
            assert API_KEY not in self.bridge.logs()
        self.stop_broker()


@pytest.fixture
def site(tmp_path: Path, mock_llm: Any) -> Iterator[Site]:
    (tmp_path / "broker").mkdir()
    s = Site(tmp_path, mock_llm.base_url)
    yield s
    s.close()


def compose_only(cmd: list[str]) -> None:
    """A `docker compose` command of the doc: its services and profiles exist."""
    assert cmd[:2] == ["docker", "compose"]
    rest = cmd[2:]
    if rest[0] == "--profile":
        assert any(rest[1] in SERVICES[s].get("profiles", []) for s in SERVICES)
        rest = rest[2:]
    action, *args = rest
    assert action in {"up", "ps", "kill", "logs", "restart"}, action
    if action == "up":
        assert set(args) <= {"-d", "--build"}
        assert all("build" in SERVICES[s] for s in ("bridge", "mock-llm"))
        args = []
    if action == "kill":
        assert args[:2] == ["-s", "SIGHUP"]
        args = args[2:]
    for name in args:
        assert name in SERVICES, name


def test_deploy_doc_from_empty_pi_to_provisioned_device(site: Site) -> None:
    commands = deploy_commands()
    assert len(commands) >= 15
    ran: list[str] = []
    for line in commands:
        if line in HOST_SETUP:
            ran.append(line)
            continue
        cmd = shlex.split(line)
        if cmd[:2] == ["docker", "compose"]:
            compose_only(cmd)
            if cmd[-2:] == ["restart", "mosquitto"]:
                site.stop_broker()
                site.start_broker()  # now with the TLS listener
            elif "up" in cmd:
                site.compose_up()
            elif cmd[2] == "kill":
                assert site.mosquitto is not None
                site.mosquitto.send_signal(signal.SIGHUP)
            ran.append(line)
            continue
        if cmd == ["nano", ".env"]:  # what the user types into it
            text = (site.root / ".env").read_text()
            text = set_env_var(text, "OPENAI_API_KEY", API_KEY)
            text = set_env_var(text, "OPENAI_BASE_URL", site.mock_url)
            (site.root / ".env").write_text(text)
            ran.append(line)
            continue
        assert cmd[0] == "llm-bridge", f"docs/deploy.md runs {line!r}, which no test covers"
        run_llm_bridge(site, cmd[1:])
        ran.append(line)
    assert ran == commands
    assert site.can_connect("integrations", site.passwords["integrations"])
    assert site.can_connect("automation", site.passwords["automation"])
    assert site.bridge is not None and "device=kitchen" in site.bridge.logs()


def run_llm_bridge(site: Site, args: list[str]) -> None:
    """One `llm-bridge` command of the doc, run as written, and what it must have done."""
    where = args[:1] if args[0] == "chat" else args[:2]
    reloads = (["device", "add"], ["device", "remove"], ["broker", "user"])
    if where in reloads and args[2] != "list" and site.mosquitto is not None:
        args = [*args, "--pid", str(site.mosquitto.pid)]  # only this test's broker
    if where == ["device", "deploy"]:
        args = [*args, "--dry-run"]  # no board here: the mpremote commands it would run
    if where == ["chat"]:
        device = args[args.index("--device") + 1]
        url = args[args.index("--mqtt-url") + 1]
        url = url.replace("PASSWORD", site.passwords[device])
        args[args.index("--mqtt-url") + 1] = url.replace("localhost:1883", f"127.0.0.1:{site.port}")
    r = site.llm_bridge(args)
    assert r.returncode == 0, (args, r.stderr)

    if where == ["broker", "init"]:
        assert (site.root / "broker" / "passwd").exists() and (site.root / ".env").exists()
        site.passwords.update(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    elif where == ["device", "add"]:
        device = args[2]
        if "--output" in args:
            snippet = json.loads((site.root / args[args.index("--output") + 1]).read_text())
        else:
            snippet = json.loads(r.stdout)
        password = snippet["broker"]["password"]
        old = site.passwords.get(device)
        site.passwords[device] = password
        tls = "--tls" in args
        assert snippet["broker"]["host"] == "192.168.1.50"
        assert snippet["broker"]["port"] == (8883 if tls else 1883)
        deadline = time.monotonic() + 5
        while not site.can_connect(device, password, tls=tls):
            assert time.monotonic() < deadline, f"{device} cannot log in after device add"
            time.sleep(0.05)
        if old is not None:
            assert not site.can_connect(device, old)
    elif where == ["device", "deploy"]:
        config = args[args.index("--config") + 1]
        assert f"fs cp {config} :config.json" in r.stdout + r.stderr
        assert json.loads((site.root / config).read_text())["device_id"] == "kitchen"
    elif where == ["chat"]:
        assert "You said: Why is the sky blue?" in r.stdout
    elif where == ["device", "list"]:
        rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
        assert rows["kitchen"][0] == "1"  # the one question asked in step 6
    elif where == ["device", "remove"]:
        device = args[2]
        deadline = time.monotonic() + 5
        while site.can_connect(device, site.passwords[device]):
            assert time.monotonic() < deadline, f"{device} still logs in after device remove"
            time.sleep(0.05)
    elif where == ["broker", "tls"]:
        assert (site.root / "broker" / "certs" / "server.crt").exists()
    elif where == ["broker", "user"] and args[2] == "add":
        user, password = r.stdout.split()  # a second dashboard: `NAME PASSWORD`
        site.passwords[user] = password
        assert f"\nuser {user}\n" in (site.root / "broker" / "acl").read_text()
        deadline = time.monotonic() + 5
        while not site.can_connect(user, password):
            assert time.monotonic() < deadline, f"{user} cannot log in after broker user add"
            time.sleep(0.05)
    elif where == ["broker", "user"] and args[2] == "list":
        assert r.stdout.split()[::2] == ["bridge", "integrations", "automation", "healthcheck",
                                         "integrations-nodered"]  # fmt: skip
    else:
        raise AssertionError(f"docs/deploy.md runs llm-bridge {' '.join(args)}: add its check")
    if site.bridge is not None:
        wait_for_status_port(site)


def wait_for_status_port(site: Site) -> None:
    """The bridge stayed online through the command."""
    r = site.llm_bridge(["broker", "check", "--timeout", "3"])
    assert r.returncode == 0, r.stderr


def test_configuration_doc_lists_every_setting_with_its_default() -> None:
    from pydantic import AliasChoices

    from bridge.core.settings import Settings

    text = (REPO / "docs" / "configuration.md").read_text()
    table = text.split("| setting | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    expected = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = str(alias.choices[0]) if isinstance(alias, AliasChoices) else f"BRIDGE_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        if default is None:
            shown = "none"
        elif name == "policy":
            assert not default.counts and not default.default.models
            shown = "no limits"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        elif default == "":
            shown = "(empty)"
        elif isinstance(default, float):
            shown = f"`{default:g}`"
        else:
            shown = f"`{default}`"
        expected[env] = shown
    missing, extra = set(expected) - set(rows), set(rows) - set(expected)
    assert not missing, f"docs/configuration.md lacks {sorted(missing)}: add a row for each"
    assert not extra, f"docs/configuration.md lists {sorted(extra)}, which settings.py lacks"
    assert list(rows) == list(expected)  # in the order of settings.py
    assert rows == expected
    from bridge.core.settings import Limits

    policy = text.split("| field | meaning | refusal |", 1)[1].split("\n\n", 1)[0]
    fields = [line.split("|")[1].strip().strip("`") for line in policy.strip().splitlines()[1:]]
    assert fields == list(Limits.model_fields)
