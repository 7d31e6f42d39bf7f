"""`llm-bridge device …` and `llm-bridge broker …`: the command-line face of `bridge.ops.provision`.

Each command parses its arguments, calls the library, and says what it did
in words for the person at the terminal (exit status 0, or 1 with one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.ops.brokerconf import extra_user_kind
from bridge.ops.passwords import write_private
from bridge.ops.provision import (
    ACL,
    PASSWD,
    SERVICE_USERS,
    ProvisionError,
    add_device,
    add_service_user,
    check_bridge,
    check_extra_user,
    device_config,
    guess_host,
    init_broker,
    list_devices,
    list_service_users,
    reload_broker,
    remove_device,
    remove_service_user,
)

if TYPE_CHECKING:
    from bridge.core.settings import Settings


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
    if result.acl_updated:
        _say(f"{broker_dir / ACL}: the added users' rules were brought up to date")
    if result.passwords:
        _say(
            "passwords, shown only once: integrations (read-only: dashboards), "
            "automation (Home Assistant, flows that ask). One program per user: a second "
            "login as the same user replaces the first (`llm-bridge broker user add "
            "integrations-NAME` makes another)"
        )
        for user, password in result.passwords.items():
            print(f"{user} {password}")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    broker_dir = _broker_dir(args, settings)
    try:
        kind = check_extra_user(args.name)
        password = add_service_user(broker_dir, args.name, rotate=args.rotate)
    except ProvisionError as exc:
        _say(f"llm-bridge broker user add: {exc}")
        return 1
    verb = "has a new password" if args.rotate else f"added with the rules of `{kind}`"
    if kind == "bridge":
        line = f"BRIDGE_MQTT_URL=mqtt://{args.name}:{password}@{args.mqtt_host}:1883\n"
        what = "the worker's BRIDGE_MQTT_URL (its other settings as in .env)"
    else:
        line = f"{args.name} {password}\n"
        what = "its password"
    if args.output:
        write_private(Path(args.output), line)
        _say(f"user {args.name} {verb}; {what} is in {args.output}")
    else:
        _say(f"user {args.name} {verb}; {what}, shown only this once:")
        sys.stdout.write(line)
        sys.stdout.flush()
    _reload_after(args)
    return 0


def cmd_user_remove(args: argparse.Namespace) -> int:
    settings = _settings(args)
    broker_dir = _broker_dir(args, settings)
    try:
        remove_service_user(broker_dir, args.name)
    except ProvisionError as exc:
        _say(f"llm-bridge broker user remove: {exc}")
        return 1
    _say(f"user {args.name} removed from {broker_dir / PASSWD} and {broker_dir / ACL}")
    _reload_after(args)
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        users = list_service_users(_broker_dir(args, settings))
    except ProvisionError as exc:
        _say(f"llm-bridge broker user list: {exc}")
        return 1
    for user in users:
        print(f"{user}  ({extra_user_kind(user) or user})")
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
        "init",
        help="create the service users (bridge, integrations, automation, healthcheck) and .env",
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

    user = sub.add_parser(
        "user", help="more service users: bridge workers, dashboards, automations"
    ).add_subparsers(dest="user_command", required=True)
    uadd = user.add_parser(
        "add", help="add KIND-NAME (bridge-2, integrations-nodered, automation-ha2)"
    )
    uadd.add_argument("name", help="KIND-NAME; it gets the rules of the user KIND")
    uadd.add_argument("--rotate", action="store_true", help="give it a new password")
    uadd.add_argument(
        "--mqtt-host", default="mosquitto", help="the broker's host name in a worker's URL"
    )
    uadd.add_argument("--output", help="write the password (a worker's URL) there, 0600")
    _common(uadd, reload=True)
    uadd.set_defaults(func=cmd_user_add)
    uremove = user.add_parser("remove", help="delete a user added with `broker user add`")
    uremove.add_argument("name")
    _common(uremove, reload=True)
    uremove.set_defaults(func=cmd_user_remove)
    ulist = user.add_parser("list", help="the service users and their kinds")
    _common(ulist)
    ulist.set_defaults(func=cmd_user_list)

    check = sub.add_parser("check", help="exit 0 when the bridge is online (health check)")
    check.add_argument("--timeout", type=float, default=5.0)
    check.add_argument("--config", type=Path, help="a TOML or YAML settings file")
    check.set_defaults(func=cmd_broker_check)
