"""Broker users and devices: the password file, a device's config snippet, reloading Mosquitto.

`llm-bridge device add|remove|list` and `llm-bridge broker init|reload|check`
(bridge/cli.py) are thin wrappers around this module. A device's MQTT user
name is its device id; the broker's ACL (broker/acl) derives its rights from
that name. Passwords are written only as Mosquitto `$7$` hashes, in files
only their owner can read; the plain password is shown once and kept nowhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.core import protocol as p
from bridge.ops.passwords import new_password, password_line, write_private

if TYPE_CHECKING:
    from bridge.core.settings import Settings

SERVICE_USERS = ("bridge", "integrations", "automation")
PASSWD = "passwd"
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
        return sorted(u for u in self.entries if u not in SERVICE_USERS)


def check_device_id(device: str) -> None:
    if not p.valid_device_id(device) or device in SERVICE_USERS:
        raise ProvisionError(
            f"{device[:80]!r} cannot be a device id: use 1 to 64 of A-Z a-z 0-9 _ - "
            f"other than {', '.join(SERVICE_USERS)}"
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
    passwords: dict[str, str]  # the new service users' but the bridge's, to show once
    env_written: bool


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
    """Create the `bridge`, `integrations` and `automation` users and the bridge's `.env`.

    Users that exist are kept (run it again safely). The bridge's password
    goes only into `env_file` (0600), as `BRIDGE_MQTT_URL`; the others'
    passwords are returned to be shown once. `.env` starts as a copy of
    `.env.example`, with the user's uid and gid for the containers, and the data
    directories the containers write to are created.
    """
    pw = PasswordFile(broker_dir / PASSWD)
    created: list[str] = []
    shown: dict[str, str] = {}
    bridge_password: str | None = None
    for user in SERVICE_USERS:
        if user in pw:
            continue
        password = new_password()
        pw.set(user, password)
        created.append(user)
        if user == "bridge":
            bridge_password = password
        else:
            shown[user] = password
    if created:
        pw.save()
    env_written = False
    if bridge_password is not None or not env_file.exists():
        if env_file.exists():
            text = env_file.read_text(encoding="utf-8")
        elif (root / ENV_EXAMPLE).exists():
            text = (root / ENV_EXAMPLE).read_text(encoding="utf-8")
        else:
            text = ""
        if bridge_password is not None:
            text = set_env_var(
                text, "BRIDGE_MQTT_URL", f"mqtt://bridge:{bridge_password}@{mqtt_host}:1883"
            )
        text = set_env_var(text, "LOCAL_UID", str(os.getuid()))
        text = set_env_var(text, "LOCAL_GID", str(os.getgid()))
        write_private(env_file, text)
        env_written = True
    for sub in ("mosquitto", "bridge"):
        (root / "data" / sub).mkdir(parents=True, exist_ok=True)
    return InitResult(created, shown, env_written)


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

    Connects with the bridge's own `BRIDGE_MQTT_URL` user under another client
    id (so the bridge is not disconnected): the health check of compose.yaml.
    """
    import ssl  # noqa: PLC0415
    import threading  # noqa: PLC0415

    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    url = settings.mqtt
    topic = f"{settings.topic_prefix}/bridge/status"
    result: list[str] = []
    done = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{settings.client_id}-check-{os.getpid()}",
        protocol=paho.MQTTv311,
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


def _settings(args: argparse.Namespace) -> Settings:
    from bridge.core.settings import load_settings  # noqa: PLC0415

    return load_settings(getattr(args, "config", None))


def _broker_dir(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.broker_dir) if args.broker_dir else Path(settings.broker_dir)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _reload_after(args: argparse.Namespace) -> None:
    if args.no_reload:
        _say("the broker was not reloaded: run `llm-bridge broker reload`")
        return
    _sent, line = reload_broker(args.pid)
    _say(line)


def cmd_device_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    broker_dir = _broker_dir(args, settings)
    try:
        password = add_device(broker_dir, args.device, rotate=args.rotate)
    except ProvisionError as exc:
        _say(f"llm-bridge device add: {exc}")
        return 1
    snippet = device_config(
        args.device,
        password,
        host=args.host or guess_host(),
        port=args.port,
        tls=args.tls,
        prefix=settings.topic_prefix,
    )
    text = json.dumps(snippet, indent=2) + "\n"
    verb = "has a new password" if args.rotate else "added"
    if args.output:
        write_private(Path(args.output), text)
        _say(f"device {args.device} {verb}; its config (with the password) is in {args.output}")
    else:
        _say(
            f"device {args.device} {verb} to {broker_dir / PASSWD}. Put this in the device's "
            "config.json; the password is shown only this once:"
        )
        sys.stdout.write(text)
        sys.stdout.flush()
    if args.tls:
        _say(f"copy {broker_dir / 'certs' / 'ca.crt'} to the device as ca.crt")
    _reload_after(args)
    return 0


def cmd_device_remove(args: argparse.Namespace) -> int:
    settings = _settings(args)
    broker_dir = _broker_dir(args, settings)
    try:
        remove_device(broker_dir, args.device)
    except ProvisionError as exc:
        _say(f"llm-bridge device remove: {exc}")
        return 1
    _say(f"device {args.device} removed from {broker_dir / PASSWD}")
    _reload_after(args)
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from bridge.plugins.policy import COUNTERS_FILE, Counters, utc_day  # noqa: PLC0415

    settings = _settings(args)
    try:
        devices = list_devices(_broker_dir(args, settings))
    except ProvisionError as exc:
        _say(f"llm-bridge device list: {exc}")
        return 1
    usage: dict[str, tuple[int, int]] = {}
    db = Path(settings.data_dir) / COUNTERS_FILE
    if db.exists():
        counters = Counters(db)
        try:
            usage = counters.usage(utc_day(time.time()))
        finally:
            counters.close()
    if not devices:
        _say("no devices yet: `llm-bridge device add NAME` adds one")
        return 0
    width = max(len(d) for d in devices)
    print(f"{'device':<{width}}  requests_today  tokens_today")
    for d in devices:
        requests, tokens = usage.get(d, (0, 0))
        print(f"{d:<{width}}  {requests:>14}  {tokens:>12}")
    return 0


