"""The load generator: D devices, C concurrent streams, every reply checked and timed.

Why this shape: each device is its own paho client with its own broker user
(the project's ACL lets a device ask and read only as itself), and all of
them run in one thread on one `selectors` loop, the way paho's external-loop
API is meant to be used, instead of one thread per device. Each of the C
streams is a closed loop: when its reply's terminal arrives it asks again,
until the case's requests are done.

Run by `bench.cli` as `python -m bench.loadgen --spec FILE`: it connects and
subscribes every device, sends a few short warm-up requests, prints READY,
waits for GO on stdin, runs, writes its results to the spec's `out` file and
prints DONE. Times are `time.monotonic_ns()`, one clock for every process of
the machine, so they compare with the mock's stamps and other processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

HOST = "127.0.0.1"
_MISC_EVERY_NS = 1_000_000_000
_WARMUP_TOKENS = 5


@dataclass
class Request:
    """What one device saw of one request."""

    slot: int
    rid: str
    tokens: int
    sent_ns: int = 0
    first_ns: int = 0
    first_stamp_ns: int = 0  # the mock's stamp on the first token: splits TTFC in two
    end_ns: int = 0
    chunks: int = 0
    got_tokens: int = 0
    max_seq: int = -1
    seen: set[int] = field(default_factory=set)
    repeated: int = 0
    out_of_order: int = 0
    after_terminal: int = 0
    terminal_seq: int = -1
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.end_ns > 0

    def lost(self) -> int:
        """Chunks missing before the terminal, or tokens missing from the reply."""
        if not self.done:
            return max(self.tokens - self.got_tokens, 0)
        gaps = sum(1 for s in range(self.terminal_seq) if s not in self.seen)
        missing_tokens = 0 if self.error else max(self.tokens - self.got_tokens, 0)
        return max(gaps, missing_tokens)


class Device:
    """One paho client acting as one device, driven by the shared selector."""

    def __init__(self, gen: LoadGen, dev_id: str, password: str) -> None:
        self.gen = gen
        self.id = dev_id
        self.connected = False
        self.subscribed = False
        self.active: dict[str, Request] = {}
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-{dev_id}-{gen.tag}",
            protocol=paho.MQTTv311,
        )
        c.username_pw_set(dev_id, password)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._done_writing
        self.client = c
        self.res_prefix = f"{gen.prefix}/{dev_id}/res/"
        self.req_topic = f"{gen.prefix}/{dev_id}/req"

    # --- sockets on the shared selector -------------------------------------------------

    def _on_socket_open(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        # The device acks every QoS 1 chunk; a Nagle-delayed ack would stall the
        # broker's in-flight window and be counted against the system under test.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.gen.sel.register(sock, selectors.EVENT_READ, self)

    def _on_socket_close(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.gen.sel.unregister(sock)
        self.connected = False

    def _want_write(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        self.gen.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)

    def _done_writing(self, _c: Any, _u: Any, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.gen.sel.modify(sock, selectors.EVENT_READ, self)

    # --- MQTT ---------------------------------------------------------------------------

    def _on_connect(self, c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.gen.fail(f"device {self.id} refused by the broker: {reason}")
            return
        self.connected = True
        c.subscribe(self.res_prefix + "+", qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(rc.is_failure for rc in codes):
            self.gen.fail(f"device {self.id}: subscription refused")
            return
        self.subscribed = True

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic_ns()
        self.gen.last_rx_ns = now
        rid = msg.topic[len(self.res_prefix) :]
        req = self.active.get(rid)
        if req is None:
            self.gen.strays += 1
            return
        try:
            m = json.loads(msg.payload)
            seq = m["seq"]
        except (ValueError, KeyError, TypeError):
            self.gen.fail(f"unparseable reply on {msg.topic}: {msg.payload[:200]!r}")
            return
        if req.done:
            req.after_terminal += 1
            return
        if "delta" in m or "refusal" in m:
            if seq in req.seen:
                req.repeated += 1
                return
            if seq < req.max_seq:
                req.out_of_order += 1
            req.seen.add(seq)
            req.max_seq = max(req.max_seq, seq)
            req.chunks += 1
            if not req.first_ns:
                req.first_ns = now
            lat = self.gen.latencies_ns
            for stamp in m.get("delta", "").split():
                if stamp.isdigit():
                    if not req.first_stamp_ns:
                        req.first_stamp_ns = int(stamp)
                    req.got_tokens += 1
                    if self.gen.running:
                        lat.append(now - int(stamp))
            return
        req.end_ns = now
        req.terminal_seq = seq
        if seq < req.max_seq:
            req.out_of_order += 1
        if "error" in m:
            req.error = str(m["error"].get("code", "?"))
        elif "done" not in m:
            req.error = "bad_terminal"
        self.gen.finished(self, req)


class LoadGen:
    """All devices, the selector loop and the closed-loop request schedule."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.prefix: str = spec["prefix"]
        self.port: int = spec["port"]
        self.tag: str = spec["tag"]
        self.tokens: int = spec["tokens"]
        self.delay_ms: int = spec["delay_ms"]
        self.sel = selectors.DefaultSelector()
        self.devices = [Device(self, d, pw) for d, pw in spec["devices"]]
        self.latencies_ns: list[int] = []
        self.requests: list[Request] = []
        self.to_send: list[tuple[Device, Request]] = []
        self.left_per_slot: list[int] = []
        self.slot_dev: list[Device] = []
        self.open = 0
        self.strays = 0
        self.running = False
        self.error: str | None = None
        self.last_rx_ns = 0
        self.stall_ns = int(spec.get("stall_s", 20) * 1e9)
        self._n = 0

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    # --- the loop -----------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """One round: socket events, then the requests that became due."""
        for key, mask in self.sel.select(timeout):
            dev: Device = key.data
            c = dev.client
            if mask & selectors.EVENT_READ:
                rc = c.loop_read()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self.fail(f"device {dev.id} lost its connection: {paho.error_string(rc)}")
                    continue
            if mask & selectors.EVENT_WRITE:
                c.loop_write()
        if self.to_send:
            batch, self.to_send = self.to_send, []
            for dev, req in batch:
                self._publish(dev, req)

    def run_until(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last_misc = time.monotonic_ns()
        while not cond():
            if self.error:
                raise RuntimeError(self.error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not done after {timeout:g} s")
            self.pump(0.05)
            now = time.monotonic_ns()
            if self.open and now - self.last_rx_ns > self.stall_ns:
                raise TimeoutError(
                    f"{what}: nothing received for {self.stall_ns / 1e9:g} s"
                    f" with {self.open} requests open"
                )
            if now - last_misc > _MISC_EVERY_NS:
                last_misc = now
                for d in self.devices:
                    d.client.loop_misc()

    def connect(self, timeout: float) -> None:
        for d in self.devices:
            d.client.connect(HOST, self.port, keepalive=120)
            self.pump(0)
        self.run_until(lambda: all(d.subscribed for d in self.devices), timeout, "connect")

    # --- requests -----------------------------------------------------------------------

    def _new_request(self, slot: int, tokens: int) -> Request:
        self._n += 1
        return Request(slot=slot, rid=f"{self.tag}-{slot}-{self._n}", tokens=tokens)

    def _publish(self, dev: Device, req: Request) -> None:
        prompt = f"[mock tokens={req.tokens} delay_ms={self.delay_ms} stamp=1] bench"
        payload = json.dumps({"id": req.rid, "prompt": prompt}, separators=(",", ":"))
        dev.active[req.rid] = req
        self.open += 1
        req.sent_ns = time.monotonic_ns()
        info = dev.client.publish(dev.req_topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.fail(f"publish failed on {dev.req_topic}: {paho.error_string(info.rc)}")
        dev.client.loop_write()  # out now, not at the next select

    def finished(self, dev: Device, req: Request) -> None:
        self.open -= 1
        if not self.running:
            return
        self.requests.append(req)
        slot = req.slot
        if self.left_per_slot[slot] > 0:
            self.left_per_slot[slot] -= 1
            self.to_send.append((dev, self._new_request(slot, self.tokens)))

    def warm_up(self, count: int, timeout: float) -> None:
        """A few short requests first, so connections and caches are warm before timing."""
        for i in range(min(count, len(self.devices))):
            dev = self.devices[i]
            self._publish(dev, self._new_request(-1, _WARMUP_TOKENS))
        self.last_rx_ns = time.monotonic_ns()
        self.run_until(lambda: self.open == 0, timeout, "warm-up")
        for d in self.devices:
            d.active.clear()

    def run(self, streams: int, requests: int, timeout: float) -> None:
        """C streams, `requests` in all, each stream asking again when its reply ends."""
        per, extra = divmod(requests, streams)
        self.left_per_slot = [per + (1 if s < extra else 0) - 1 for s in range(streams)]
        self.slot_dev = [self.devices[s % len(self.devices)] for s in range(streams)]
        self.running = True
        self.last_rx_ns = time.monotonic_ns()
        for s in range(streams):
            if self.left_per_slot[s] >= 0:
                self._publish(self.slot_dev[s], self._new_request(s, self.tokens))
        self.run_until(lambda: self.open == 0 and not self.to_send, timeout, f"{requests} requests")
        self.running = False

    def result(self, timed_out: bool) -> dict[str, Any]:
        reqs = list(self.requests)
        for d in self.devices:
            reqs.extend(r for r in d.active.values() if not r.done and r.slot >= 0)
        return {
            "requests": len(reqs),
            "finished": sum(1 for r in reqs if r.done),
            "errors": sorted({r.error for r in reqs if r.error}),
            "error_count": sum(1 for r in reqs if r.error),
            "timed_out": timed_out,
            "first_sent_ns": min((r.sent_ns for r in reqs), default=0),
            "last_end_ns": max((r.end_ns for r in reqs), default=0),
            "chunks": sum(r.chunks for r in reqs),
            "tokens": sum(r.got_tokens for r in reqs),
            "expected_tokens": sum(r.tokens for r in reqs),
            "lost": sum(r.lost() for r in reqs),
            "repeated": sum(r.repeated + r.after_terminal for r in reqs),
            "out_of_order": sum(r.out_of_order for r in reqs),
            "strays": self.strays,
            "ttfc_ns": [r.first_ns - r.sent_ns for r in reqs if r.first_ns],
            # TTFC = up to the mock's first token (broker in, bridge start, API call)
            # + from that token to the device (bridge out, broker out)
            "ttfc_in_ns": [r.first_stamp_ns - r.sent_ns for r in reqs if r.first_stamp_ns],
            "ttfc_out_ns": [r.first_ns - r.first_stamp_ns for r in reqs if r.first_stamp_ns],
            "latency_ns": self.latencies_ns,
            "failure": self.error,
        }

    def close(self) -> None:
        for d in self.devices:
            d.client.disconnect()
        for _ in range(20):
            self.pump(0.01)
        self.sel.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    ap.add_argument("--spec", required=True, help="JSON file written by bench.cli")
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    gen = LoadGen(spec)
    timed_out = False
    try:
        gen.connect(spec["connect_timeout"])
        gen.warm_up(spec["warmup"], spec["connect_timeout"])
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            return 1
        try:
            gen.run(spec["streams"], spec["requests"], spec["timeout"])
        except TimeoutError as exc:
            gen.fail(str(exc))
            timed_out = True
        except RuntimeError:
            pass
    finally:
        with open(spec["out"], "w") as f:
            json.dump(gen.result(timed_out), f)
        print("DONE", flush=True)
        gen.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
