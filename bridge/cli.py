"""`llm-bridge`: run the bridge, the mock LLM, a terminal chat, the demo."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from bridge.app import run_until_signal, unless_stopped
from bridge.core.settings import ConfigError, load_settings


def cmd_run(args: argparse.Namespace) -> int:
    from bridge.app import run_bridge
    from bridge.logs import setup_logging

    overrides: dict[str, Any] = {"group": args.group} if args.group else {}
    settings = load_settings(args.config, **overrides)
    setup_logging(settings.log_level, settings.log_format)
    if args.workers > 1:
        from bridge.workers import supervise

        argv = ["--config", str(args.config)] if args.config else []
        return supervise(
            args.workers, settings.group or "bridge", settings.client_id, settings.mqtt_url, argv
        )

    async def main(stop: asyncio.Event) -> int:
        return await run_bridge(settings, stop)

    return run_until_signal(main)


def cmd_mock_llm(args: argparse.Namespace) -> int:
    from bridge.dev import mock_llm

    return mock_llm.run(args)


def _print_progress(msg: dict[str, Any]) -> None:
    """A tool call or result of a `--use-tools` request, on stderr."""
    if "tool_call" in msg:
        c = msg["tool_call"]
        print(f"[tool call {c.get('device')}/{c.get('name')}]", file=sys.stderr, flush=True)
    elif "tool_result" in msg:
        ok = msg["tool_result"].get("ok")
        print(f"[tool result: {'ok' if ok else 'error'}]", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from bridge.dev.client import BridgeClient, BridgeError

    fields: dict[str, Any] = {"stream": not args.no_stream}
    if args.model:
        fields["model"] = args.model
    if args.system:
        fields["system"] = args.system
    if args.max_tokens:
        fields["max_tokens"] = args.max_tokens
    if args.session:
        fields["session"] = args.session
        if args.new_session:
            fields["session_reset"] = True
    if args.use_tools:
        fields["use_tools"] = True

    async def main(stop: asyncio.Event) -> int:
        client = BridgeClient(
            args.mqtt_url, args.device, prefix=args.prefix, idle_timeout=args.timeout,
            ca_file=args.ca_file,
        )  # fmt: skip
        try:
            await client.connect()
        except (TimeoutError, OSError) as exc:
            print(f"llm-bridge chat: {exc}", file=sys.stderr)
            return 1
        client.on_progress = _print_progress

        async def ask() -> int:
            try:
                async for piece in client.stream(args.prompt, **fields):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                if client.last and client.last.text:
                    sys.stdout.write(client.last.text)
                sys.stdout.write("\n")
            except BridgeError as exc:
                sys.stdout.write("\n")
                print(f"llm-bridge chat: {exc}", file=sys.stderr)
                return 1
            return 0

        try:
            return await unless_stopped(ask(), stop)
        finally:
            await client.close()

    return run_until_signal(main)


def _screen_size(text: str) -> str:
    width, x, height = text.partition("x")
    if not (x and width.isdigit() and height.isdigit() and 0 < int(width) <= 2048
            and 0 < int(height) <= 2048):  # fmt: skip
        raise argparse.ArgumentTypeError("WIDTHxHEIGHT, each 1-2048")
    return text


def cmd_demo(args: argparse.Namespace) -> int:
    from bridge.dev import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915  # one statement per option
    parser = argparse.ArgumentParser(
        prog="llm-bridge",
        description="Stream replies from an OpenAI-compatible API to MQTT devices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the bridge (configured by environment, .env, --config)")
    run.add_argument("--config", type=Path, help="a TOML or YAML settings file")
    run.add_argument(
        "--group", help="join this worker group (BRIDGE_GROUP): requests are shared out"
    )
    run.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="run N worker processes of the group (default group `bridge`); worker i>1 "
        "logs in as USER-i with the same password, or with BRIDGE_MQTT_URL_<i>",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)

    from bridge.dev import mock_llm

    mock = sub.add_parser("mock-llm", help="serve a mock OpenAI-compatible API for development")
    mock_llm.add_arguments(mock)
    mock.set_defaults(func=cmd_mock_llm)

    chat = sub.add_parser("chat", help="ask through the bridge as a device would")
    chat.add_argument("prompt")
    chat.add_argument("--device", "-d", required=True, help="the device id to ask as")
    chat.add_argument(
        "--mqtt-url",
        default=os.environ.get("LLM_CHAT_MQTT_URL")
        or os.environ.get("BRIDGE_MQTT_URL", "mqtt://localhost:1883"),
        help="broker URL with the device's credentials (env LLM_CHAT_MQTT_URL)",
    )
    chat.add_argument("--prefix", default=os.environ.get("BRIDGE_TOPIC_PREFIX", "llm"))
    chat.add_argument("--model")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--no-stream", action="store_true", help="get the reply in one message")
    chat.add_argument(
        "--session", help="continue this conversation kept by the bridge (protocol v2)"
    )
    chat.add_argument("--new-session", action="store_true", help="with --session: start it afresh")
    chat.add_argument(
        "--use-tools", action="store_true",
        help="let the model use the device's own and granted tools (protocol v2)",
    )  # fmt: skip
    chat.add_argument("--timeout", type=float, default=60.0, help="seconds without a message")
    chat.add_argument("--ca-file", type=Path, help="CA certificate for mqtts://")
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser("demo", help="start broker, mock LLM, bridge and a device, and ask")
    demo.add_argument("--prompt", default="Why is the sky blue?")
    demo.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the answer")
    demo.add_argument(
        "--tools",
        action="store_true",
        help="a simulated lamp offers tools, and the device asks to turn it on",
    )
    demo.add_argument(
        "--voice", nargs="?", const="demo-answer.wav", default=None, metavar="WAV",
        help="also speak the answer; the device writes it to WAV (default demo-answer.wav)",
    )  # fmt: skip
    demo.add_argument(
        "--image", nargs="?", const="a lighthouse at dusk, line art", default=None,
        metavar="PROMPT", help="ask for a picture for a small screen instead, saved as a PNG",
    )  # fmt: skip
    demo.add_argument(
        "--image-format", default="mono1", choices=("rgb565", "rgb565_be", "mono1",
        "mono1_vlsb", "gray4", "jpeg", "png"), help="the screen's pixel format (default mono1)",
    )  # fmt: skip
    demo.add_argument(
        "--image-size", default="128x64", type=_screen_size, help="WIDTHxHEIGHT (default 128x64)"
    )
    demo.add_argument("--image-out", default="demo-image.png", help="where the PNG goes")
    demo.set_defaults(func=cmd_demo)

    from bridge.ops import commands

    device = sub.add_parser("device", help="add, remove and list devices (their broker users)")
    device_sub = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    commands.add_device_commands(device_sub)
    try:
        deploy: Any = importlib.import_module("bridge.ops.deploy")
    except ModuleNotFoundError as exc:
        if exc.name != "bridge.ops.deploy":
            raise
    else:
        dep = device_sub.add_parser("deploy", help="put the program and config on a board")
        deploy.add_deploy_arguments(dep)
        dep.set_defaults(func=deploy.run_deploy)

    broker = sub.add_parser("broker", help="the broker: users, reload, TLS certificates, health")
    commands.add_broker_commands(
        broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"llm-bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