def cmd_broker_init(args: argparse.Namespace) -> int:
    settings = _settings(args)
    broker_dir = _broker_dir(args, settings)
    root = Path.cwd()
    result = init_broker(root, broker_dir, env_file=Path(args.env), mqtt_host=args.mqtt_host)
    for user in SERVICE_USERS:
        state = "created" if user in result.created else "kept (it existed)"
        _say(f"broker user {user}: {state}")
    if result.env_written:
        _say(f"{args.env} written (owner-only); set OPENAI_API_KEY in it")
    if result.passwords:
        _say(
            "passwords, shown only once: integrations (read-only: dashboards), "
            "automation (Home Assistant, flows that ask)"
        )
        for user, password in result.passwords.items():
            print(f"{user} {password}")
    return 0


def cmd_broker_reload(args: argparse.Namespace) -> int:
    sent, line = reload_broker(args.pid)
    _say(line)
    return 0 if sent else 1


def cmd_broker_tls(args: argparse.Namespace) -> int:
    from bridge.ops.tlsgen import make_certificates  # noqa: PLC0415

    settings = _settings(args)
    cert_dir = Path(args.dir) if args.dir else _broker_dir(args, settings) / "certs"
    issued = make_certificates(cert_dir, args.host, days=args.days)
    _say(
        f"{'made a new' if issued.ca_created else 'kept the'} CA: {issued.ca_cert}\n"
        f"server certificate for {', '.join(issued.hosts)} until "
        f"{issued.not_after:%Y-%m-%d}: {issued.server_cert}\n"
        "restart the broker to open the TLS listener (docker compose restart mosquitto); "
        "the bridge then uses BRIDGE_MQTT_URL=mqtts://...:8883 with BRIDGE_MQTT_CA_FILE "
        f"pointing at {issued.ca_cert.name}"
    )
    return 0


def cmd_broker_check(args: argparse.Namespace) -> int:
    ok, line = check_bridge(_settings(args), timeout=args.timeout)
    _say(line)
    return 0 if ok else 1


def _common(parser: argparse.ArgumentParser, *, reload: bool = False) -> None:
    parser.add_argument("--config", type=Path, help="a TOML or YAML settings file")
    parser.add_argument(
        "--broker-dir", help="the broker's files (default BRIDGE_BROKER_DIR, `broker`)"
    )
    if reload:
        parser.add_argument("--no-reload", action="store_true", help="do not signal Mosquitto")
        parser.add_argument("--pid", type=int, help="the Mosquitto process to reload")


def add_device_commands(sub: Any) -> None:
    """`device add|remove|list` into the `device` group's subparsers."""
    add = sub.add_parser("add", help="create a device's broker user and print its config")
    add.add_argument("device", help="the device id (its MQTT user name)")
    add.add_argument("--host", help="the broker's address as the device sees it")
    add.add_argument("--port", type=int, help="the broker's port (default 1883, 8883 with --tls)")
    add.add_argument("--tls", action="store_true", help="the device connects with TLS")
    add.add_argument("--rotate", action="store_true", help="give an existing device a new password")
    add.add_argument("--output", help="write the config there (0600) instead of printing it")
    _common(add, reload=True)
    add.set_defaults(func=cmd_device_add)

    remove = sub.add_parser("remove", help="delete a device's broker user")
    remove.add_argument("device")
    _common(remove, reload=True)
    remove.set_defaults(func=cmd_device_remove)

    listing = sub.add_parser("list", help="the devices, with today's requests and tokens")
    _common(listing)
    listing.set_defaults(func=cmd_device_list)


def add_broker_commands(sub: Any) -> None:
    """`broker init|reload|tls|check` into the `broker` group's subparsers."""
    init = sub.add_parser(
        "init", help="create the service users (bridge, integrations, automation) and .env"
    )
    init.add_argument("--env", default=".env", help="the .env file to write (default .env)")
    init.add_argument(
        "--mqtt-host", default="mosquitto", help="the broker's host name for the bridge"
    )
    _common(init)
    init.set_defaults(func=cmd_broker_init)

    reload = sub.add_parser("reload", help="make Mosquitto re-read its password and ACL files")
    reload.add_argument("--pid", type=int, help="the Mosquitto process (default: the only one)")
    reload.set_defaults(func=cmd_broker_reload)

    tls = sub.add_parser("tls", help="make a local CA and a server certificate for port 8883")
    tls.add_argument("--host", action="append", help="a name or address of the broker (repeatable)")
    tls.add_argument("--days", type=int, default=825, help="validity of the server certificate")
    tls.add_argument("--dir", help="where to write (default BROKER_DIR/certs)")
    _common(tls)
    tls.set_defaults(func=cmd_broker_tls)

    check = sub.add_parser("check", help="exit 0 when the bridge is online (health check)")
    check.add_argument("--timeout", type=float, default=5.0)
    check.add_argument("--config", type=Path, help="a TOML or YAML settings file")
    check.set_defaults(func=cmd_broker_check)
