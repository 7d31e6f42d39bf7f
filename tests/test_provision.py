"""`llm-bridge device add|remove|list` and `llm-bridge broker init|reload|check`, run as
commands against a real Mosquitto started with the project's broker/ files."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.ops import provision
from bridge.ops.passwords import check_password
from tests.harness import REPO, BridgeProcess, Broker, Device


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of this module's own: the CLI edits its password file."""
    b = Broker(tmp_path_factory.mktemp("provision-broker")).start()
    yield b
    b.stop()


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`llm-bridge ARGS` as a user runs it, in `cwd`, without the test's BRIDGE_ settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    base["PYTHONPATH"] = str(REPO)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        check=False,
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=30,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wait_connect(broker: Broker, user: str, password: str, expect: bool = True) -> bool:
    """Poll until Mosquitto (reloading) accepts, or refuses, `user`."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if broker.can_connect(user, password) == expect:
            return True
        time.sleep(0.05)
    return False


def test_device_add_list_rotate_remove(
    broker: Broker, start_bridge: Callable[..., BridgeProcess], tmp_path: Path
) -> None:
    assert broker.proc is not None
    pid = str(broker.proc.pid)
    where = ["--broker-dir", str(broker.dir), "--pid", pid]
    added = cli("device", "add", "kitchen", "--host", "127.0.0.1", "--port", str(broker.port),
                *where, cwd=tmp_path)  # fmt: skip
    assert added.returncode == 0, added.stderr
    snippet = json.loads(added.stdout)
    password = snippet["broker"]["password"]
    assert snippet["device_id"] == "kitchen" and snippet["mode"] == "mqtt"
    assert snippet["broker"] == {
        "host": "127.0.0.1", "port": broker.port, "user": "kitchen", "password": password,
        "tls": False,
    }  # fmt: skip
    assert snippet["prefix"] == "llm"
    assert "shown only this once" in added.stderr and password not in added.stderr
    assert f"pid {pid}" in added.stderr  # it reloaded our broker

    passwd = broker.dir / "passwd"
    assert mode(passwd) == 0o600
    text = passwd.read_text()
    assert password not in text  # only the hash is kept
    line = next(x for x in text.splitlines() if x.startswith("kitchen:"))
    assert check_password(password, line.split(":", 1)[1])
    assert {x.split(":")[0] for x in text.splitlines()} == {
        "bridge",
        "integrations",
        "automation",
        "healthcheck",
        "kitchen",
    }
    assert wait_connect(broker, "kitchen", password)

    # The provisioned device asks through a bridge with the printed credentials.
    data = tmp_path / "data"
    start_bridge(
        BRIDGE_DATA_DIR=str(data),
        BRIDGE_POLICY='{"default":{"tokens_per_day":100000}}',
        BRIDGE_TOPIC_PREFIX="llm",
    )
    broker.users["kitchen"] = password
    dev = Device(broker, "kitchen")
    try:
        assert dev.ask({"id": "p1", "prompt": "hello"}).terminal.get("done") is True
    finally:
        dev.close()
    broker.users.pop("kitchen")

    again = cli("device", "add", "kitchen", *where, cwd=tmp_path)
    assert again.returncode == 1 and "exists" in again.stderr
    assert again.stdout == ""  # never printed twice

    listed = cli("device", "list", "--broker-dir", str(broker.dir), cwd=tmp_path,
                 env={"BRIDGE_DATA_DIR": str(data)})  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    rows = [r.split() for r in listed.stdout.splitlines()]
    assert rows[0] == ["device", "requests_today", "tokens_today"]
    kitchen = next(r for r in rows if r[0] == "kitchen")
    assert kitchen[1] == "1" and int(kitchen[2]) > 0
    service = ("bridge", "integrations", "automation", "healthcheck")
    assert not [r for r in rows if r[0] in service or r[0].startswith("bridge-")]
    assert [u for u in broker.users if u.startswith("bridge-")]  # start_bridge's worker user

    rotated = cli("device", "add", "kitchen", "--rotate", "--host", "h", *where, cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    new_password = json.loads(rotated.stdout)["broker"]["password"]
    assert new_password != password
    assert wait_connect(broker, "kitchen", new_password)
    assert not broker.can_connect("kitchen", password)

    removed = cli("device", "remove", "kitchen", *where, cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert wait_connect(broker, "kitchen", new_password, expect=False)
    assert "kitchen" not in passwd.read_text()
    assert mode(passwd) == 0o600
    assert broker.can_connect("bridge")  # the others are untouched
    gone = cli("device", "remove", "kitchen", *where, cwd=tmp_path)
    assert gone.returncode == 1 and "no device kitchen" in gone.stderr


def test_output_file_is_private_and_ids_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    broker_dir = tmp_path / "broker"
    out = tmp_path / "device" / "config.json"
    made = cli("device", "add", "garage", "--tls", "--host", "pi.lan", "--output", str(out),
               "--broker-dir", str(broker_dir), "--no-reload", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stdout == ""
    config = json.loads(out.read_text())
    assert mode(out) == 0o600 and mode(broker_dir / "passwd") == 0o600
    assert config["broker"]["port"] == 8883 and config["broker"]["tls"] is True
    assert config["broker"]["ca"] == "ca.crt"
    assert config["broker"]["password"] not in made.stderr
    assert "not reloaded" in made.stderr

    for bad in ("bridge", "integrations", "automation", "a/b", "kitchen+", "#", "x" * 65, ""):
        argv = ["device", "add", bad, "--broker-dir", str(broker_dir), "--no-reload"]
        assert main(argv) == 1, bad  # in process: seven interpreters would be slow
        assert "cannot be a device id" in capsys.readouterr().err
    assert provision.list_devices(broker_dir) == ["garage"]

    (broker_dir / "passwd").write_text("garage:$7$x\nnot a line\n")
    broken = cli("device", "list", "--broker-dir", str(broker_dir), cwd=tmp_path)
    assert broken.returncode == 1 and "passwd:2" in broken.stderr


def test_broker_init_creates_service_users_and_env(tmp_path: Path) -> None:
    (tmp_path / ".env.example").write_text((REPO / ".env.example").read_text())
    first = cli("broker", "init", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    shown = dict(line.split(" ", 1) for line in first.stdout.strip().splitlines())
    passwd = dict(
        line.split(":", 1) for line in (tmp_path / "broker" / "passwd").read_text().splitlines()
    )
    assert set(passwd) == {"bridge", "integrations", "automation", "healthcheck"}
    assert set(shown) == {"integrations", "automation"}  # never the bridge's or the check's
    for user, password in shown.items():
        assert check_password(password, passwd[user])
    env_file = tmp_path / ".env"
    assert mode(env_file) == 0o600 and mode(tmp_path / "broker" / "passwd") == 0o600
    env = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    url = env["BRIDGE_MQTT_URL"]
    assert url.startswith("mqtt://bridge:") and url.endswith("@mosquitto:1883")
    bridge_pw = url.removeprefix("mqtt://bridge:").split("@")[0]
    assert check_password(bridge_pw, passwd["bridge"])
    assert bridge_pw not in first.stdout + first.stderr
    check = env["BRIDGE_CHECK_MQTT_URL"]
    assert check.startswith("mqtt://healthcheck:") and check.endswith("@mosquitto:1883")
    check_pw = check.removeprefix("mqtt://healthcheck:").split("@")[0]
    assert check_password(check_pw, passwd["healthcheck"])
    assert check_pw not in first.stdout + first.stderr
    assert env["LOCAL_UID"] == str(os.getuid())
    assert "OPENAI_API_KEY" in env  # the rest of .env.example is kept
    assert (tmp_path / "data" / "mosquitto").is_dir() and (tmp_path / "data" / "bridge").is_dir()

    before = env_file.read_text(), (tmp_path / "broker" / "passwd").read_text()
    second = cli("broker", "init", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == ""  # no password is shown twice
    assert "kept" in second.stderr
    assert (env_file.read_text(), (tmp_path / "broker" / "passwd").read_text()) == before


def test_broker_reload_and_check(
    broker: Broker, start_bridge: Callable[..., BridgeProcess], tmp_path: Path
) -> None:
    missing = cli("broker", "reload", "--pid", "999999999", cwd=tmp_path)
    assert missing.returncode == 1 and "no process" in missing.stderr
    assert broker.proc is not None
    ok = cli("broker", "reload", "--pid", str(broker.proc.pid), cwd=tmp_path)
    assert ok.returncode == 0 and "reloads" in ok.stderr

    unset = cli("broker", "check", "--timeout", "1", cwd=tmp_path,
                env={"BRIDGE_MQTT_URL": broker.url("bridge")})  # fmt: skip
    assert unset.returncode == 1 and "BRIDGE_CHECK_MQTT_URL is not set" in unset.stderr
    env = {"BRIDGE_CHECK_MQTT_URL": broker.url("healthcheck")}
    down = cli("broker", "check", "--timeout", "1", cwd=tmp_path, env=env)
    assert down.returncode == 1, down.stderr  # no bridge has said online on this broker yet
    proc = start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "data"), BRIDGE_TOPIC_PREFIX="llm")
    for _ in range(3):  # as compose runs it, again and again: the bridge stays connected
        up = cli("broker", "check", cwd=tmp_path, env=env)
        assert up.returncode == 0 and "online" in up.stderr, up.stderr
    assert proc.logs().count("connected to mqtt://") == 1
    wrong = {"BRIDGE_CHECK_MQTT_URL": f"mqtt://healthcheck:wrong@127.0.0.1:{broker.port}"}
    refused = cli("broker", "check", "--timeout", "2", cwd=tmp_path, env=wrong)
    assert refused.returncode == 1 and "refused" in refused.stderr
    proc.stop()
    after = cli("broker", "check", "--timeout", "2", cwd=tmp_path, env=env)
    assert after.returncode == 1 and "offline" in after.stderr


def test_service_users_get_their_kinds_rules_and_are_no_devices(
    broker: Broker, start_bridge: Callable[..., BridgeProcess], tmp_path: Path
) -> None:
    """`broker user add bridge-w2`: a second bridge worker with the bridge's rules, running
    beside another bridge on the same broker without either replacing the other."""
    assert broker.proc is not None
    where = ["--broker-dir", str(broker.dir), "--pid", str(broker.proc.pid)]
    added = cli("broker", "user", "add", "bridge-w2", "--mqtt-host", "127.0.0.1", *where,
                cwd=tmp_path)  # fmt: skip
    assert added.returncode == 0, added.stderr
    url = added.stdout.strip().removeprefix("BRIDGE_MQTT_URL=")
    assert url.startswith("mqtt://bridge-w2:") and url.endswith("@127.0.0.1:1883")
    acl = (broker.dir / "acl").read_text()
    block = acl.split("\nuser bridge-w2\n", 1)[1].split("\n\n", 1)[0]
    assert "topic read +/+/req" in block and "topic write +/+/res/#" in block
    assert url.split(":")[2].split("@")[0] not in (broker.dir / "passwd").read_text()
    worker = start_bridge(BRIDGE_MQTT_URL=url.replace(":1883", f":{broker.port}"),
                          BRIDGE_CLIENT_ID="", BRIDGE_DATA_DIR=str(tmp_path / "w2"))  # fmt: skip
    other = start_bridge(BRIDGE_DATA_DIR=str(tmp_path / "o"))  # as bridge-NNNN, at once
    for n, proc in enumerate((worker, other)):
        dev = Device(broker, f"asks-workers{n}", proc.prefix)  # one login per user
        try:
            for i in range(3):
                assert dev.ask({"id": f"w{i}", "prompt": "hi"}).terminal.get("done") is True
        finally:
            dev.close()
        assert proc.logs().count("connected to mqtt://") == 1  # never replaced
    assert (tmp_path / "w2" / "inflight-bridge-w2.journal").exists()  # its id is its user
    assert broker.takeovers() == []

    for bad in ("bridge-w2", "integrations-x", "automation-ha"):
        assert main(["device", "add", bad, "--broker-dir", str(broker.dir), "--no-reload"]) == 1
    listed = cli("broker", "user", "list", "--broker-dir", str(broker.dir), cwd=tmp_path)
    assert "bridge-w2  (bridge)" in listed.stdout.splitlines()
    assert "bridge-w2" not in cli("device", "list", "--broker-dir", str(broker.dir),
                                  cwd=tmp_path).stdout  # fmt: skip
    for bad in ("kitchen", "bridge", "bridge-", "other-x", "bridge-a/b"):
        assert main(["broker", "user", "add", bad, *where]) == 1, bad

    # A stale copy of the rules (an older broker/acl) is brought up to date by `init`.
    (broker.dir / "acl").write_text(
        acl.replace("topic read +/+/cancel\n", "", 1).replace(
            "user bridge-w2\ntopic read +/+/req\n", "user bridge-w2\ntopic read +/old/req\n"
        )
    )
    init = cli("broker", "init", "--broker-dir", str(broker.dir), "--env", str(tmp_path / ".e"),
               cwd=tmp_path)  # fmt: skip
    assert init.returncode == 0 and "brought up to date" in init.stderr, init.stderr
    fresh = (broker.dir / "acl").read_text().split("\nuser bridge-w2\n", 1)[1]
    assert "+/old/" not in fresh and "topic read +/+/cancel" not in fresh.split("\n\n")[0]

    # Only users added with `broker user add` get rules: a device an older version let
    # be called integrations-old keeps a device's rights through `init`.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(REPO / "broker" / "acl", legacy / "acl")
    (legacy / "passwd").write_text("integrations-old:$7$x\n")
    init = cli("broker", "init", "--broker-dir", str(legacy), "--env", ".e", cwd=legacy)
    assert init.returncode == 0, init.stderr
    assert "integrations-old" not in (legacy / "acl").read_text()
    assert provision.list_service_users(legacy)[-1] == "healthcheck"

    removed = cli("broker", "user", "remove", "bridge-w2", *where, cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert "bridge-w2" not in (broker.dir / "acl").read_text()
    assert "bridge-w2:" not in (broker.dir / "passwd").read_text()


def test_reload_says_how_without_a_local_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision, "mosquitto_pids", list)
    sent, line = provision.reload_broker()
    assert not sent and provision.HOW_TO_RELOAD in line
    monkeypatch.setattr(provision, "mosquitto_pids", lambda: [11, 12])
    sent, line = provision.reload_broker()
    assert not sent and "--pid" in line and "11 12" in line
