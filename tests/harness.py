"""Real parts for the tests: Mosquitto with the project's broker/ files, the bridge as a
process, and a device that checks every reply against protocol v1."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.ops.brokerconf import acl_text, extra_user_kind, render_config
from bridge.ops.passwords import password_line

REPO = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-DO-NOT-LEAK-4f9a7c2e1b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("mosquitto is not installed (the README's test command installs it)")


class Broker:
    """A Mosquitto process on a free loopback port, with broker/'s config, ACL and users."""

    def __init__(self, workdir: Path, prefix: str = "llm", acl_prefix: str = "+") -> None:
        """`acl_prefix` "+" renders broker/acl for any prefix (tests give each bridge its own);
        the rules per device (%u) are the file's own."""
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        self.port = free_port()
        self.prefix = prefix
        self.users: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.acl_prefix = acl_prefix
        self._write_acl()
        self.add_user("bridge", "bridge-pw", reload=False)
        self.add_user("integrations", "integrations-pw", reload=False)
        self.add_user("automation", "automation-pw", reload=False)
        self.add_user("healthcheck", "healthcheck-pw", reload=False)

    def _write_acl(self) -> None:
        """broker/acl, with a block for each further service user (`bridge-NAME`, ...) of
        the password file (as `llm-bridge broker user add` writes it)."""
        path = self.dir / "passwd"
        lines = path.read_text().splitlines() if path.exists() else []
        names = [x.partition(":")[0] for x in lines]
        extra = [u for u in names if extra_user_kind(u)]
        (self.dir / "acl").write_text(acl_text(self.acl_prefix, users=extra))

    @property
    def log_file(self) -> Path:
        return self.dir / "mosquitto.log"

    def url(self, user: str) -> str:
        return f"mqtt://{user}:{self.users[user]}@127.0.0.1:{self.port}"

    def start(self) -> Broker:
        conf = render_config(
            config_dir=self.dir, data_dir=self.dir / "data", ports={1883: self.port},
            log_file=self.log_file, run_as=getpass.getuser() if os.geteuid() == 0 else None,
        )  # fmt: skip
        (self.dir / "mosquitto.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise RuntimeError(f"mosquitto did not start: {err.decode()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def add_user(self, name: str, password: str | None = None, *, reload: bool = True) -> str:
        """Add a broker user (a device's user name is its id) and make Mosquitto read it."""
        password = password or f"pw-{name}"
        self.users[name] = password
        path = self.dir / "passwd"
        # Users that `llm-bridge device add` (a test of the CLI) wrote are kept.
        kept = [
            line + "\n"
            for line in (path.read_text().splitlines() if path.exists() else [])
            if line.partition(":")[0] not in self.users
        ]
        lines = "".join(kept) + "".join(password_line(u, pw) for u, pw in self.users.items())
        path.write_text(lines)
        path.chmod(0o600)
        if extra_user_kind(name):
            self._write_acl()
        if reload and self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while not self.can_connect(name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mosquitto did not accept the new user {name}")
                time.sleep(0.02)
        return password

    def can_connect(self, user: str, password: str | None = None) -> bool:
        # Careful: the broker makes the client id the user name, so this replaces
        # (and wipes the clean session of) any connection `user` has.
        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        c.username_pw_set(user, self.users.get(user) if password is None else password)
        result: list[int] = []
        c.on_connect = lambda *a: result.append(a[3].value)
        try:
            c.connect("127.0.0.1", self.port)
        except OSError:
            return False
        deadline = time.monotonic() + 2
        while not result and time.monotonic() < deadline:
            c.loop(0.05)
        c.disconnect()
        return result == [0]

    def takeovers(self) -> list[str]:
        """Log lines of a client replaced by a new connection with its client id."""
        if not self.log_file.exists():
            return []
        text = self.log_file.read_text(errors="replace")
        return [line for line in text.splitlines() if "already connected" in line]


class BridgeProcess:
    """`python -m bridge run` as it runs in production, configured by environment."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.prefix = env.get("BRIDGE_TOPIC_PREFIX", "llm")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "bridge.log"
        self._log = None

    def start(self) -> BridgeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run"],
            cwd=self.dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        if self._log:
            self._log.close()
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class Reply:
    """Everything a device saw for one request, checked against protocol v1."""

    rid: str
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> dict[str, Any]:
        return self.messages[-1]

    @property
    def text(self) -> str:
        return "".join(m.get("delta", "") for m in self.messages)

    @property
    def refusal(self) -> str:
        return "".join(m.get("refusal", "") for m in self.messages)

    @property
    def error_code(self) -> str | None:
        err = self.terminal.get("error")
        return err["code"] if err else None

    def check(self) -> Reply:
        """seq counts from 0 with no gap; exactly one terminal, and it is last."""
        seqs = [m.get("seq") for m in self.messages]
        assert seqs == list(range(len(seqs))), f"{self.rid}: seq {seqs}"
        terminals = [i for i, m in enumerate(self.messages) if "done" in m or "error" in m]
        assert terminals == [len(self.messages) - 1], f"{self.rid}: terminals at {terminals}"
        for m in self.messages[:-1]:
            assert set(m) in ({"seq", "delta"}, {"seq", "refusal"}), m
        return self


class Device:
    """A test device: a paho client that asks and collects replies per request id."""

    def __init__(
        self,
        broker: Broker,
        device_id: str,
        prefix: str = "llm",
        *,
        subscribe: bool = True,
        persistent: bool = False,
        user: str | None = None,
    ) -> None:
        """`persistent`: a session the broker keeps (clean session off, fixed client id)
        and a quick reconnect, so that the device rides out a broker restart; it
        counts its connections in `connects`. `user`: watch the device's replies as
        another user (e.g. `integrations-watch`) while the device itself is connected:
        a second login as the device would replace the device's connection."""
        self.id = device_id
        self.prefix = prefix
        user = user or device_id
        if user not in broker.users:
            broker.add_user(user)
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.raw: list[tuple[str, bytes]] = []
        self.connects = 0
        self._cond = threading.Condition()
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,  # as the device library does (the broker makes it so anyway)
            clean_session=not persistent,
        )
        if persistent:
            c.reconnect_delay_set(1, 2)
        c.username_pw_set(user, broker.users[user])
        c.on_message = self._on_message
        # Without it each request waits ~40 ms behind the PUBACKs this client sends
        # (Nagle's algorithm meeting delayed ACKs), as any device's would.
        c.on_socket_open = lambda _c, _u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready = threading.Event()

        def on_connect(*_a: Any) -> None:
            self.connects += 1
            ready.set()

        c.on_connect = on_connect
        c.on_subscribe = lambda *a: ready.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert ready.wait(5), "device could not connect"
        if subscribe:
            ready.clear()
            c.subscribe(f"{prefix}/{device_id}/res/+", qos=1)
            assert ready.wait(5), "device could not subscribe"
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        rid = msg.topic.rsplit("/", 1)[-1]
        with self._cond:
            self.raw.append((msg.topic, msg.payload))
            try:
                self.replies[rid].append(json.loads(msg.payload))
            except ValueError:
                self.replies[rid].append({"unparseable": msg.payload.decode("latin-1")})
            self._cond.notify_all()

    def send(self, payload: dict[str, Any] | bytes | str, topic: str | None = None) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        info = self.client.publish(topic or f"{self.prefix}/{self.id}/req", data, qos=1)
        info.wait_for_publish(5)

    def cancel(self, rid: str) -> None:
        self.client.publish(f"{self.prefix}/{self.id}/cancel", json.dumps({"id": rid}), qos=1)

    def wait(self, rid: str, timeout: float = 15.0) -> Reply:
        """Wait for request `rid`'s terminal and return its checked reply."""
        return Reply(rid, self.wait_raw(rid, timeout)).check()

    def wait_raw(self, rid: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait for request `rid`'s first terminal; return what came, unchecked."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any("done" in m or "error" in m for m in self.replies.get(rid, [])):
                left = deadline - time.monotonic()
                if left <= 0:
                    got = self.replies.get(rid, [])
                    raise TimeoutError(f"no terminal for {rid} in {timeout} s; got {got[-3:]}")
                self._cond.wait(left)
            return list(self.replies[rid])

    def messages(self, rid: str) -> list[dict[str, Any]]:
        """What came for `rid` so far, unchecked."""
        with self._cond:
            return list(self.replies.get(rid, []))

    def ask(self, payload: dict[str, Any], timeout: float = 15.0) -> Reply:
        self.send(payload)
        return self.wait(payload["id"], timeout)

    def wait_any(self, timeout: float = 10.0) -> tuple[str, Reply]:
        """Wait for the first terminal on any request id (for requests sent without one)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rid, msgs in self.replies.items():
                    if any("done" in m or "error" in m for m in msgs):
                        return rid, Reply(rid, list(msgs)).check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no terminal on any request")
                self._cond.wait(left)

    def quiet_after(self, rid: str, seconds: float = 0.3) -> Reply:
        """Wait a little and check that nothing more came for `rid` after its terminal."""
        time.sleep(seconds)
        with self._cond:
            return Reply(rid, list(self.replies[rid])).check()

    def close(self) -> None:
        # Wait until the broker has the DISCONNECT: the next login as this user (its client
        # id) must not find this connection still open and replace it.
        gone = threading.Event()
        self.client.on_disconnect = lambda *_a: gone.set()
        self.client.disconnect()
        gone.wait(2)
        self.client.loop_stop()


def wait_for_status(broker: Broker, prefix: str, expected: str, timeout: float = 15.0) -> None:
    """Wait until the retained `P/bridge/status` says `expected`.

    As the `healthcheck` user (every user may read the status), so that it
    replaces no connection a test holds as `integrations`."""
    got: list[bytes] = []
    ev = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2)
    c.username_pw_set("healthcheck", broker.users["healthcheck"])

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        got.append(msg.payload)
        if msg.payload == expected.encode():
            ev.set()

    c.on_message = on_message
    c.on_connect = lambda *a: c.subscribe(f"{prefix}/bridge/status", qos=1)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        if not ev.wait(timeout):
            raise TimeoutError(f"bridge status never became {expected!r}; saw {got}")
    finally:
        c.disconnect()  # first: it wakes paho's loop; loop_stop() alone waits up to 1 s
        c.loop_stop()


def bridge_user(client_id: str) -> str:
    """The bridge worker user for a test bridge's client id (`bridge-NAME`).

    The broker makes the client id the user name, so each bridge a test runs
    needs its own user (with the bridge's rules): bridges sharing one would
    replace each other's connection. The same client id gives the same user,
    so a restarted bridge finds its session again.
    """
    return client_id if extra_user_kind(client_id) == "bridge" else f"bridge-{client_id}"


def bridge_env(broker: Broker, base_url: str, **extra: str | int | float) -> dict[str, str]:
    """A bridge's environment; it logs in as `bridge_user(BRIDGE_CLIENT_ID)` unless
    `BRIDGE_MQTT_URL` is given."""
    client_id = str(extra.get("BRIDGE_CLIENT_ID") or f"bridge-{free_port()}")
    url = extra.get("BRIDGE_MQTT_URL")
    if url is None:
        user = bridge_user(client_id)
        if user not in broker.users:
            broker.add_user(user)
        url = broker.url(user)
    env = {
        "OPENAI_BASE_URL": base_url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_MODEL": "mock-1",
        "BRIDGE_MQTT_URL": str(url),
        "BRIDGE_TOPIC_PREFIX": broker.prefix,
        "BRIDGE_CLIENT_ID": client_id,
        "BRIDGE_UPSTREAM_READ_TIMEOUT": "2",
        "BRIDGE_UPSTREAM_RETRY_BASE": "0.05",
        "BRIDGE_LOG_LEVEL": "DEBUG",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def rss_kb(pid: int) -> int:
    """A process's resident set size (VmRSS) in kB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- more test clients: a watcher of many topics, an MQTT v5 device ---------------------------


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool
    props: Any = None

    @property
    def json(self) -> Any:
        return json.loads(self.payload)


class Watcher:
    """An MQTT v5 client that records every message it may read, in order."""

    def __init__(self, broker: Broker, filters: list[str], user: str = "automation") -> None:
        self.msgs: list[Msg] = []
        self._cond = threading.Condition()
        ready = threading.Event()
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"w-{user}-{os.urandom(3).hex()}",
            protocol=paho.MQTTv5,
        )
        c.username_pw_set(user, broker.users[user])
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: ready.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.subscribe([(f, 1) for f in filters])
        assert ready.wait(5), "watcher could not subscribe"
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            props = getattr(msg, "properties", None)
            self.msgs.append(Msg(msg.topic, bytes(msg.payload), bool(msg.retain), props))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Msg]:
        with self._cond:
            return [m for m in self.msgs if m.topic == topic]

    def wait_for(self, pred: Callable[[Msg], bool], timeout: float = 10.0) -> Msg:
        """The first message (seen so far or later) for which `pred` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.msgs:
                    try:
                        if pred(m):
                            return m
                    except (ValueError, KeyError, TypeError):
                        pass
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = [(m.topic, m.payload[:200]) for m in self.msgs[-5:]]
                    raise TimeoutError(f"no such message in {timeout} s; last: {tail}")
                self._cond.wait(left)

    def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(broker: Broker, topic: str, timeout: float = 1.0) -> bytes | None:
    """The retained message on `topic` as a new subscriber gets it (None when there is none).

    As `integrations`: a second `automation` login would replace a test's Watcher."""
    w = Watcher(broker, [topic], user="integrations")
    try:
        return w.wait_for(lambda m: m.retain, timeout).payload
    except TimeoutError:
        return None
    finally:
        w.close()


class V5Device:
    """A device speaking MQTT v5, recording (topic, payload, correlation data)."""

    def __init__(self, broker: Broker, device_id: str, prefix: str = "llm") -> None:
        if device_id not in broker.users:
            broker.add_user(device_id)
        self.id = device_id
        self.prefix = prefix
        self.got: list[tuple[str, dict[str, Any], bytes | None]] = []
        self._cond = threading.Condition()
        ready = threading.Event()
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"v5-{device_id}-{os.urandom(3).hex()}",
            protocol=paho.MQTTv5,
        )
        c.username_pw_set(device_id, broker.users[device_id])
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: ready.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.subscribe(f"{prefix}/{device_id}/res/#", qos=1)
        assert ready.wait(5)
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        with self._cond:
            self.got.append((msg.topic, json.loads(msg.payload), corr))
            self._cond.notify_all()

    def request(
        self, body: dict[str, Any], response_topic: str | None, correlation: bytes | None
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        info = self.client.publish(
            f"{self.prefix}/{self.id}/req", json.dumps(body), 1, properties=props
        )
        info.wait_for_publish(5)

    def wait(self, pred: Any, timeout: float = 10.0) -> list[tuple[str, dict[str, Any], Any]]:
        """Wait until `pred(messages)` holds; return the messages."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.got):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; got {self.got[-3:]}"
                self._cond.wait(left)
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
