"""Node-RED: the documented flow (docs/integrations/node-red-flow.json) deployed into a real
Node-RED 4.1 with Dashboard 2 (`@flowfuse/node-red-dashboard`), both from npm, against a
real Mosquitto with broker/'s ACL, the bridge as a process and the mock LLM.

The test does what docs/integrations/README.md tells a user to do: import the flow, set
the "LLM broker" node's server and its user and password, deploy (the editor's deploy
is `POST /flows` with the credentials inside the broker node, as here), type a question
in the dashboard's "Ask the kitchen" box (a Socket.IO client speaking to the dashboard
as its web page does) and read the reply in the dashboard's widgets, in the editor's
debug sidebar (the admin websocket) and on the broker.

npm installs the pinned packages once into .cache/node-red/ (ignored by git) and later
runs reuse them; where node or npm is missing the tests are skipped and say so.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.harness import REPO, BridgeProcess, Broker, Watcher, free_port

pytestmark = pytest.mark.slow

#: What the test installs (exact versions, so that every run tests the same thing).
NPM_PACKAGES = (
    "node-red@4.1.8",
    "@flowfuse/node-red-dashboard@1.31.0",
    "socket.io-client@4.8.1",  # the dashboard page's own client library, to drive it
)
FLOW_FILE = REPO / "docs" / "integrations" / "node-red-flow.json"
README = REPO / "docs" / "integrations" / "README.md"
CACHE = REPO / ".cache" / "node-red"
QUESTION_BOX, REPLY_TEXT, STATUS_TEXT = "llm_question", "llm_reply_text", "llm_status_text"


def npm_modules() -> Path:
    """The pinned packages' node_modules, installed on first use under .cache/node-red/."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if not npm or not node:
        pytest.skip("node and npm are not installed: the Node-RED flow cannot be tested")
    major = subprocess.run([node, "--version"], check=True, capture_output=True, text=True).stdout
    if int(major.strip().lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"Node-RED 4.1 needs Node.js 18 or newer; this one is {major.strip()}")
    key = hashlib.sha256(" ".join(NPM_PACKAGES).encode()).hexdigest()[:12]
    prefix = CACHE / key
    prefix.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once install once
        if not (prefix / "installed").exists():
            shutil.rmtree(prefix / "node_modules", ignore_errors=True)
            done = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                 *NPM_PACKAGES],
                check=False, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"npm install failed:\n{done.stderr[-3000:]}")
            (prefix / "installed").write_text("\n".join(NPM_PACKAGES) + "\n")
    return prefix / "node_modules"


SETTINGS_JS = """\
// Node-RED's settings for the test: loopback only, nothing fetched from outside.
module.exports = {
    uiHost: "127.0.0.1",
    flowFile: "flows.json",
    telemetry: { enabled: false, updateNotification: false },
    diagnostics: { enabled: false },
    externalModules: { palette: { allowInstall: false } },
    logging: { console: { level: "info", metrics: false, audit: false } },
};
"""


