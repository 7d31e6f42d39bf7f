"""`llm-bridge demo`: the whole system on one machine, in one command.

It starts a broker (Mosquitto with the project's broker/ files when it is
installed, else the embedded Python broker amqtt), the mock LLM (or the real
API when `OPENAI_API_KEY` is set), the bridge, and a device that asks a
question and prints the answer as it streams. Ctrl-C stops all of it.

With `--tools` (protocol v2, "Tools") a simulated lamp device declares tools
(`set_led`, `read_temperature`), the asking device's policy grants `lamp/*`,
and the device asks to turn the lamp on: the bridge calls the lamp and the
demo prints the tool call, the lamp's side and the answer.
With `--voice` the answer is also spoken (protocol v2 "Voice") and the
simulated device writes what it heard to a WAV file.
With `--image` the device asks for a picture for its screen instead
(docs/protocol.md "Pictures"): it receives it in pieces in the screen's
format, and the demo converts it back and writes it to a PNG file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
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
from bridge.dev.tooldevice import ToolDevice
from bridge.ops.brokerconf import acl_text, render_config
from bridge.ops.passwords import new_password, password_line
from bridge.plugins.tools import ToolsPlugin

DEVICE = "demo"
LAMP = "lamp"
DEFAULT_PROMPT = "Why is the sky blue?"
TOOLS_PROMPT = "Turn the lamp on, please."


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


async def demo(args: argparse.Namespace, stop: asyncio.Event) -> int:  # noqa: PLR0912, PLR0915  # each part of the demo, in order
    """Run the demo; return the exit status."""
    port = args.port or _free_port()
    users = {"bridge": new_password(), DEVICE: new_password()}
    if args.tools:
        users[LAMP] = new_password()
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
            prompt = args.prompt
            if args.tools:
                # The asking device may use every tool of the lamp (docs/configuration.md).
                overrides["policy"] = {"devices": {DEVICE: {"tools": [f"{LAMP}/*"]}}}
                if prompt == DEFAULT_PROMPT:
                    prompt = TOOLS_PROMPT
                if mock is not None:
                    prompt += " [mock call=set_led(on:true)]"  # the mock's script
            settings = load_settings(**overrides)
            from bridge.plugins.listen import ListenPlugin  # noqa: PLC0415
            from bridge.plugins.speech import SpeechPlugin  # noqa: PLC0415

            plugins: list[Plugin] = [ListenPlugin(settings), SpeechPlugin(settings)]
            if args.tools:
                plugins.append(ToolsPlugin(settings))
            if args.image is not None:
                from bridge.plugins.images import ImagesPlugin  # noqa: PLC0415

                plugins.append(ImagesPlugin(settings))
            bridge = Bridge(settings, plugins=plugins)
            try:
                await bridge.start(connect_timeout=10)
                _say("bridge: online")
                url = f"mqtt://{DEVICE}:{users[DEVICE]}@127.0.0.1:{port}"
                version = 5 if mqtt_version == "5" else 4
                voice = getattr(args, "voice", None)
                if args.image is not None:
                    status = await _picture(url, version, args, stop)
                elif args.tools:
                    lamp_url = f"mqtt://{LAMP}:{users[LAMP]}@127.0.0.1:{port}"
                    status = await _ask_with_tools(url, lamp_url, version, prompt, stop)
                elif voice:
                    status = await _ask_voice(url, version, prompt, stop, Path(voice))
                else:
                    status = await _ask(url, version, prompt, stop)
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


def _lamp_event(kind: str, call: dict[str, Any], *rest: Any) -> None:
    if kind == "call":
        _say(f"lamp: call {call.get('name')}({json.dumps(call.get('arguments'))})")
    else:
        ok, value = rest
        _say(f"lamp: answered {'result' if ok else 'error'} {json.dumps(value)}")


async def _lamp(url: str, version: int) -> ToolDevice:
    """The simulated lamp: an LED to switch and a temperature to read."""
    lamp = ToolDevice(url, LAMP, version=version, on_event=_lamp_event)
    state = {"on": False}

    def set_led(on: bool) -> dict[str, bool]:
        state["on"] = bool(on)
        _say(f"lamp: LED {'ON' if state['on'] else 'off'}")
        return {"on": state["on"]}

    def read_temperature() -> dict[str, float]:
        return {"celsius": 21.5}

    lamp.tool(
        "set_led",
        "Turn the lamp on or off",
        {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
        set_led,
        timeout_ms=3000,
    )
    lamp.tool("read_temperature", "The temperature at the lamp in degrees Celsius", None,
              read_temperature)  # fmt: skip
    await lamp.connect()
    return lamp


async def _ask_with_tools(
    url: str, lamp_url: str, version: int, prompt: str, stop: asyncio.Event
) -> int:
    lamp = await _lamp(lamp_url, version)
    _say(f"device {LAMP!r} offers its tools: set_led, read_temperature")
    verdict = await lamp.accepted()
    if not verdict.get("ok"):
        _say(f"the bridge refused the lamp's tools: {verdict.get('error')}")
    try:
        async with BridgeClient(url, DEVICE, version=version) as client:
            _say(f"device {DEVICE!r} asks, with use_tools: {prompt}")

            async def stream() -> int:
                wrote = False
                async for msg in client.events(prompt, use_tools=True):
                    if "tool_call" in msg:
                        c = msg["tool_call"]
                        _say(f"tool call: {c['device']}/{c['name']} (id {c['id']})")
                    elif "tool_result" in msg:
                        r = msg["tool_result"]
                        _say(f"tool result: {'ok' if r['ok'] else 'error'} (id {r['id']})")
                    elif "delta" in msg:
                        sys.stdout.write(msg["delta"])
                        sys.stdout.flush()
                        wrote = True
                    elif "error" in msg:
                        if wrote:
                            print(file=sys.stdout)
                        err = msg["error"]
                        _say(f"error: {err.get('code')}: {err.get('message')}")
                        return 1
                    elif "done" in msg:
                        print(file=sys.stdout, flush=True)
                        tokens = (msg.get("usage") or {}).get("total_tokens")
                        _say(
                            f"done: finish_reason={msg.get('finish_reason')} "
                            f"tool_rounds={msg.get('tool_rounds')} tokens={tokens}"
                        )
                return 0

            return await unless_stopped(stream(), stop)
    finally:
        await lamp.close()


class _Heard:
    """The simulated device's speaker: the audio frames of its replies, kept for a WAV."""

    def __init__(self) -> None:
        self.pcm = bytearray()
        self.rate = 16000
        self.end: dict[str, Any] | None = None
        self.ended = asyncio.Event()

    def on_frame(self, _rid: str, payload: bytes) -> None:
        from bridge.plugins import audio  # noqa: PLC0415

        try:
            frame = audio.unpack_frame(payload)
        except ValueError:
            return
        if frame.kind == audio.DATA:
            self.pcm += frame.payload
            self.rate = frame.rate or self.rate
            return
        with contextlib.suppress(ValueError):
            self.end = json.loads(frame.payload) if frame.kind == audio.ERROR else {}
        self.ended.set()


