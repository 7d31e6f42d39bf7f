"""Broker users and devices: the password file, a device's config snippet, reloading Mosquitto.

`llm-bridge device add|remove|list` and `llm-bridge broker init|reload|check`
(bridge/ops/commands.py) are thin wrappers around this module. A device's MQTT user
name is its device id; the broker's ACL (broker/acl) derives its rights from
that name. Passwords are written only as Mosquitto `$7$` hashes, in files
only their owner can read; the plain password is shown once and kept nowhere.

The broker makes every client id its user name, so every program needs a user
of its own: `llm-bridge broker user add` makes further service users (a second
bridge worker `bridge-2`, a second dashboard `integrations-NAME`), each with a
copy of its kind's rules in broker/acl.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.core import protocol as p
from bridge.ops.brokerconf import SERVICE_KINDS, extra_user_kind, extra_users_in, with_extra_users
from bridge.ops.passwords import new_password, password_line, write_atomic, write_private

if TYPE_CHECKING:
    from bridge.core.settings import Settings

SERVICE_USERS = (*SERVICE_KINDS, "healthcheck")
PASSWD = "passwd"
ACL = "acl"
ENV_EXAMPLE = ".env.example"


class ProvisionError(Exception):
    """A provisioning step that cannot be done, worded for the user (no secrets)."""


class PasswordFile:
    """A Mosquitto password file: `user:$7$...` lines, order kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        if path.exists():
            for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, hashed = line.partition(":")
                if not sep or not user:
                    raise ProvisionError(f"{path}:{n}: not a `user:hash` line")
                self.entries[user] = hashed

    def __contains__(self, user: str) -> bool:
        return user in self.entries

    def set(self, user: str, password: str) -> None:
        self.entries[user] = password_line(user, password).rstrip("\n").split(":", 1)[1]

    def remove(self, user: str) -> bool:
        return self.entries.pop(user, None) is not None

    def save(self) -> None:
        write_private(self.path, "".join(f"{u}:{h}\n" for u, h in self.entries.items()))

    def devices(self) -> list[str]:
        return sorted(u for u in self.entries if not is_service_user(u))


def is_service_user(name: str) -> bool:
    return name in SERVICE_USERS or extra_user_kind(name) is not None


def check_device_id(device: str) -> None:
    if not p.valid_device_id(device) or is_service_user(device):
        kinds = "|".join(SERVICE_KINDS)
        raise ProvisionError(
            f"{device[:80]!r} cannot be a device id: use 1 to 64 of A-Z a-z 0-9 _ - "
            f"other than {', '.join(SERVICE_USERS)} and {kinds}-NAME (service users)"
        )


def add_device(broker_dir: Path, device: str, *, rotate: bool = False) -> str:
    """Create (or, with `rotate`, replace) a device's broker user; return its new password."""
    check_device_id(device)
    pw = PasswordFile(broker_dir / PASSWD)
    if device in pw and not rotate:
        raise ProvisionError(
            f"device {device} exists; `llm-bridge device add {device} --rotate` gives it a new "
            "password (its old one stops working)"
        )
    password = new_password()
    pw.set(device, password)
    pw.save()
    return password


def remove_device(broker_dir: Path, device: str) -> None:
    check_device_id(device)
    pw = PasswordFile(broker_dir / PASSWD)
    if not pw.remove(device):
        raise ProvisionError(f"no device {device} in {pw.path}")
    pw.save()


def list_devices(broker_dir: Path) -> list[str]:
    return PasswordFile(broker_dir / PASSWD).devices()


# --- further service users (bridge workers, more dashboards and automations) ----------


def sync_acl(broker_dir: Path, *, add: str | None = None, remove: str | None = None) -> bool:
    """Rewrite broker/acl's generated part: a block per further service user, `add` and
    `remove` applied.

    The users are those the part already names (the record of `broker user
    add`), never guessed from passwd: a device that an older version let be
    called `integrations-x` does not gain the integrations rules. Each block is
    a fresh copy of its kind's rules, so running this after an update of
    broker/acl (`broker init` does) carries the new rules to them. Returns
    whether the file changed; an unchanged file is not rewritten.
    """
    path = broker_dir / ACL
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProvisionError(f"no ACL file {path}: it comes with the project") from None
    users = [u for u in extra_users_in(old) if u != remove]
    if add is not None and add not in users:
        users.append(add)
    try:
        new = with_extra_users(old, users)
    except ValueError as exc:
        raise ProvisionError(f"{path}: {exc}") from None
    if new == old:
        return False
    write_atomic(path, new, 0o644)
    return True


