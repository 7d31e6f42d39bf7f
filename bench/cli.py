"""`python -m bench`: start everything on loopback, run the cases, print and save the table.

Why one orchestrator: the ratios only hold when the bridge, the baseline and
the broker's ceiling are measured in the same run on the same Mosquitto and
mock LLM, one after the other, with nothing else of ours running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench import profile, report
from bench.procs import (
    HOST,
    REPO,
    Broker,
    Proc,
    Usage,
    free_port,
    machine_cpu_s,
    python_proc,
    wait_port,
)
from bridge.core.settings import Settings

PREFIX = "llm"
DEFAULT_MAX_STREAMS: int = Settings.model_fields["max_streams"].default
API_KEY = "sk-bench-" + secrets.token_hex(8)
FULL_CASES = "1:200:0,100:200:0,500:200:0,1:200:20,100:200:20,500:200:20"
QUICK_CASES = "1:50:0,50:50:0,50:50:20"
SYSTEMS = ("ours", "baseline")
_SAMPLE_EVERY_S = 0.5
_TARGET_CASE_SECONDS = 20.0
# QoS 1 messages in flight for the ceiling publisher: the best of 10-1000 measured here
# (paho walks every in-flight message on each PUBACK, so a larger window costs more).
CEILING_WINDOW = 100
# Other work on the machine below which a case may start (cores), see Bench.wait_quiet.
QUIET_CORES = 0.15


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


class Lines:
    """Read a child's stdout line by line with a deadline (never blocks past it)."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        assert proc.proc.stdout is not None
        self.fd = proc.proc.stdout.fileno()
        self.buf = b""

    def expect(self, word: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.strip() == word.encode():
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.proc.name}: no {word} after {timeout:g} s")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                data = os.read(self.fd, 65536)
                if not data:
                    raise RuntimeError(
                        f"{self.proc.name} exited ({self.proc.proc.poll()}) before {word}:\n"
                        f"{self.proc.tail()}"
                    )
                self.buf += data