async def _ask_voice(url: str, version: int, prompt: str, stop: asyncio.Event, out: Path) -> int:
    """Ask with `speak`, print the text, write the spoken answer to `out`."""
    from bridge.plugins import audio  # noqa: PLC0415

    heard = _Heard()
    async with BridgeClient(url, DEVICE, version=version) as client:
        client.on_audio = heard.on_frame  # the device's one connection hears it
        _say(f"device {DEVICE!r} asks, to hear the answer: {prompt}")

        async def talk() -> int:
            try:
                async for piece in client.stream(prompt, speak={"rate": 16000}):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except BridgeError as exc:
                print(file=sys.stdout)
                _say(f"error: {exc}")
                return 1
            print(file=sys.stdout, flush=True)
            async with asyncio.timeout(30):
                await heard.ended.wait()
            if heard.end:
                _say(f"speech failed: {heard.end.get('code')}: {heard.end.get('message')}")
                return 1
            wav = audio.wav_bytes(bytes(heard.pcm), heard.rate)
            await asyncio.to_thread(out.write_bytes, wav)
            ms = audio.pcm_ms(len(heard.pcm), heard.rate)
            _say(f"spoken answer: {ms / 1000:.1f} s at {heard.rate} Hz written to {out}")
            return 0

        return await unless_stopped(talk(), stop)


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
    if getattr(args, "voice", None):
        args.voice = os.path.abspath(args.voice)  # said in full when written

    return run_until_signal(lambda stop: demo(args, stop))
