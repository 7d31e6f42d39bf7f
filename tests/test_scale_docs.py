"""docs/scaling/emqx (bridge workers on an EMQX cluster) and docs/scaling.md, checked by parsing.

No Docker engine or EMQX runs here: the compose file, EMQX's access rules and
users are held against each other, against broker/acl and against the
bridge's own settings.
"""

from __future__ import annotations

import csv
import re
from typing import Any

import yaml

from bridge.core.settings import MqttUrl, load_settings
from tests.harness import REPO

EMQX = REPO / "docs" / "scaling" / "emqx"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EMQX / "compose.yaml").read_text())
    return data["services"]


def test_emqx_nodes_form_one_static_cluster() -> None:
    services = _compose()
    nodes = {n: s for n, s in services.items() if n.startswith("emqx")}
    assert len(nodes) == 3
    names = []
    for s in nodes.values():
        env = s["environment"]
        assert env["EMQX_NODE__NAME"] == f"emqx@{s['hostname']}"
        names.append(env["EMQX_NODE__NAME"])
        seeds = re.findall(r"emqx@[\w.]+", env["EMQX_CLUSTER__STATIC__SEEDS"])
        assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "static"
        assert env["EMQX_MQTT__USE_USERNAME_AS_CLIENTID"] == "true"
        assert env["EMQX_ALLOW_ANONYMOUS"] == "false"
        assert env["EMQX_AUTHORIZATION__NO_MATCH"] == "deny"
        assert ("./emqx:/opt/emqx/etc/llm:ro") in s["volumes"]
        assert env["EMQX_AUTHORIZATION__SOURCES__1__PATH"].startswith("/opt/emqx/etc/llm/")
        assert env["EMQX_AUTHENTICATION__1__BOOTSTRAP_FILE"].startswith("/opt/emqx/etc/llm/")
    assert sorted(seeds) == sorted(names)


def test_emqx_bridge_workers_settings_load() -> None:
    services = _compose()
    bridge = services["bridge"]
    env = {
        k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in bridge["environment"].items()
    }
    settings = load_settings(
        None,
        mqtt_url=env["BRIDGE_MQTT_URL"],
        group=env["BRIDGE_GROUP"],
        state_url=env["BRIDGE_STATE_URL"],
        worker_slots=int(env["BRIDGE_WORKER_SLOTS"]),
    )
    url = MqttUrl.parse(settings.mqtt_url)
    hosts = {s.get("hostname") for s in services.values()}
    assert url.host in hosts, "the workers connect to a node of the cluster"
    assert settings.state_url.startswith("redis://redis:")
    assert "redis" in services and "redis" in bridge["depends_on"]
    users = list(csv.DictReader((EMQX / "emqx" / "bootstrap-users.csv").open()))
    by_name = {u["user_id"]: u["password"] for u in users}
    assert url.password is not None
    workers = [n for n in by_name if re.fullmatch(r"bridge(-\d+)?", n)]
    assert len(workers) >= 3
    for name in workers:  # worker i logs in as bridge-i with the first one's password
        assert by_name[name] == url.password.get_secret_value()


def _rules() -> list[tuple[str, str, str, list[str]]]:
    text = (EMQX / "emqx" / "acl.conf").read_text()
    out = []
    for m in re.finditer(r"^\{(allow|deny), (.+?)\}\.$", text, re.M):
        action, rest = m.group(1), m.group(2)
        if rest == "all":
            out.append((action, "all", "all", []))
            continue
        who, what, topics = re.fullmatch(r"(all|\{.+?\}\}?), (\w+), \[(.*)\]", rest).groups()  # type: ignore[union-attr]
        out.append((action, who, what, re.findall(r'"([^"]+)"', topics)))
    return out


def test_emqx_acl_grants_what_broker_acl_grants() -> None:
    rules = _rules()
    assert rules[-1] == ("deny", "all", "all", []), "everything not granted is denied"
    bridge_sub = {
        t for a, w, what, ts in rules if "bridge" in w and what == "subscribe" for t in ts
    }
    bridge_pub = {t for a, w, what, ts in rules if "bridge" in w and what == "publish" for t in ts}
    # Requests and questions through the shared subscription; cancels to every worker.
    assert {"$share/+/llm/+/req", "$share/+/llm/+/ask", "llm/+/cancel"} <= bridge_sub
    acl = (REPO / "broker" / "acl").read_text()
    block = acl.split("\nuser bridge\n", 1)[1].split("\n\n", 1)[0]
    for kind, topic in re.findall(r"^topic (read|write|readwrite) (\S+)", block, re.M):
        if "read" in kind:
            assert topic in bridge_sub, topic
        if "write" in kind:
            assert topic in bridge_pub, topic
    device_pub = {t for _a, w, what, ts in rules if w == "all" and what == "publish" for t in ts}
    device_sub = {t for _a, w, what, ts in rules if w == "all" and what == "subscribe" for t in ts}
    for kind, topic in re.findall(r"^pattern (read|write) (\S+)", acl, re.M):
        mine = topic.replace("%u", "${username}")
        assert mine in (device_sub if kind == "read" else device_pub), topic


def test_scaling_doc_names_what_exists() -> None:
    doc = (REPO / "docs" / "scaling.md").read_text()
    for path in re.findall(r"`((?:bridge|tests|broker|docs)/[\w./-]+)`", doc):
        assert (REPO / path).exists(), path
    assert "docs/scaling/emqx/compose.yaml" in doc
    for name in re.findall(r"`(BRIDGE_[A-Z_]+)", doc):
        if name.endswith("_"):
            continue
        field = name.removeprefix("BRIDGE_").lower()
        from bridge.core.settings import Settings

        assert field in Settings.model_fields or name.startswith("BRIDGE_MQTT_URL_"), name