def check_extra_user(name: str) -> str:
    kind = extra_user_kind(name)
    if kind is None:
        raise ProvisionError(
            f"{name[:80]!r} is not a service user name: use KIND-NAME, KIND one of "
            f"{', '.join(SERVICE_KINDS)}, NAME 1 to 40 of A-Z a-z 0-9 _ - (e.g. bridge-2)"
        )
    return kind


def add_service_user(broker_dir: Path, name: str, *, rotate: bool = False) -> str:
    """Create (or, with `rotate`, give a new password to) a further service user.

    Its rules are its kind's (`bridge-2` has the bridge's); returns the new password.
    """
    check_extra_user(name)
    pw = PasswordFile(broker_dir / PASSWD)
    if name in pw and not rotate:
        raise ProvisionError(
            f"user {name} exists; `llm-bridge broker user add {name} --rotate` gives it a new "
            "password (its old one stops working)"
        )
    password = new_password()
    pw.set(name, password)
    # The rules first: a user the broker knows before its rules would briefly
    # have only the device patterns, never more.
    sync_acl(broker_dir, add=name)
    pw.save()
    return password


def remove_service_user(broker_dir: Path, name: str) -> None:
    check_extra_user(name)
    pw = PasswordFile(broker_dir / PASSWD)
    if not pw.remove(name):
        raise ProvisionError(f"no user {name} in {pw.path}")
    pw.save()
    sync_acl(broker_dir, remove=name)


def list_service_users(broker_dir: Path) -> list[str]:
    pw = PasswordFile(broker_dir / PASSWD)
    acl = broker_dir / ACL
    added = extra_users_in(acl.read_text(encoding="utf-8")) if acl.exists() else []
    return [u for u in SERVICE_USERS if u in pw] + [u for u in added if u in pw]


def device_config(  # noqa: PLR0913  # the broker options are keyword-only
    device: str,
    password: str,
    *,
    host: str,
    port: int | None = None,
    tls: bool = False,
    prefix: str = "llm",
) -> dict[str, Any]:
    """The `mode`, `device_id`, `prefix` and `broker` part of the device's `config.json`."""
    broker: dict[str, Any] = {
        "host": host,
        "port": port or (8883 if tls else 1883),
        "user": device,
        "password": password,
        "tls": tls,
    }
    if tls:
        broker["ca"] = "ca.crt"
    return {"mode": "mqtt", "device_id": device, "prefix": prefix, "broker": broker}


# --- the service users and .env -------------------------------------------------------


@dataclass
class InitResult:
    created: list[str]
    passwords: dict[str, str]  # the new service users' but those in .env, to show once
    env_written: bool
    acl_updated: bool = False


# The service users whose passwords go only into the bridge's .env, as these URLs.
ENV_USERS = {"bridge": "BRIDGE_MQTT_URL", "healthcheck": "BRIDGE_CHECK_MQTT_URL"}


def set_env_var(text: str, name: str, value: str) -> str:
    """`text` (a .env file) with `name=value`, replacing an existing line or appending one."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.split("=", 1)[0].strip() == name:
            lines[i] = f"{name}={value}"
            break
    else:
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def init_broker(
    root: Path,
    broker_dir: Path,
    *,
    env_file: Path,
    mqtt_host: str = "mosquitto",
) -> InitResult:
    """Create the service users (`bridge`, `integrations`, `automation`, `healthcheck`) and `.env`.

    Users that exist are kept (run it again safely). The bridge's and the
    health check's passwords go only into `env_file` (0600), as
    `BRIDGE_MQTT_URL` and `BRIDGE_CHECK_MQTT_URL`; the others' passwords are
    returned to be shown once. `.env` starts as a copy of `.env.example`, with
    the user's uid and gid for the containers, and the data directories the
    containers write to are created. The further service users' ACL blocks
    are refreshed from their kinds' rules (sync_acl).
    """
    pw = PasswordFile(broker_dir / PASSWD)
    created: list[str] = []
    shown: dict[str, str] = {}
    env_urls: dict[str, str] = {}
    for user in SERVICE_USERS:
        if user in pw:
            continue
        password = new_password()
        pw.set(user, password)
        created.append(user)
        if user in ENV_USERS:
            env_urls[ENV_USERS[user]] = f"mqtt://{user}:{password}@{mqtt_host}:1883"
        else:
            shown[user] = password
    acl_updated = sync_acl(broker_dir) if (broker_dir / ACL).exists() else False
    if created:
        pw.save()
    env_written = False
    if env_urls or not env_file.exists():
        if env_file.exists():
            text = env_file.read_text(encoding="utf-8")
        elif (root / ENV_EXAMPLE).exists():
            text = (root / ENV_EXAMPLE).read_text(encoding="utf-8")
        else:
            text = ""
        for name, url in env_urls.items():
            text = set_env_var(text, name, url)
        text = set_env_var(text, "LOCAL_UID", str(os.getuid()))
        text = set_env_var(text, "LOCAL_GID", str(os.getgid()))
        write_private(env_file, text)
        env_written = True
    for sub in ("mosquitto", "bridge"):
        (root / "data" / sub).mkdir(parents=True, exist_ok=True)
    return InitResult(created, shown, env_written, acl_updated)


# --- reloading Mosquitto --------------------------------------------------------------


def mosquitto_pids() -> list[int]:
    """Process ids of the `mosquitto` processes this user can see."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if (entry / "comm").read_text().strip() == "mosquitto":
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return sorted(pids)


