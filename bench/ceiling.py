"""The broker's ceiling: raw publish-to-subscriber messages per second through Mosquitto.

Why: a bridge can deliver no faster than the broker moves messages with the
client library it uses, so our chunks/s are also shown as a share of this,
measured in the same run with the same library (paho), QoS, payload size and
topic shape as real replies. One publisher process, one subscriber process.

`python -m bench.ceiling sub --spec FILE` subscribes, prints READY, counts
`count` messages and writes its times to the spec's `sub_out`;
`python -m bench.ceiling pub --spec FILE` publishes them with a window of
QoS 1 messages in flight (the bridge's own setting) and writes `pub_out`.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

HOST = "127.0.0.1"


def _client(spec: dict[str, Any], role: str) -> paho.Client:
    user, password = spec[f"{role}_user"]
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-ceiling-{role}-{spec['tag']}",
        protocol=paho.MQTTv311,
    )
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(spec["window"])
    return c


def _nodelay(c: paho.Client) -> None:
    sock = c.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _step(c: paho.Client, timeout: float) -> None:
    """One select round on the client's socket (paho's external-loop API)."""
    sock = c.socket()
    if sock is None:
        raise ConnectionError("connection lost")
    r, w, _ = select.select([sock], [sock] if c.want_write() else [], [], timeout)
    if r and c.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise ConnectionError("connection lost while reading")
    if w and c.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise ConnectionError("connection lost while writing")


def _wait(c: paho.Client, cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"ceiling {what}: not done after {timeout:g} s")
        _step(c, 0.05)


def subscriber(spec: dict[str, Any]) -> dict[str, Any]:
    state = {"count": 0, "first": 0, "last": 0, "subscribed": False}
    want = spec["count"]

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic_ns()
        json.loads(msg.payload)  # a device parses every chunk; so does this one
        if not state["first"]:
            state["first"] = now
        state["last"] = now
        state["count"] += 1

    c = _client(spec, "sub")
    c.on_message = on_message
    c.on_connect = lambda cl, *_a: cl.subscribe(spec["filter"], qos=spec["qos"])
    c.on_subscribe = lambda *_a: state.__setitem__("subscribed", True)
    c.connect(HOST, spec["port"], keepalive=120)
    _nodelay(c)
    _wait(c, lambda: state["subscribed"], 10, "subscribe")
    print("READY", flush=True)
    _wait(c, lambda: state["count"] >= want, spec["timeout"], f"receive {want}")
    c.disconnect()
    return {"count": state["count"], "first_ns": state["first"], "last_ns": state["last"]}


def publisher(spec: dict[str, Any]) -> dict[str, Any]:
    state = {"acked": 0, "connected": False}
    c = _client(spec, "pub")
    c.on_connect = lambda *_a: state.__setitem__("connected", True)
    c.on_publish = lambda *_a: state.__setitem__("acked", state["acked"] + 1)
    c.connect(HOST, spec["port"], keepalive=120)
    _nodelay(c)
    _wait(c, lambda: state["connected"], 10, "connect")
    count, window, qos, topics = spec["count"], spec["window"], spec["qos"], spec["topics"]
    names = [spec["topic_format"].format(i=i) for i in range(topics)]
    deadline = time.monotonic() + spec["timeout"]
    first = time.monotonic_ns()
    sent = 0
    while sent < count:
        if time.monotonic() > deadline:
            raise TimeoutError("ceiling publisher: too slow")
        room = window - (sent - state["acked"]) if qos else 256
        for _ in range(min(room, count - sent)):
            payload = b'{"seq":%d,"delta":"%d "}' % (sent // topics, time.monotonic_ns())
            info = c.publish(names[sent % topics], payload, qos=qos)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
            sent += 1
        _step(c, 0 if room > 0 else 0.01)
    if qos:
        _wait(c, lambda: state["acked"] >= count, spec["timeout"], "acks")
    c.disconnect()
    return {"count": sent, "first_ns": first, "last_ns": time.monotonic_ns()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    ap.add_argument("role", choices=["pub", "sub"])
    ap.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    result = subscriber(spec) if args.role == "sub" else publisher(spec)
    with open(spec[f"{args.role}_out"], "w") as f:
        json.dump(result, f)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
