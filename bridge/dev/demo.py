"""`llm-bridge demo`: the whole system on one machine, in one command.

It starts a broker (Mosquitto with the project's broker/ files when it is
installed, else the embedded Python broker amqtt), the mock LLM (or the real
API when `OPENAI_API_KEY` is set), the bridge, and a device that asks a
question and prints the answer as it streams. Ctrl-C stops all of it.

With `--image` the device asks for a picture for its screen instead
(docs/protocol.md "Pictures"): it receives it in pieces in the screen's
format, and the demo converts it back and writes it to a PNG file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bridge.app import run_until_signal, unless_stopped
from bridge.core.plugin import Plugin
from bridge.core.service import Bridge
from bridge.core.settings import load_settings
from bridge.dev.client import BridgeClient, BridgeError
from bridge.dev.mock_llm import MockLLM
from bridge.ops.brokerconf import acl_text, render_config
from bridge.ops.passwords import new_password, password_line

DEVICE = "demo"


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_port(port: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


def _mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


@contextlib.asynccontextmanager
async def _broker(port: int, users: dict[str, str], workdir: Path) -> AsyncIterator[str]:
    """Run a broker on 127.0.0.1:port for the demo; yield the MQTT version to speak."""
    binary = _mosquitto()
    if binary is not None:
        (workdir / "data").mkdir()
        passwd = workdir / "passwd"
        passwd.write_text("".join(password_line(u, pw) for u, pw in users.items()))
        passwd.chmod(0o600)
        (workdir / "acl").write_text(acl_text())
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            render_config(
                config_dir=workdir,
                data_dir=workdir / "data",
                ports={1883: port},
                log_file=workdir / "mosquitto.log",
                run_as=getpass.getuser() if os.geteuid() == 0 else None,
            )
        )
        proc = await asyncio.create_subprocess_exec(
            binary, "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await _wait_port(port)
            _say(f"broker: Mosquitto ({binary}) with broker/ config on 127.0.0.1:{port}")
            yield "5"
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        return
    try:
        from amqtt.broker import Broker  # noqa: PLC0415 (optional, only without Mosquitto)
    except ImportError:
        raise SystemExit(
            "llm-bridge demo: no broker. Install Mosquitto (sudo apt-get install mosquitto) "
            "or the embedded one: pip install 'llm-mqtt-bridge[demo]'"
        ) from None
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    try:
        _say(f"broker: embedded amqtt (MQTT 3.1.1) on 127.0.0.1:{port}; install Mosquitto for ACLs")
        yield "3.1.1"
    finally:
        await broker.shutdown()


async def demo(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Run the demo; return the exit status."""
    port = args.port or _free_port()
    users = {"bridge": new_password(), DEVICE: new_password()}
    mock: MockLLM | None = None
    with tempfile.TemporaryDirectory(prefix="llm-bridge-demo-") as tmp:
        async with _broker(port, users, Path(tmp)) as mqtt_version:
            base = load_settings()
            overrides: dict[str, Any] = {
                "mqtt_url": f"mqtt://bridge:{users['bridge']}@127.0.0.1:{port}",
                "mqtt_version": mqtt_version,
                "client_id": "llm-bridge-demo",
                "topic_prefix": "llm",
                "log_level": "WARNING",
            }
            if base.openai_api_key is None:
                mock = MockLLM(delay_ms=40)
                mock_port = await mock.start()
                overrides["openai_base_url"] = f"http://127.0.0.1:{mock_port}/v1"
                overrides["openai_model"] = "mock-1"
                _say(f"LLM: mock on 127.0.0.1:{mock_port} (set OPENAI_API_KEY for a real API)")
            else:
                _say(f"LLM: {base.openai_base_url}, model {base.openai_model}")
            settings = load_settings(**overrides)
            plugins: list[Plugin] = []
            if args.image is not None:
                from bridge.plugins.images import ImagesPlugin  # noqa: PLC0415

                plugins.append(ImagesPlugin(settings))
            bridge = Bridge(settings, plugins=plugins)
            try:
                await bridge.start(connect_timeout=10)
                _say("bridge: online")
                url = f"mqtt://{DEVICE}:{users[DEVICE]}@127.0.0.1:{port}"
                version = 5 if mqtt_version == "5" else 4
                if args.image is not None:
                    status = await _picture(url, version, args, stop)
                else:
                    status = await _ask(url, version, args.prompt, stop)
                if args.keep_running and not stop.is_set():
                    _say(
                        "still serving; ask again from another terminal with:\n"
                        f"  llm-bridge chat --device {DEVICE} --mqtt-url '{url}' 'Hello?'\n"
                        "Ctrl-C stops everything."
                    )
                    await stop.wait()
                return status
            finally:
                await bridge.stop()
                if mock is not None:
                    await mock.stop()
                _say("stopped")


async def _ask(url: str, version: int, prompt: str, stop: asyncio.Event) -> int:

    async with BridgeClient(url, DEVICE, version=version) as client:
        _say(f"device {DEVICE!r} asks: {prompt}")

        async def stream() -> int:
            try:
                async for piece in client.stream(prompt):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except BridgeError as exc:
                print(file=sys.stdout)
                _say(f"error: {exc}")
                return 1
            print(file=sys.stdout, flush=True)
            last = client.last
            if last is not None:
                tokens = (last.usage or {}).get("total_tokens")
                _say(f"done: finish_reason={last.finish_reason} tokens={tokens}")
            return 0

        return await unless_stopped(stream(), stop)


async def _picture(url: str, version: int, args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Ask for a picture as a small screen would, then show where its PNG copy is."""
    width, _, height = args.image_size.partition("x")
    w, h, fmt = int(width), int(height), args.image_format
    async with BridgeClient(url, DEVICE, version=version) as client:
        _say(f"device {DEVICE!r} asks for a {w}x{h} {fmt} picture of: {args.image}")

        async def fetch() -> int:
            try:
                info, data = await client.image(args.image, w, h, fmt)
            except BridgeError as exc:
                _say(f"error: {exc}")
                return 1
            _say(f"received {info['bytes']} bytes in {info['pieces']} pieces ({fmt})")
            out = await asyncio.to_thread(_save_png, data, w, h, fmt, args.image_out)
            _say(f"the device's picture, converted back: {out}")
            return 0

        return await unless_stopped(fetch(), stop)


def _save_png(data: bytes, width: int, height: int, fmt: str, path: str) -> Path:
    """The screen's bytes back as a picture, in a PNG file; its absolute path."""
    from bridge.plugins import imaging  # noqa: PLC0415

    out = Path(path).resolve()
    imaging.from_screen(data, width, height, fmt).save(out, "PNG")
    return out


def run(args: argparse.Namespace) -> int:
    """The `llm-bridge demo` command."""

    return run_until_signal(lambda stop: demo(args, stop))
