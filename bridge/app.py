"""The application: wires the core and the plugins together, and runs it until a signal.

This is the one place that knows both the core (`bridge.core`) and the plugins
(`bridge.plugins`); the CLI and the demo start the bridge through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from bridge.core.journal import JournalBusy
from bridge.core.plugin import Plugin
from bridge.core.service import Bridge
from bridge.core.settings import Settings

log = logging.getLogger("bridge")

GC_THRESHOLD = 20_000


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]) -> int:
    """Run `main(stop)` and set `stop` on SIGINT or SIGTERM, so every part shuts down cleanly."""

    async def runner() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    try:
        return asyncio.run(runner()) or 0
    except KeyboardInterrupt:
        return 130


async def unless_stopped(work: Coroutine[Any, Any, int], stop: asyncio.Event) -> int:
    """Run `work` until it ends or `stop` is set (Ctrl-C): its status, or 130 when stopped."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return 130
    return task.result()


def build_plugins(settings: Settings) -> list[Plugin]:
    """The plugins `run_bridge` serves with, in the order they are called."""
    from bridge.plugins.images import ImagesPlugin  # noqa: PLC0415 (plugins load only when enabled)
    from bridge.plugins.models import ModelsPlugin  # noqa: PLC0415
    from bridge.plugins.policy import PolicyPlugin  # noqa: PLC0415
    from bridge.plugins.usage import UsagePlugin  # noqa: PLC0415

    # Pictures: always present, so that with BRIDGE_IMAGES off it refuses picture requests.
    plugins: list[Plugin] = [PolicyPlugin(settings), ImagesPlugin(settings)]
    if settings.sessions:
        from bridge.plugins.sessions import SessionsPlugin  # noqa: PLC0415

        plugins.append(SessionsPlugin(settings))
    usage: UsagePlugin | None = None
    if settings.metrics_port or settings.state:
        # Before the state and metrics plugins: they publish what it recorded.
        usage = UsagePlugin(settings)
        plugins.append(usage)
    models: ModelsPlugin | None = None
    if settings.models_topic:
        models = ModelsPlugin(settings)
        plugins.append(models)
    if settings.metrics_port:
        from bridge.plugins.metrics import MetricsPlugin  # noqa: PLC0415

        plugins.append(MetricsPlugin(settings, usage=usage))
    if settings.state or settings.ha_discovery:
        from bridge.plugins.homeassistant import HomeAssistantPlugin  # noqa: PLC0415
        from bridge.plugins.state import StatePlugin  # noqa: PLC0415

        state = StatePlugin(settings, usage=usage, models=models)
        if settings.ha_discovery:
            # Before the state plugin: a new device's discovery precedes its first state.
            plugins.append(HomeAssistantPlugin(settings, state))
        plugins.append(state)
    from bridge.plugins.tools import ToolsPlugin  # noqa: PLC0415

    # Always on: it only acts on `use_tools` requests and on the tools topics.
    plugins.append(ToolsPlugin(settings))
    if settings.voice:
        from bridge.plugins.listen import ListenPlugin  # noqa: PLC0415
        from bridge.plugins.speech import SpeechPlugin  # noqa: PLC0415

        # Listen first: its prepare() sets the prompt before anything else reads it.
        plugins[1:1] = [ListenPlugin(settings)]
        plugins.append(SpeechPlugin(settings))
    else:
        from bridge.plugins.speech import VoiceOffPlugin  # noqa: PLC0415

        plugins.append(VoiceOffPlugin())
    return plugins


async def take_worker_slot(settings: Settings, stop: asyncio.Event) -> tuple[Settings, Any]:
    """For `BRIDGE_WORKER_SLOTS`: wait for a free worker slot; this worker's settings with
    its slot's client id and broker user, and a task that keeps the slot's lease.

    The owner is the host name, which a container keeps across restarts: a replica
    that restarts takes its own slot back (its session and journal with it).
    """
    import socket  # noqa: PLC0415

    from bridge.core.group import worker_name, worker_url  # noqa: PLC0415
    from bridge.core.shared import open_store  # noqa: PLC0415

    # A container's host name; processes that share one host name tell themselves
    # apart with LLM_BRIDGE_SLOT_OWNER.
    owner = os.environ.get("LLM_BRIDGE_SLOT_OWNER") or socket.gethostname()
    base = settings.client_id
    store = open_store(settings.state_url, settings.data_dir, f"{settings.group}-slots", owner)
    ttl = 3 * settings.leader_ttl
    while not stop.is_set():
        slot = store.take_slot(owner, settings.worker_slots, ttl, time.time())
        if slot:
            break
        log.warning("all %d worker slots are taken; waiting for one", settings.worker_slots)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.leader_ttl)
    else:
        return settings, None
    env = dict(os.environ)
    mine = settings.model_copy(
        update={
            "client_id": worker_name(base, slot),
            "mqtt_url": worker_url(settings.mqtt_url, slot, env),
        }
    )
    log.info("worker slot %d of %d: client id %s", slot, settings.worker_slots, mine.client_id)

    async def keep() -> None:
        while True:
            await asyncio.sleep(settings.leader_ttl)
            if store.take_slot(owner, settings.worker_slots, ttl, time.time()) != slot:
                log.error("lost worker slot %d (the shared store forgot it)", slot)

    return mine, asyncio.create_task(keep(), name="worker-slot")


async def run_bridge(settings: Settings, stop: asyncio.Event) -> int:
    """Run a bridge until `stop` is set (the CLI's `run`); its exit status."""
    slot_task = None
    if settings.group and settings.worker_slots:
        settings, slot_task = await take_worker_slot(settings, stop)
        if slot_task is None:
            return 0
    try:
        bridge = Bridge(settings, plugins=build_plugins(settings))
    except JournalBusy as exc:
        log.error("%s", exc)
        if slot_task is not None:
            slot_task.cancel()
        return 1
    await bridge.start()
    # The modules loaded at start are never garbage: keep the collector off them,
    # and let it run less often, since every chunk allocates a few short-lived
    # objects. Measured in docs/performance.md.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    log.info(
        "bridge serving %s/+/req from %s, upstream %s",
        settings.topic_prefix,
        settings.mqtt.display(),
        settings.openai_base_url,
    )
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await bridge.stop()
        if slot_task is not None:
            slot_task.cancel()
    return 0