class NodeRed:
    """`node-red` as a process with a user directory of its own, driven by its admin API."""

    def __init__(self, modules: Path, workdir: Path) -> None:
        self.modules = modules
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "node-red.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 60.0) -> NodeRed:
        (self.dir / "settings.js").write_text(SETTINGS_JS)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [shutil.which("node") or "node", str(self.modules / "node-red" / "red.js"),
             "--userDir", str(self.dir), "--settings", str(self.dir / "settings.js"),
             "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node-red exited at start:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/settings", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"node-red did not start:\n{self.logs()[-3000:]}")
            time.sleep(0.2)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 15.0) -> str:
        """Wait until `pattern` (a regex) is in Node-RED's log `count` times; return the log."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, text := self.logs())) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not {count}x in Node-RED's log:\n{text[-3000:]}")
            time.sleep(0.1)
        return text

    def deploy(self, nodes: list[dict[str, Any]]) -> None:
        """What the editor's "Deploy" sends: every node, credentials inside their nodes."""
        r = httpx.post(
            f"{self.url}/flows", json=nodes, headers={"Node-RED-Deployment-Type": "full"},
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 204, r.text

    def inject(self, node_id: str) -> None:
        """The inject node's button in the editor."""
        r = httpx.post(f"{self.url}/inject/{node_id}", timeout=10)
        assert r.status_code == 200, r.text

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log:
            self._log.close()


# A dashboard page and the editor's debug sidebar, in one Node.js process: it prints what
# they would show as JSON lines and types what it reads on stdin into a dashboard widget.
BROWSER_JS = r"""
const { io } = require('socket.io-client');
const WebSocket = require('ws');
const readline = require('readline');
const base = process.argv[1];
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const page = io(base, { path: '/dashboard/socket.io' });
page.on('connect', () => out({ src: 'dashboard', event: 'connect' }));
page.on('connect_error', (e) => out({ src: 'dashboard', event: 'connect_error', e: String(e) }));
page.onAny((event, ...args) => out({ src: 'dashboard', event, args }));

const editor = new WebSocket(base.replace(/^http/, 'ws') + '/comms');
editor.on('open', () => {
    editor.send(JSON.stringify({ subscribe: 'debug' }));
    editor.send(JSON.stringify({ subscribe: 'status/#' }));
    out({ src: 'editor', event: 'open' });
});
editor.on('message', (data) => {
    for (const m of JSON.parse(data)) out({ src: 'editor', topic: m.topic, data: m.data });
});

readline.createInterface({ input: process.stdin }).on('line', (line) => {
    const [id, value] = JSON.parse(line);
    page.emit('widget-change', id, value);  // what the page sends when the box is submitted
});
process.stdin.on('end', () => process.exit(0));
"""


class Browser:
    """The dashboard page and the editor's debug sidebar, watched from a Node.js process."""

    def __init__(self, nr: NodeRed) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        env = {**os.environ, "NODE_PATH": str(nr.modules)}
        self.proc = subprocess.Popen(
            [shutil.which("node") or "node", "-e", BROWSER_JS, nr.url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda e: e["src"] == "dashboard" and e["event"] == "connect")
        self.wait_for(lambda e: e["src"] == "editor" and e.get("event") == "open")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    try:
                        if pred(e):
                            return e
                    except (KeyError, IndexError, TypeError):
                        pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"not seen in {timeout} s; last: {self.events[-8:]}")
                self._cond.wait(left)

    def shown(self, widget: str) -> list[Any]:
        """Every value the dashboard was sent for a widget, in order."""
        with self._cond:
            return [
                e["args"][0].get("payload")
                for e in self.events
                if e["src"] == "dashboard" and e["event"] == f"msg-input:{widget}"
            ]

    def sidebar(self) -> list[dict[str, Any]]:
        """The editor's debug sidebar: debug nodes' output, warnings and errors."""
        with self._cond:
            return [e["data"] for e in self.events if e.get("topic") == "debug"]

    def type_question(self, text: str) -> None:
        """Type `text` into "Ask the kitchen" and press Enter."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([QUESTION_BOX, text]) + "\n").encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def documented_flow(broker: Broker, user: str) -> list[dict[str, Any]]:
    """The flow as imported, with the "LLM broker" node set as the README says: the server
    (here the test's Mosquitto) and a user with its password."""
    nodes: list[dict[str, Any]] = json.loads(FLOW_FILE.read_text())
    nodes = copy.deepcopy(nodes)
    (conf,) = [n for n in nodes if n["type"] == "mqtt-broker"]
    conf.update(broker="127.0.0.1", port=str(broker.port))
    conf["credentials"] = {"user": user, "password": broker.users[user]}
    return nodes


@pytest.fixture(scope="module")
def node_red(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRed]:
    nr = NodeRed(npm_modules(), tmp_path_factory.mktemp("node-red")).start()
    yield nr
    nr.stop()


@pytest.fixture
def deployed(
    node_red: NodeRed, broker: Broker, bridge: BridgeProcess
) -> Iterator[Callable[[str], Browser]]:
    """Deploy the documented flow with a broker user; return a browser on its dashboard."""
    browsers: list[Browser] = []

    def deploy(user: str) -> Browser:
        started = r"Started flows|Waiting for missing types"
        before = node_red.logs()
        runs, connected = len(re.findall(started, before)), before.count("Connected to broker")
        node_red.deploy(documented_flow(broker, user))
        log = node_red.wait_log(started, runs + 1)
        assert "Waiting for missing types" not in log, log[-2000:]  # every type is installed
        node_red.wait_log(r"Connected to broker: \S+", connected + 1)
        # Mosquitto's log: the flow's client speaks MQTT v5 as `user`.
        seen = rf"as {user} \(p5, c1, k60, u'{user}'\)"  # the broker names clients by user
        deadline = time.monotonic() + 5
        while not re.search(seen, broker.log_file.read_text()):
            assert time.monotonic() < deadline, f"no {seen!r} in Mosquitto's log"
            time.sleep(0.05)
        page = httpx.get(f"{node_red.url}/dashboard/llm", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        b = Browser(node_red)
        browsers.append(b)
        return b

    yield deploy
    for b in browsers:
        b.close()


def test_flow_asks_as_automation_and_streams_the_reply_into_the_dashboard(
    node_red: NodeRed, broker: Broker, deployed: Callable[[str], Browser]
) -> None:
    """The README's steps with the `automation` user: a question typed in the dashboard is
    asked on llm/kitchen/ask, the reply grows piece by piece in the "Reply" widget, the
    status follows the retained state, and the finished reply is in the debug sidebar."""
    watch = Watcher(broker, ["llm/kitchen/ask", "llm/kitchen/res/+"], user="integrations")
    try:
        browser = deployed("automation")
        browser.type_question("Why is the sky blue?")
        ask = watch.wait_for(lambda m: m.topic == "llm/kitchen/ask")
        assert ask.payload == b"Why is the sky blue?"
        want = "You said: Why is the sky blue?."  # the mock LLM's answer
        done = watch.wait_for(lambda m: "/res/" in m.topic and "done" in m.json)
        rid = done.topic.rsplit("/", 1)[1]
        assert rid.startswith("ha-")
        streamed = "".join(m.json.get("delta", "") for m in watch.on(f"llm/kitchen/res/{rid}"))
        assert streamed == want
        browser.wait_for(lambda e: e["event"] == f"msg-input:{REPLY_TEXT}"
                         and e["args"][0]["payload"] == want)  # fmt: skip
        shown = browser.shown(REPLY_TEXT)
        # Piece by piece: every value shown is a longer prefix of the reply, then the reply.
        assert len(shown) >= 3 and shown[-1] == want
        assert all(want.startswith(s) for s in shown)
        assert all(len(a) < len(b) for a, b in itertools.pairwise(shown[:-1])), shown

        def busy_then_idle(_: object) -> bool:
            """Status went thinking/streaming, then idle (not a state left by earlier tests)."""
            seen = browser.shown(STATUS_TEXT)
            busy = [i for i, v in enumerate(seen) if v in ("thinking", "streaming")]
            return bool(busy) and "idle" in seen[busy[0] :]

        browser.wait_for(busy_then_idle)
        browser.wait_for(lambda e: e["topic"] == "debug" and e["data"]["id"] == "llm_debug")
        assert [d["msg"] for d in browser.sidebar() if d.get("id") == "llm_debug"] == [want]

        # The editor's "Ask a fixed question" inject button goes the same way.
        node_red.inject("llm_inject")
        fixed = "You said: Why is the sky blue? Two sentences.."  # the mock adds a "."
        browser.wait_for(lambda e: e["event"] == f"msg-input:{REPLY_TEXT}"
                         and e["args"][0]["payload"] == fixed)  # fmt: skip
        browser.wait_for(lambda e: e["topic"] == "debug" and e["data"]["msg"] == fixed)
        # An empty submit asks nothing.
        browser.type_question("")
        time.sleep(0.5)
        assert [m.payload for m in watch.on("llm/kitchen/ask")] == [
            b"Why is the sky blue?",
            b"Why is the sky blue? Two sentences.",
        ]
        assert not [d for d in browser.sidebar() if d.get("level") in (20, 30)]  # no error/warn
    finally:
        watch.close()


def test_flow_with_the_read_only_user_shows_why_it_cannot_ask(
    node_red: NodeRed, broker: Broker, deployed: Callable[[str], Browser]
) -> None:
    """With `integrations` (the read-only user) the broker refuses the question; over MQTT
    v5 its PUBACK says why (135, Not authorized), and the flow shows that on the dashboard,
    in the debug sidebar and in Node-RED's log instead of failing silently."""
    broker.add_user("integrations-nrwatch")  # one login per user: the flow is integrations
    watch = Watcher(broker, ["llm/kitchen/ask"], user="integrations-nrwatch")
    try:
        browser = deployed("integrations")
        browser.type_question("Can I ask?")
        refused = browser.wait_for(
            lambda e: (
                e["event"] == f"msg-input:{STATUS_TEXT}" and "refused" in e["args"][0]["payload"]
            )
        )["args"][0]["payload"]
        assert refused == (
            "the broker refused the question: Publish error: Not authorized (reason code 135)"
        )
        assert f"`{refused}`" in " ".join(README.read_text().split())  # as documented
        warn = browser.wait_for(lambda e: e["topic"] == "debug" and e["data"].get("level") == 30)
        assert warn["data"]["id"] == "llm_refusal" and warn["data"]["msg"] == refused
        # In the editor, under the catch's function node: the reason code.
        browser.wait_for(lambda e: e["topic"] == "status/llm_refusal"
                         and e["data"]["text"] == "refused: 135")  # fmt: skip
        node_red.wait_log(r"\[warn\] \[function:say why\] the broker refused the question: .*"
                          r"Not authorized \(reason code 135\)")  # fmt: skip
        time.sleep(0.3)
        assert watch.on("llm/kitchen/ask") == []  # nothing reached the bridge
    finally:
        watch.close()


def test_flow_and_readme_name_the_automation_user_and_current_node_red() -> None:
    """The user that may ask is `automation` wherever the flow or README names one; the flow
    uses only Node-RED core and Dashboard 2 types, MQTT v5, and an active debug node."""
    flow = json.loads(FLOW_FILE.read_text())
    info = next(n for n in flow if n["type"] == "tab")["info"]
    assert "'automation'" in info
    assert "'integrations' only reads" in info  # named, but not as the user to set
    section = README.read_text().split("## Node-RED", 1)[1].split("\n## ", 1)[0]
    assert "user `automation`" in section
    assert "`@flowfuse/node-red-dashboard`" in section
    assert all(f"`{pkg}`" in section for pkg in NPM_PACKAGES)  # what the test installs
    assert "npm install --no-audit --no-fund" in section
    types = {n["type"] for n in flow}
    assert not {t for t in types if t.startswith("ui_")}  # no Dashboard 1 node
    assert {"ui-base", "ui-page", "ui-group", "ui-text-input", "ui-text"} <= types
    (conf,) = [n for n in flow if n["type"] == "mqtt-broker"]
    assert conf["protocolVersion"] == "5"
    assert "credentials" not in conf and "user" not in conf  # set in the editor, not shipped
    assert all(n["active"] for n in flow if n["type"] == "debug")
    assert [n["qos"] for n in flow if n["type"] == "mqtt out"] == ["1"]  # a PUBACK to refuse
