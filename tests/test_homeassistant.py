"""Home Assistant MQTT discovery, the text entity, HA's birth message and device removal,
against a real Mosquitto and the bridge as a process.

The discovery payloads are checked field by field against the keys Home Assistant
documents (always), and against Home Assistant's own MQTT schemas and template
engine when a Python with the `homeassistant` package is at hand: set
`HA_PYTHON=/path/to/python` (its venv has `pip install homeassistant`), or run the
tests in such a venv. See docs/integrations/README.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import StartBridge
from tests.harness import Broker, Device, Msg, Watcher, retained

PREFIX = "homeassistant/device/llm"
STATUS = "llm/bridge/status"

# --- what Home Assistant documents for MQTT discovery (device-based, `cmps`) -------------

#: Top-level keys of a device-based discovery payload and the options shared with
#: every component (HA's DEVICE_DISCOVERY_SCHEMA and SHARED_OPTIONS).
DEVICE_LEVEL = {
    "dev", "device", "o", "origin", "cmps", "components", "qos", "encoding",
    "availability", "availability_mode", "availability_template", "availability_topic",
    "payload_available", "payload_not_available", "state_topic", "command_topic",
}  # fmt: skip
SHARED = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "command_topic", "payload_available", "payload_not_available", "state_topic",
}  # fmt: skip
DEVICE_KEYS = {
    "identifiers", "connections", "manufacturer", "model", "name", "hw_version",
    "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url",
}  # fmt: skip
ORIGIN_KEYS = {"name", "sw", "sw_version", "url", "support_url"}
ENTITY_KEYS = {
    "p", "platform", "name", "unique_id", "object_id", "icon", "entity_category",
    "enabled_by_default", "json_attributes_topic", "json_attributes_template", "qos",
    "encoding", "device", "origin",
} | SHARED  # fmt: skip
PLATFORM_KEYS = {
    "sensor": {
        "value_template", "device_class", "state_class", "unit_of_measurement",
        "expire_after", "force_update", "last_reset_value_template",
        "suggested_display_precision",
    },
    "event": {"value_template", "event_types", "device_class"},
    "text": {
        "command_template", "value_template", "min", "max", "mode", "pattern",
        "optimistic", "retain",
    },
}  # fmt: skip
#: Keys a component of that platform must have (itself or from the device level).
PLATFORM_REQUIRED = {
    "sensor": {"state_topic"},
    "event": {"state_topic", "event_types"},
    "text": {"command_topic"},
}
_TOPIC_LEVEL = re.compile(r"^[^+#]*$")


def check_documented(topic: str, cfg: dict[str, Any]) -> list[str]:
    """Field-by-field check of one device-based discovery payload; returns the problems."""
    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(f"{topic}: {what}")

    m = re.fullmatch(r"homeassistant/device/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config", topic)
    need(m is not None, "discovery topic is not <prefix>/device/<node_id>/<object_id>/config")
    need(set(cfg) <= DEVICE_LEVEL, f"unknown top-level keys {set(cfg) - DEVICE_LEVEL}")
    dev = cfg.get("dev") or cfg.get("device")
    need(isinstance(dev, dict), "dev is required")
    if isinstance(dev, dict):
        need(set(dev) <= DEVICE_KEYS, f"unknown device keys {set(dev) - DEVICE_KEYS}")
        ids = dev.get("identifiers")
        need(isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids),
             "device identifiers: a non-empty list of strings")  # fmt: skip
        need(isinstance(dev.get("name"), str) and dev["name"] != "", "device name")
    origin = cfg.get("o") or cfg.get("origin")
    need(isinstance(origin, dict) and isinstance(origin.get("name"), str), "o.name is required")
    if isinstance(origin, dict):
        need(set(origin) <= ORIGIN_KEYS, f"unknown origin keys {set(origin) - ORIGIN_KEYS}")
    need(cfg.get("qos") in (None, 0, 1, 2), "qos")
    cmps = cfg.get("cmps") or cfg.get("components")
    need(isinstance(cmps, dict) and len(cmps) > 0, "cmps: a non-empty object")
    for cid, comp in (cmps or {}).items():
        where = f"component {cid}"
        need(re.fullmatch(r"[A-Za-z0-9_-]+", cid) is not None, f"{where}: id characters")
        platform = comp.get("p") or comp.get("platform")
        need(platform in PLATFORM_KEYS, f"{where}: platform {platform!r}")
        if platform not in PLATFORM_KEYS:
            continue
        allowed = ENTITY_KEYS | PLATFORM_KEYS[platform]
        need(set(comp) <= allowed, f"{where}: unknown keys {set(comp) - allowed}")
        merged = {**{k: v for k, v in cfg.items() if k in SHARED}, **comp}
        for key in PLATFORM_REQUIRED[platform]:
            need(key in merged, f"{where}: {key} is required")
        need(isinstance(comp.get("unique_id"), str), f"{where}: unique_id")
        for key, value in merged.items():
            if key.endswith("_topic"):
                need(isinstance(value, str) and value != "" and "//" not in value,
                     f"{where}: {key} {value!r}")  # fmt: skip
                if key == "command_topic":
                    need(_TOPIC_LEVEL.match(value) is not None, f"{where}: wildcard in {key}")
        if platform == "text":
            mx, mn = comp.get("max", 255), comp.get("min", 0)
            need(isinstance(mx, int) and 0 <= mx <= 255, f"{where}: max must be <= 255")
            need(isinstance(mn, int) and 0 <= mn <= mx, f"{where}: min <= max")
        if platform == "event":
            types = comp.get("event_types")
            need(isinstance(types, list) and len(types) > 0, f"{where}: event_types")
    return problems


# --- Home Assistant's own schemas, when a Python with homeassistant is at hand ------------

_HA_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, tempfile
    from homeassistant.components.mqtt import abbreviations as ab
    from homeassistant.components.mqtt import event, sensor, text
    from homeassistant.const import __version__
    try:  # device-based discovery (HA 2024.12 and later)
        from homeassistant.components.mqtt.schemas import DEVICE_DISCOVERY_SCHEMA
    except ImportError:
        DEVICE_DISCOVERY_SCHEMA = None
    try:
        from homeassistant.components.mqtt.schemas import (
            MQTT_ENTITY_DEVICE_INFO_SCHEMA, MQTT_ORIGIN_INFO_SCHEMA)
    except ImportError:
        from homeassistant.components.mqtt.mixins import (
            MQTT_ENTITY_DEVICE_INFO_SCHEMA, MQTT_ORIGIN_INFO_SCHEMA)
    from homeassistant.core import HomeAssistant
    from homeassistant.helpers.template import Template

    SCHEMAS = {"sensor": sensor.DISCOVERY_SCHEMA, "text": text.DISCOVERY_SCHEMA,
               "event": event.DISCOVERY_SCHEMA}
    SHARED = ["availability", "availability_mode", "availability_template",
              "availability_topic", "command_topic", "payload_available",
              "payload_not_available", "state_topic"]
    ABBR = dict(ab.ABBREVIATIONS)
    ABBR.setdefault("cmps", "components")
    ABBR.setdefault("p", "platform")

    def expand(d, table):
        return {table.get(k, k): v for k, v in d.items()}

    async def main():
        data = json.load(sys.stdin)
        hass = HomeAssistant(tempfile.mkdtemp())
        out = {"version": __version__, "device_schema": DEVICE_DISCOVERY_SCHEMA is not None,
               "components": 0, "rendered": []}
        for topic, cfg in data["configs"]:
            cfg = expand(cfg, ABBR)
            cfg["device"] = expand(cfg["device"], ab.DEVICE_ABBREVIATIONS)
            cfg["origin"] = expand(cfg["origin"], ab.ORIGIN_ABBREVIATIONS)
            cfg["components"] = {k: expand(v, ABBR) for k, v in cfg["components"].items()}
            if DEVICE_DISCOVERY_SCHEMA is not None:
                DEVICE_DISCOVERY_SCHEMA(json.loads(json.dumps(cfg)))
            else:
                for key in ("device", "components", "origin"):
                    assert key in cfg, f"{topic}: {key} is required"
            MQTT_ENTITY_DEVICE_INFO_SCHEMA(cfg["device"])
            MQTT_ORIGIN_INFO_SCHEMA(cfg["origin"])
            for cid, comp in cfg["components"].items():
                comp = dict(comp)
                platform = comp.pop("platform")
                comp["device"], comp["origin"] = cfg["device"], cfg["origin"]
                for opt in SHARED:
                    if opt in cfg and opt not in comp:
                        comp[opt] = cfg[opt]
                valid = SCHEMAS[platform](comp)
                dropped = set(comp) - set(valid)
                assert not dropped, f"{topic} {cid}: HA drops unknown keys {dropped}"
                out["components"] += 1
                tpl = comp.get("value_template")
                for sample in data["samples"].get(comp.get("state_topic"), []) if tpl else []:
                    value = Template(tpl, hass).async_render_with_possible_json_value(
                        sample, "<template error>")
                    out["rendered"].append([topic, cid, str(value)])
        await hass.async_stop(force=True)
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def ha_python() -> str | None:
    """A Python with `homeassistant` installed: HA_PYTHON, or this one."""
    if os.environ.get("HA_PYTHON"):
        return os.environ["HA_PYTHON"]
    try:
        import homeassistant  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def validate_with_home_assistant(
    configs: list[tuple[str, dict[str, Any]]], samples: dict[str, list[str]]
) -> dict[str, Any] | None:
    """HA's verdict and rendered templates, or None when no HA is at hand."""
    python = ha_python()
    if python is None:
        return None
    proc = subprocess.run(
        [python, "-c", _HA_SCRIPT],
        input=json.dumps({"configs": configs, "samples": samples}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- helpers --------------------------------------------------------------------------------


def configs(w: Watcher) -> dict[str, Msg]:
    """The last config per discovery topic."""
    out: dict[str, Msg] = {}
    for m in w.msgs:
        if m.topic.startswith(PREFIX + "/"):
            out[m.topic] = m
    return out


def wait_config(w: Watcher, device: str, timeout: float = 10.0) -> dict[str, Any]:
    topic = f"{PREFIX}/{device}/config"
    return w.wait_for(lambda m: m.topic == topic and m.payload != b"", timeout).json  # type: ignore[no-any-return]


# --- the tests ------------------------------------------------------------------------------


def test_discovery_payloads(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    """Configured devices, a device seen, and the bridge: each one retained config whose
    fields are what HA documents, pointing at the topics the bridge really publishes."""
    w = Watcher(own_broker, ["homeassistant/#", "llm/+/state", "llm/bridge/stats"])
    try:
        own_bridge(BRIDGE_DEVICES="kitchen, hall")
        kitchen = wait_config(w, "kitchen")
        wait_config(w, "hall")
        bridge_cfg = wait_config(w, "bridge")
        seen = own_device()
        long_prompt = "tell me everything " * 30  # the echo reply is longer than 255
        reply = seen.ask({"id": "d1", "prompt": long_prompt})
        assert len(reply.text) > 300
        seen_cfg = wait_config(w, seen.id)
        # A device's first state comes after its discovery config.
        order = [m.topic for m in w.msgs if m.topic.endswith(f"/{seen.id}/config")
                 or m.topic == f"llm/{seen.id}/state"]  # fmt: skip
        assert order[0] == f"{PREFIX}/{seen.id}/config", order

        for device, cfg in (("kitchen", kitchen), (seen.id, seen_cfg)):
            assert cfg["dev"]["identifiers"] == [f"llm_{device}"]
            assert cfg["dev"]["via_device"] == "llm_bridge"
            assert cfg["availability_topic"] == STATUS
            cmps = cfg["cmps"]
            assert {c["p"] for c in cmps.values()} == {"sensor", "event", "text"}
            assert cmps["status"]["state_topic"] == f"llm/{device}/state"
            assert cmps["reply"]["json_attributes_topic"] == f"llm/{device}/state"
            assert cmps["event"]["state_topic"] == f"llm/{device}/event"
            assert cmps["event"]["event_types"] == ["reply_complete", "error"]
            assert cmps["ask"]["command_topic"] == f"llm/{device}/ask"
            assert cmps["ask"]["max"] <= 255
        assert bridge_cfg["state_topic"] == "llm/bridge/stats"
        assert {"requests", "tokens_today", "errors"} <= set(bridge_cfg["cmps"])
        # Every entity has its own unique id.
        uids = [c["unique_id"] for cfg in (kitchen, seen_cfg, bridge_cfg)
                for c in cfg["cmps"].values()]  # fmt: skip
        assert len(uids) == len(set(uids))

        all_cfgs = [(t, m.json) for t, m in configs(w).items() if m.payload]
        problems = [p for t, c in all_cfgs for p in check_documented(t, c)]
        assert problems == []
        # Retained: Home Assistant, starting later, gets them all.
        for device in ("kitchen", "hall", "bridge", seen.id):
            assert retained(own_broker, f"{PREFIX}/{device}/config")

        # Home Assistant's own schemas and template engine, when available.
        samples: dict[str, list[str]] = {}
        for m in w.msgs:
            if m.topic.endswith("/state") or m.topic.endswith("/stats"):
                samples.setdefault(m.topic, []).append(m.payload.decode())
        w.wait_for(lambda m: m.topic == "llm/bridge/stats" and m.json["requests"] >= 1)
        samples["llm/bridge/stats"] = [
            m.payload.decode() for m in w.msgs if m.topic == "llm/bridge/stats"
        ]
        wanted = [(t, c) for t, c in all_cfgs if t.split("/")[3] in ("bridge", seen.id)]
        result = validate_with_home_assistant(wanted, samples)
        if result is None:
            return  # test_home_assistant_schemas says so (skipped)
        assert result["components"] == 4 + 4
        rendered = {(cid, v) for t, cid, v in result["rendered"] if f"/{seen.id}/" in t}
        replies = [v for cid, v in rendered if cid == "reply"]
        assert reply.text[:255] in replies  # the state: the reply cut to HA's 255
        assert all(len(v) <= 255 for _, _, v in result["rendered"])
        assert ("status", "idle") in rendered
        counters = {cid: v for t, cid, v in result["rendered"] if t.endswith("/bridge/config")}
        assert int(counters["requests"]) >= 1 and "<template error>" not in counters.values()
    finally:
        w.close()


def test_text_entity_asks_the_device_llm(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    """HA's text entity publishes plain text on P/D/ask; the reply lands in D's state and
    event (and on P/D/res/ha-..., which the device may show)."""
    own_bridge()
    dev = own_device()
    w = Watcher(own_broker, [f"llm/{dev.id}/state", f"llm/{dev.id}/event", f"{PREFIX}/#"])
    try:
        w.publish(f"llm/{dev.id}/ask", "What is the capital of France?")
        ev = w.wait_for(lambda m: m.topic.endswith("/event")).json
        assert ev["event_type"] == "reply_complete"
        assert ev["text"] == "You said: What is the capital of France?."
        assert ev["request_id"].startswith("ha-")
        state = w.wait_for(lambda m: m.topic.endswith("/state") and m.json["status"] == "idle")
        assert state.json["question"] == "What is the capital of France?"
        assert state.json["reply"] == ev["text"]
        wait_config(w, dev.id)  # a device first met through HA is discovered too
        got = dev.wait(ev["request_id"])
        assert got.text == ev["text"]
        # A JSON object is a whole request (here: unstreamed, with its own id).
        w.publish(f"llm/{dev.id}/ask", json.dumps({"id": "j1", "prompt": "hi", "stream": False}))
        assert dev.wait("j1").terminal["text"] == "You said: hi."
        # A device cannot use the text entity's topic (only integrations may).
        dev.client.publish(f"llm/{dev.id}/ask", "sneaky", qos=1).wait_for_publish(5)
        time.sleep(0.3)
        assert not any(b"sneaky" in m.payload for m in w.msgs)
    finally:
        w.close()


def test_birth_message_republishes_discovery(own_broker: Broker, own_bridge: StartBridge) -> None:
    w = Watcher(own_broker, [f"{PREFIX}/#"])
    try:
        own_bridge(BRIDGE_DEVICES="porch")
        wait_config(w, "porch")
        live = lambda: [m for m in w.msgs if not m.retain and m.topic.endswith("/porch/config")]  # noqa: E731
        w.wait_for(lambda m: not m.retain and m.topic.endswith("/bridge/config"))
        time.sleep(0.2)  # the startup publish is done
        before = len(live())
        w.publish("homeassistant/status", "offline")
        time.sleep(0.3)
        assert len(live()) == before  # HA's last will is not a birth
        w.publish("homeassistant/status", "online")
        w.wait_for(lambda m: not m.retain and m.topic.endswith("/porch/config")
                   and len(live()) > before)  # fmt: skip
        w.wait_for(lambda m: not m.retain and m.topic.endswith("/bridge/config"))
        assert live()[-1].json == w.on(f"{PREFIX}/porch/config")[0].json
    finally:
        w.close()


def test_removed_devices_lose_their_discovery(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    """HA's "Delete" (an empty retained config) makes the bridge forget the device and its
    state; at start, a config of ours for a device it no longer knows is removed."""
    client_id = f"bridge-ha-{os.urandom(3).hex()}"
    ha = Watcher(own_broker, [f"{PREFIX}/#", "llm/+/state"])
    try:
        # A device that was configured and is not any more, and never asked.
        ha.publish(f"{PREFIX}/ghost/config", json.dumps({"dev": {}, "o": {}, "cmps": {}}),
                   retain=True)  # fmt: skip
        proc = own_bridge(BRIDGE_CLIENT_ID=client_id)
        ha.wait_for(lambda m: m.topic == f"{PREFIX}/ghost/config" and m.payload == b"")
        assert retained(own_broker, f"{PREFIX}/ghost/config", timeout=0.5) is None

        dev = own_device()
        dev.ask({"id": "r1", "prompt": "remember me"})
        wait_config(ha, dev.id)
        assert retained(own_broker, f"llm/{dev.id}/state")
        # The user deletes the device in Home Assistant.
        ha.publish(f"{PREFIX}/{dev.id}/config", b"", retain=True)
        ha.wait_for(lambda m: m.topic == f"llm/{dev.id}/state" and m.payload == b"")
        assert retained(own_broker, f"llm/{dev.id}/state", timeout=0.5) is None
        # It stays removed after a restart and a birth message...
        bridge_cfgs = lambda: len(ha.on(f"{PREFIX}/bridge/config"))  # noqa: E731
        n = bridge_cfgs()
        proc.stop()
        own_bridge(BRIDGE_CLIENT_ID=client_id)
        ha.wait_for(lambda m: bridge_cfgs() > n)  # the new bridge's discovery
        n = bridge_cfgs()
        ha.publish("homeassistant/status", "online")
        ha.wait_for(lambda m: bridge_cfgs() > n)  # and again for the birth
        assert retained(own_broker, f"{PREFIX}/{dev.id}/config", timeout=0.5) is None
        # ...until it asks again.
        dev.ask({"id": "r2", "prompt": "back"})
        wait_config(ha, dev.id)
    finally:
        ha.close()


def test_discovery_off(
    own_broker: Broker, own_bridge: StartBridge, own_device: Callable[..., Device]
) -> None:
    w = Watcher(own_broker, ["homeassistant/#"])
    try:
        own_bridge(BRIDGE_HA_DISCOVERY="false", BRIDGE_DEVICES="attic")
        dev = own_device()
        dev.ask({"id": "f1", "prompt": "no HA"})
        w.publish("homeassistant/status", "online")
        time.sleep(0.8)
        live = [m.topic for m in w.msgs if not m.retain and m.topic != "homeassistant/status"]
        assert live == []
        assert retained(own_broker, f"llm/{dev.id}/state")  # state stays on
    finally:
        w.close()


def test_home_assistant_schemas() -> None:
    """The payloads as the plugin builds them, through Home Assistant's own schemas (the test
    above does the same with the payloads a running bridge published)."""
    if ha_python() is None:
        pytest.skip("no Python with homeassistant: set HA_PYTHON (docs/integrations/README.md)")
    from bridge.core.settings import Settings
    from bridge.plugins.homeassistant import HomeAssistantPlugin
    from bridge.plugins.state import StatePlugin

    settings = Settings(_env_file=None, topic_prefix="home/llm")  # type: ignore[call-arg]
    ha = HomeAssistantPlugin(settings, StatePlugin(settings))
    payloads = [
        (ha.config_topic("kitchen"), ha.device_config("kitchen")),
        (ha.bridge_config_topic, ha.bridge_config()),
    ]
    assert [p for t, c in payloads for p in check_documented(t, c)] == []
    state = json.dumps({"status": "idle", "reply": None, "refusal": "no"})
    result = validate_with_home_assistant(payloads, {"home/llm/kitchen/state": [state]})
    assert result is not None and result["components"] == 8
    assert ["homeassistant/device/home_llm/kitchen/config", "reply", "no"] in result["rendered"]


def test_integration_examples_are_well_formed() -> None:
    """docs/integrations: the Node-RED flow imports (valid JSON, every wire and config
    reference resolves) and uses the protocol's topics; the HA automation is YAML that
    uses the entities discovery creates."""
    import yaml

    from tests.harness import REPO

    root = REPO / "docs" / "integrations"
    flow = json.loads((root / "node-red-flow.json").read_text())
    ids = {n["id"] for n in flow}
    assert len(ids) == len(flow)
    for node in flow:
        for outs in node.get("wires", []):
            assert set(outs) <= ids, node["id"]
        for ref in ("broker", "group", "tab", "z"):
            if ref in node and node["type"] != "mqtt-broker":  # there: the host name
                assert node[ref] in ids, (node["id"], ref)
    topics = {n["type"]: n["topic"] for n in flow if n["type"] in ("mqtt in", "mqtt out")}
    assert topics["mqtt out"] == "llm/kitchen/ask"
    assert {n["topic"] for n in flow if n["type"] == "mqtt in"} == {
        "llm/kitchen/res/+",
        "llm/kitchen/state",
    }
    auto = yaml.safe_load((root / "homeassistant-automation.yaml").read_text())
    text = json.dumps(auto)
    assert "text.kitchen_ask" in text and "event.kitchen_reply" in text
    assert auto["triggers"] and auto["actions"]