HOW_TO_RELOAD = "docker compose kill -s SIGHUP mosquitto"


def reload_broker(pid: int | None = None) -> tuple[bool, str]:
    """Make Mosquitto re-read its password and ACL files (SIGHUP).

    Returns (whether a signal was sent, a line for the user). Without `pid`
    the only `mosquitto` process seen here is signalled; with none or several,
    nothing is sent and the line says how to do it.
    """
    if pid is None:
        pids = mosquitto_pids()
        if not pids:
            return False, (
                f"no mosquitto process runs here; in Docker reload it with: {HOW_TO_RELOAD}"
            )
        if len(pids) > 1:
            listed = " ".join(map(str, pids))
            return False, (
                f"several mosquitto processes run here ({listed}): choose one with --pid"
            )
        pid = pids[0]
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False, f"no process {pid}"
    except PermissionError:
        return False, (
            f"not allowed to signal process {pid}: run `sudo kill -HUP {pid}`, "
            f"or in Docker: {HOW_TO_RELOAD}"
        )
    return True, f"mosquitto (pid {pid}) reloads its password and ACL files"


# --- checking that the bridge is online ------------------------------------------------


def check_bridge(settings: Settings, timeout: float = 5.0) -> tuple[bool, str]:
    """Whether the broker answers and the bridge's retained status is `online`.

    Connects as the user of `BRIDGE_CHECK_MQTT_URL` (`healthcheck`, made by
    `broker init`), never as the bridge's: the broker makes a client's id its
    user name, so a check logged in as `bridge` would replace the bridge's
    connection. The health check of compose.yaml.
    """
    import ssl  # noqa: PLC0415
    import threading  # noqa: PLC0415

    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    from bridge.core.settings import MqttUrl  # noqa: PLC0415

    if not settings.check_mqtt_url:
        return False, (
            "BRIDGE_CHECK_MQTT_URL is not set: `llm-bridge broker init` makes the healthcheck "
            "user and writes it to .env (the bridge's own user would disconnect the bridge)"
        )
    url = MqttUrl.parse(settings.check_mqtt_url)
    topic = f"{settings.topic_prefix}/bridge/status"
    result: list[str] = []
    done = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=url.username or "", protocol=paho.MQTTv311
    )
    if url.username:
        c.username_pw_set(url.username, url.password.get_secret_value() if url.password else None)
    if url.tls:
        ca = str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None
        ctx = ssl.create_default_context(cafile=ca)
        if settings.mqtt_tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        c.tls_set_context(ctx)

    def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            result.append(f"the broker refused the connection: {reason}")
            done.set()
        else:
            client.subscribe(topic, qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        result.append(bytes(msg.payload).decode("utf-8", "replace"))
        done.set()

    c.on_connect = on_connect
    c.on_message = on_message
    try:
        c.connect(url.host, url.port, keepalive=max(int(timeout) * 2, 5))
    except (OSError, ssl.SSLError) as exc:
        return False, f"cannot reach the broker at {url.display()}: {exc}"
    c.loop_start()
    try:
        done.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
    if not result:
        return False, f"no {topic} from the bridge within {timeout:g} s"
    if result[0] == "online":
        return True, f"bridge online at {url.display()}"
    return False, f"bridge status: {result[0]}"


# --- the command line (bridge/cli.py wires these in) -----------------------------------


def guess_host() -> str:
    """This machine's address on its network (what a device should connect to)."""
    import socket  # noqa: PLC0415

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
        return str(s.getsockname()[0])
    return "127.0.0.1"