def mqtt_client(broker: Broker, user: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ctl-{secrets.token_hex(4)}")
    c.username_pw_set(user, broker.users[user])
    return c


def clear_status(broker: Broker) -> None:
    """Remove the retained `P/bridge/status`, so only a fresh `online` counts."""
    c = mqtt_client(broker, "bridge")
    c.connect(HOST, broker.port)
    c.loop_start()
    try:
        c.publish(f"{PREFIX}/bridge/status", b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def wait_online(broker: Broker, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until the system under test says `online` on `P/bridge/status`."""
    ev = threading.Event()
    c = mqtt_client(broker, "integrations")
    c.on_connect = lambda cl, *_a: cl.subscribe(f"{PREFIX}/bridge/status", qos=1)
    c.on_message = lambda _c, _u, m: ev.set() if m.payload == b"online" else None
    c.connect(HOST, broker.port)
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not ev.wait(0.2):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}):\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} not online after {timeout:g} s:\n{proc.tail()}")
    finally:
        c.disconnect()
        c.loop_stop()


def parse_cases(text: str) -> list[dict[str, int]]:
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"bad case {item!r}: use STREAMS:TOKENS:DELAY_MS, e.g. 100:200:20")
        streams, tokens, delay = (int(p) for p in parts)
        if streams < 1 or tokens < 1:
            raise SystemExit(f"bad case {item!r}: streams and tokens must be >= 1")
        cases.append({"streams": streams, "tokens": tokens, "delay_ms": delay})
    return cases


def requests_for(case: dict[str, int], min_requests: int) -> int:
    """At least one request per stream; more for few streams, so percentiles have samples.

    With paced tokens the minimum is lowered so that one case lasts about
    `_TARGET_CASE_SECONDS` at most (C=1 with 200 tokens of 20 ms is 4 s a request).
    """
    n = min_requests
    if case["delay_ms"] > 0:
        per_request_s = case["tokens"] * case["delay_ms"] / 1000
        n = min(n, max(1, math.ceil(_TARGET_CASE_SECONDS / per_request_s)))
    return max(case["streams"], n)


def environment() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mosq = mosquitto_binary()
    mv = subprocess.run([mosq, "-h"], capture_output=True, text=True, timeout=5, check=False)
    m = re.search(r"mosquitto version (\S+)", mv.stdout + mv.stderr)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
        timeout=5, check=False,
    ).stdout.strip()  # fmt: skip
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "bridge", "broker"], cwd=REPO,
        capture_output=True, text=True, timeout=5, check=False,
    ).stdout.strip()  # fmt: skip
    if commit and dirty:
        commit += " + uncommitted changes in bridge/ or broker/"
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "python": platform.python_version(),
        "paho": version("paho-mqtt"),
        "openai": version("openai"),
        "httpx": version("httpx"),
        "mosquitto": f"mosquitto {m.group(1) if m else '?'}",
        "commit": commit or "?",
    }


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")


class Sampler:
    """Samples the system under test's /proc figures in the background during a case."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_EVERY_S):
            self.usage.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.usage.sample()


# --------------------------------------------------------------------------- the run


class Bench:
    """Owns every process of the run; `close()` stops them all, whatever happened."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cases = parse_cases(args.cases or (QUICK_CASES if args.quick else FULL_CASES))
        self.dir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.procs: list[Proc] = []
        max_devices = max(self._devices(c) for c in self.cases)
        users = {"bridge": secrets.token_urlsafe(12), "integrations": secrets.token_urlsafe(12)}
        # Workers 2..N log in as bridge-2... with the first's password (`--workers`).
        users.update({f"bridge-{i}": users["bridge"] for i in range(2, max(args.workers) + 1)})
        self.device_ids = [f"bdev{i}" for i in range(max_devices)]
        users.update({d: secrets.token_urlsafe(12) for d in self.device_ids})
        # One Mosquitto per `--broker` choice, all running through the whole run; the
        # ceiling is measured on the first.
        self.brokers = {
            name: Broker(self.dir / f"broker-{name}", users, PREFIX, stock=name == "stock")
            for name in args.broker
        }
        self.broker = next(iter(self.brokers.values()))
        self.broker_usages: dict[str, Usage] = {}
        self.mock_port = 0
        self.broker_usage: Usage | None = None
        self.mock_usage: Usage | None = None
        self.mock: Proc | None = None
        self.seq = 0
        self.profiles: list[Path] = []

    def _devices(self, case: dict[str, int]) -> int:
        return min(case["streams"], self.args.devices) if self.args.devices else case["streams"]

    def _start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def _stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        for broker in self.brokers.values():
            broker.stop()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            log(f"logs kept in {self.dir}")

    def start_shared(self) -> None:
        for name, broker in self.brokers.items():
            broker.start(mosquitto_binary())
            assert broker.proc is not None
            self.broker_usages[name] = Usage(broker.proc.pid)
            log(f"mosquitto ({name}) on {HOST}:{broker.port} with {len(broker.users)} users")
        self.broker_usage = next(iter(self.broker_usages.values()))
        self.mock_port = free_port()
        self.mock = self._start(
            python_proc(
                "mock-llm",
                ["bridge.dev.mock_llm", "--host", HOST, "--port", str(self.mock_port), "--api-key",
                 API_KEY],
                self.dir / "mock.log",
            )
        )  # fmt: skip
        wait_port(self.mock_port, proc=self.mock.proc)
        self.mock_usage = Usage(self.mock.pid)

    # --- systems -------------------------------------------------------------------------

    def use(self, broker: str) -> None:
        """Run the next cases on this `--broker` choice."""
        self.broker = self.brokers[broker]
        self.broker_usage = self.broker_usages[broker]

    def _system_env(self, system: str, case: dict[str, int], workers: int = 1) -> dict[str, str]:
        self.seq += 1
        env = {
            "OPENAI_BASE_URL": f"http://{HOST}:{self.mock_port}/v1",
            "OPENAI_API_KEY": API_KEY,
            "OPENAI_MODEL": "mock-1",
            "BRIDGE_MQTT_URL": f"mqtt://bridge:{self.broker.users['bridge']}"
            f"@{HOST}:{self.broker.port}",
            "BRIDGE_TOPIC_PREFIX": PREFIX,
            "BRIDGE_CLIENT_ID": f"bench-{system}-{self.seq}",
        }
        if system == "ours":
            env.update(
                {
                    # A fresh session per case: an old one would queue later cases' requests.
                    "BRIDGE_SESSION_EXPIRY": "0",
                    "BRIDGE_MAX_QUEUE": "100000",
                    "BRIDGE_LOG_LEVEL": "INFO",
                }
            )
            # The default stream limit, as a user runs it, unless the case needs more.
            if case["streams"] > DEFAULT_MAX_STREAMS:
                env["BRIDGE_MAX_STREAMS"] = str(case["streams"])
            if workers > 1:
                env["BRIDGE_CLIENT_ID"] = "bridge"
                env["BRIDGE_DATA_DIR"] = str(self.dir / f"data-{self.seq}")
            for item in self.args.bridge_env:
                key, _, value = item.partition("=")
                env[key] = value
        return env

    def _system(self, system: str, case: dict[str, int], log_path: Path, workers: int = 1) -> Proc:
        env = self._system_env(system, case, workers)
        module = ["bridge", "run"] if system == "ours" else ["bench.baseline"]
        if workers > 1:
            module += ["--workers", str(workers), "--group", f"bench{self.seq}"]
        return self._start(python_proc(system, module, log_path, env=env))

    # --- one case on one system ----------------------------------------------------------

    def wait_quiet(self) -> None:
        """Wait (at most `--quiet-wait` s) until the machine is nearly idle before a case.

        Why: the machine is shared; a case started during someone else's test run
        measures both. The wait is bounded, and the noise that remains is reported.
        """
        limit = self.args.quiet_wait
        if limit <= 0:
            return
        deadline = time.monotonic() + limit
        busy = 0.0
        while time.monotonic() < deadline:
            a = machine_cpu_s()[0]
            time.sleep(1.0)
            busy = machine_cpu_s()[0] - a
            if busy < QUIET_CORES:
                return
        log(f"machine still busy ({busy:.2f} core) after {limit:g} s; going on")

    def run_case(  # noqa: PLR0915  # one case, measured step by step
        self, case: dict[str, int], system: str, workers: int = 1
    ) -> dict[str, Any]:
        assert self.broker_usage and self.mock_usage
        self.wait_quiet()
        name = f"{system}-c{case['streams']}-t{case['tokens']}-d{case['delay_ms']}-{self.seq}"
        work = self.dir / name
        work.mkdir()
        clear_status(self.broker)
        sut = self._system(system, case, work / f"{system}.log", workers)
        try:
            wait_online(self.broker, sut)
            if workers > 1:
                time.sleep(3)  # the other workers subscribe too
            requests = requests_for(case, self.args.min_requests)
            expected_chunks = requests * case["tokens"]
            timeout = self.args.case_timeout or 30 + expected_chunks / 1000
            timeout += requests * case["tokens"] * case["delay_ms"] / 1000 / case["streams"]
            gens = self._loadgens(case, requests, timeout, work)
            lines = [Lines(g) for g in gens]
            for ln in lines:
                ln.expect("READY", 60 + self._devices(case) / 20)
            sut_usage = Usage(sut.pid)
            own_usage = Usage(
                os.getpid(), tree=False
            )  # this orchestrator, not the system: not "other"
            gen_usage = [Usage(g.pid) for g in gens]
            for u in [sut_usage, own_usage, self.broker_usage, self.mock_usage, *gen_usage]:
                u.begin()
            broker0, mock0 = self.broker_usage.cpu_s, self.mock_usage.cpu_s
            busy0, steal0 = machine_cpu_s()
            spy = None
            if self.args.profile and system in self.args.profile_systems.split(","):
                self.args.profile.mkdir(parents=True, exist_ok=True)
                spy_out = self.args.profile.resolve() / f"{name}.txt"
                spy = self._start(profile.start(sut.pid, spy_out, work / "py-spy.log"))
                self.profiles.append(spy_out)
            with Sampler(sut_usage):
                for g in gens:
                    assert g.proc.stdin is not None
                    g.proc.stdin.write(b"GO\n")
                    g.proc.stdin.flush()
                for ln in lines:
                    ln.expect("DONE", timeout + 30)
                for u in [own_usage, self.broker_usage, self.mock_usage, *gen_usage]:
                    u.sample()
                busy1, steal1 = machine_cpu_s()
            if spy is not None:
                profile.stop(spy)
                self.procs.remove(spy)
            raw = self._merge([json.loads((work / f"load{i}.json").read_text()) for i in
                               range(len(gens))])  # fmt: skip
            for g in gens:
                self._stop(g)
        finally:
            self._stop(sut)
        wall = max(raw["last_end_ns"] - raw["first_sent_ns"], 1) / 1e9
        ours_cpu = (
            sut_usage.cpu_s
            + self.broker_usage.cpu_s - broker0
            + self.mock_usage.cpu_s - mock0
            + sum(u.cpu_s for u in gen_usage)
            + own_usage.cpu_s
        )  # fmt: skip
        run_s = (busy1 - busy0) or 1e-9
        usage = {
            "cpu_s": round(sut_usage.cpu_s, 2),
            # Busy CPU of the machine that none of the bench's processes account for,
            # per second of the case (1.0 = one core's worth of other work).
            "other_cpu_per_s": round(max(0.0, busy1 - busy0 - ours_cpu) / max(wall, 1e-3), 2),
            "steal_cpu_per_s": round((steal1 - steal0) / max(wall, 1e-3), 2),
            "machine_busy_s": round(run_s, 2),
            "peak_rss_kb": sut_usage.peak_rss_kb,
            "processes": sut_usage.processes,
            "broker_cpu_s": round(self.broker_usage.cpu_s - broker0, 2),
            "mock_cpu_s": round(self.mock_usage.cpu_s - mock0, 2),
            "load_cpu_s": round(sum(u.cpu_s for u in gen_usage), 2),
            "load_cpu_pct": round(100 * sum(u.cpu_s for u in gen_usage) / wall, 1),
            "load_max_proc_pct": round(100 * max(u.cpu_s for u in gen_usage) / wall, 1),
            "load_procs": len(gens),
            "devices": self._devices(case),
            "workers": workers,
            "broker": "stock" if self.broker.stock else "tuned",
        }
        result = report.summarize(raw, usage)
        if raw["failure"]:
            log(f"{system} {report.case_name(case)}: load generator says: {raw['failure']}")
        return result

    def _loadgens(
        self, case: dict[str, int], requests: int, timeout: float, work: Path
    ) -> list[Proc]:
        """Split the devices and streams over `--load-procs` load generator processes."""
        devices = self.device_ids[: self._devices(case)]
        n = max(1, min(self.args.load_procs, len(devices)))
        gens = []
        for i in range(n):
            devs = devices[i::n]
            streams = len(range(i, case["streams"], n))
            if streams == 0:
                continue
            reqs = len(range(i, requests, n))
            spec = {
                "prefix": PREFIX,
                "port": self.broker.port,
                "tag": f"{work.name}-{i}",
                "devices": [[d, self.broker.users[d]] for d in devs],
                "streams": streams,
                "requests": max(reqs, streams),
                "tokens": case["tokens"],
                "delay_ms": case["delay_ms"],
                "timeout": timeout,
                "connect_timeout": 60 + len(devs) / 20,
                "warmup": 4,
                "stall_s": 20,
                "out": str(work / f"load{i}.json"),
            }
            (work / f"load{i}.spec.json").write_text(json.dumps(spec))
            gens.append(
                self._start(
                    python_proc(
                        f"loadgen{i}",
                        ["bench.loadgen", "--spec", str(work / f"load{i}.spec.json")],
                        work / f"load{i}.log",
                        stdin=subprocess.PIPE,
                        stdout_pipe=True,
                    )
                )
            )
        return gens

    @staticmethod
    def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("requests", "finished", "error_count", "chunks", "tokens", "expected_tokens",
                    "lost", "repeated", "out_of_order", "strays"):  # fmt: skip
            out[key] = sum(p[key] for p in parts)
        out["errors"] = sorted({e for p in parts for e in p["errors"]})
        out["timed_out"] = any(p["timed_out"] for p in parts)
        out["first_sent_ns"] = min(p["first_sent_ns"] for p in parts)
        out["last_end_ns"] = max(p["last_end_ns"] for p in parts)
        for key in ("ttfc_ns", "ttfc_in_ns", "ttfc_out_ns"):
            out[key] = [v for p in parts for v in p[key]]
        out["latency_ns"] = [v for p in parts for v in p["latency_ns"]]
        failures = [p["failure"] for p in parts if p["failure"]]
        out["failure"] = "; ".join(failures) if failures else None
        return out

    # --- the broker's ceiling ------------------------------------------------------------

    def ceiling_once(self, count: int, qos: int) -> dict[str, Any]:
        assert self.broker_usage is not None
        self.wait_quiet()
        self.seq += 1
        work = self.dir / f"ceiling-{self.seq}"
        work.mkdir()
        spec = {
            "port": self.broker.port,
            "tag": str(self.seq),
            "pub_user": ["bridge", self.broker.users["bridge"]],
            "sub_user": ["integrations", self.broker.users["integrations"]],
            "filter": f"{PREFIX}/+/res/+",
            "topic_format": PREFIX + "/bdev{i}/res/ceiling-{i}",
            "topics": 100,
            "count": count,
            "qos": qos,
            "window": CEILING_WINDOW,
            "timeout": 30 + count / 1000,
            "pub_out": str(work / "pub.json"),
            "sub_out": str(work / "sub.json"),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        args = ["bench.ceiling", "{role}", "--spec", str(work / "spec.json")]
        sub = self._start(
            python_proc("ceiling-sub", [a.format(role="sub") for a in args], work / "sub.log",
                        stdout_pipe=True)
        )  # fmt: skip
        try:
            sub_lines = Lines(sub)
            sub_lines.expect("READY", 20)
            pub = self._start(
                python_proc("ceiling-pub", [a.format(role="pub") for a in args], work / "pub.log",
                            stdout_pipe=True)
            )  # fmt: skip
            pub_usage, sub_usage = Usage(pub.pid), Usage(sub.pid)
            pub_usage.begin()
            sub_usage.begin()
            self.broker_usage.begin()
            busy0 = machine_cpu_s()[0]
            pub_lines = Lines(pub)
            pub_lines.expect("DONE", spec["timeout"] + 10)
            pub_usage.sample()
            sub_lines.expect("DONE", spec["timeout"] + 10)
            sub_usage.sample()
            self.broker_usage.sample()
            busy = machine_cpu_s()[0] - busy0
            self._stop(pub)
        finally:
            self._stop(sub)
        p = json.loads((work / "pub.json").read_text())
        s = json.loads((work / "sub.json").read_text())
        wall = (s["last_ns"] - p["first_ns"]) / 1e9
        return {
            "count": s["count"],
            "wall_s": round(wall, 3),
            "msgs_per_s": round(s["count"] / wall, 1),
            "pub_cpu_s": round(pub_usage.cpu_s, 2),
            "sub_cpu_s": round(sub_usage.cpu_s, 2),
            "broker_cpu_s": round(self.broker_usage.cpu_s, 2),
            "other_cpu_per_s": round(
                max(0.0, busy - pub_usage.cpu_s - sub_usage.cpu_s - self.broker_usage.cpu_s) / wall,
                2,
            ),
        }

    def ceiling(self, runs: int) -> dict[str, Any]:
        qos = 1
        count = self.args.ceiling_count
        measured = []
        for i in range(runs):
            r = self.ceiling_once(count, qos)
            log(f"broker ceiling run {i + 1}: {r['msgs_per_s']:.0f} msgs/s")
            measured.append(r)
        sample = b'{"seq":%d,"delta":"%d "}' % (100, time.monotonic_ns())
        return {
            "qos": qos,
            "count": count,
            "payload_bytes": len(sample),
            "msgs_per_s": max(r["msgs_per_s"] for r in measured),
            "runs": measured,
        }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the bridge against a naive bridge and the broker's ceiling.",
    )
    ap.add_argument("--quick", action="store_true", help=f"CI smoke run: cases {QUICK_CASES}")
    ap.add_argument(
        "--cases",
        help=f"comma-separated STREAMS:TOKENS:DELAY_MS (default {FULL_CASES})",
    )
    ap.add_argument(
        "--systems",
        default="ours,baseline,ceiling",
        help="which of ours, baseline, ceiling to run (default all three)",
    )
    ap.add_argument("--json", type=Path, help="also save every figure to this JSON file")
    ap.add_argument(
        "--min-requests",
        type=int,
        default=None,
        help="requests per case when there are fewer streams (default 20, quick 10)",
    )
    ap.add_argument("--devices", type=int, default=0, help="at most this many devices (default C)")
    ap.add_argument(
        "--load-procs", type=int, default=1, help="load generator processes (default 1)"
    )
    ap.add_argument(
        "--ceiling-count", type=int, default=None, help="messages per ceiling run (100000)"
    )
    ap.add_argument("--ceiling-runs", type=int, default=None, help="ceiling runs (2, quick 1)")
    ap.add_argument("--case-timeout", type=float, default=0, help="seconds per case (auto)")
    ap.add_argument(
        "--bridge-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for our bridge (repeatable)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each case, wait up to this many seconds for the machine to be idle"
        " (default 60, quick 0)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the run's logs and configs")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the system under test with py-spy in every case (collapsed stacks in DIR;"
        " figures of such a run are disturbed by py-spy)",
    )
    ap.add_argument("--profile-systems", default="ours", help="systems to profile (default ours)")
    ap.add_argument(
        "--broker",
        default="tuned",
        help="Mosquitto with the project's broker/ config (tuned), without its tuning lines "
        "(stock: Mosquitto's defaults), or both in one run: stock,tuned (default tuned)",
    )
    ap.add_argument(
        "--workers",
        default="1",
        help="run our bridge as this many worker processes of one group; several: 1,2 (default 1)",
    )
    ap.add_argument("--plot", type=Path, metavar="DIR", help="save PNG charts (matplotlib) in DIR")
    return ap


def _on_sigterm(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    # SIGINT too: a shell starts background jobs with SIGINT ignored.
    old = {sig: signal.signal(sig, _on_sigterm) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915  # the bench run, in order
    args = build_parser().parse_args(argv)
    args.broker = [b.strip() for b in args.broker.split(",") if b.strip()]
    if not args.broker or set(args.broker) - {"stock", "tuned"}:
        raise SystemExit("--broker takes stock, tuned or stock,tuned")
    try:
        args.workers = sorted({int(w) for w in args.workers.split(",")})
    except ValueError:
        raise SystemExit("--workers takes counts like 1 or 1,2") from None
    if args.min_requests is None:
        args.min_requests = 10 if args.quick else 20
    if args.ceiling_count is None:
        args.ceiling_count = 20_000 if args.quick else 100_000
    if args.quiet_wait is None:
        args.quiet_wait = 0 if args.quick else 60
    if args.ceiling_runs is None:
        args.ceiling_runs = 1 if args.quick else 2
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {*SYSTEMS, "ceiling"}
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
    bench = Bench(args)
    run: dict[str, Any] = {"environment": environment(), "results": [], "ceiling": None}
    started = time.monotonic()
    try:
        with _signals_as_interrupt():
            bench.start_shared()
            # The ceiling on the tuned broker: on a stock one the subscriber, 1000
            # messages behind, loses QoS 1 messages (max_queued_messages) and never ends.
            home = "tuned" if "tuned" in args.broker else args.broker[0]
            bench.use(home)
            ceiling_runs: list[Callable[[], None]] = []
            if "ceiling" in systems:
                first = (args.ceiling_runs + 1) // 2
                run["ceiling"] = bench.ceiling(first)
                rest = args.ceiling_runs - first
                if rest:
                    ceiling_runs.append(lambda: _more_ceiling(bench, run, rest))
            for case in bench.cases:
                res: dict[str, Any] = {"case": case}
                for broker in args.broker:
                    bench.use(broker)
                    for system in (s for s in SYSTEMS if s in systems):
                        for workers in args.workers if system == "ours" else [1]:
                            label = report.label(system, broker, workers, args.broker)
                            log(f"{report.case_name(case)}: {label}")
                            res[label] = bench.run_case(case, system, workers)
                            r = res[label]
                            log(
                                f"  {r['chunks_per_s']:.0f} chunks/s, TTFC p50 "
                                f"{r['ttfc_p50_ms']} ms, p99 {r['ttfc_p99_ms']} ms (to the "
                                f"first token {r['ttfc_in_p99_ms']}, from it "
                                f"{r['ttfc_out_p99_ms']}), +lat p99 "
                                f"{r['latency_p99_ms']} ms, lost/rep/ooo "
                                f"{r['lost']}/{r['repeated']}/{r['out_of_order']}, "
                                f"err {r['errors']}"
                            )
                run["results"].append(res)
            bench.use(home)
            for more in ceiling_runs:
                more()
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        return 130
    finally:
        bench.close()
    ceiling = run["ceiling"]["msgs_per_s"] if run["ceiling"] else None
    run["targets"] = report.targets(run["results"], ceiling)
    run["seconds"] = round(time.monotonic() - started, 1)
    run["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(report.render(run))
    print(f"\n({run['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(run, indent=1))
    if args.plot:
        from bench import plot

        for path in plot.save(run, args.plot):
            print(f"chart: {path}")
    for path in bench.profiles:
        if path.exists():
            print("\n" + profile.summarize(path))
    return 0


def _more_ceiling(bench: Bench, run: dict[str, Any], runs: int) -> None:
    """Measure the ceiling again at the end, so drift during the run shows."""
    more = bench.ceiling(runs)
    run["ceiling"]["runs"].extend(more["runs"])
    run["ceiling"]["msgs_per_s"] = max(r["msgs_per_s"] for r in run["ceiling"]["runs"])
