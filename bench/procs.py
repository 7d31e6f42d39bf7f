"""Processes the benchmark starts, and what /proc says about them.

Why: every process must be stopped at the end whatever happens (error,
Ctrl-C, the bench itself killed), and CPU and memory are read from /proc
rather than through a dependency.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from bridge.ops.brokerconf import acl_text, render_config
from bridge.ops.passwords import password_line

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on `port` (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:g} s")


def _die_with_parent() -> None:
    """Run in the child before exec: get SIGTERM if the bench dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Proc:
    """A child process with its output in a log file, stopped by `stop()` only by its pid.

    Children run in their own session, so a Ctrl-C in the terminal reaches
    only the bench, which then stops them in order.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        *,
        stdin: int | None = None,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        # The caller's own bridge settings must not leak into what is measured.
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(REPO)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            args,
            cwd=log_path.parent,
            env=full_env,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (started from the main thread only)
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        """The end of the process's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; idempotent."""
        p = self.proc
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                stream.close()
        self._log.close()
        return p.returncode


def python_proc(name: str, module_args: list[str], log_path: Path, **kw: object) -> Proc:
    """`python -m ...` with this interpreter."""
    return Proc(name, [sys.executable, "-m", *module_args], log_path, **kw)  # type: ignore[arg-type]


#: The lines of broker/mosquitto.conf that tune Mosquitto for the bridge; `--broker stock`
#: leaves them out, so Mosquitto runs with its defaults there (20 messages in flight per
#: client, 1000 queued, Nagle's algorithm on), as most users' brokers do.
TUNING = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages",
          "max_inflight_bytes", "set_tcp_nodelay")  # fmt: skip


def worker_acl(acl: str, users: list[str]) -> str:
    """An ACL with the `user bridge` block copied for each further bridge worker user."""
    m = re.search(r"^user bridge\n(.*?)(?=^user |\Z)", acl, re.S | re.M)
    if m is None:
        raise ValueError("the ACL has no `user bridge` block")
    rules = "".join(x + "\n" for x in m.group(1).splitlines() if x.startswith("topic "))
    return acl + "".join(f"\nuser {u}\n{rules}" for u in users)


class Broker:
    """Mosquitto with the project's broker/ config (rendered), its ACL and our users.

    `stock`: without the project's tuning lines (`TUNING`).
    """

    def __init__(
        self, workdir: Path, users: dict[str, str], prefix: str = "llm", *, stock: bool = False
    ) -> None:
        self.dir = workdir
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.users = users
        self.stock = stock
        workers = sorted(u for u in users if re.fullmatch(r"bridge-\d+", u))
        (self.dir / "acl").write_text(worker_acl(acl_text(prefix), workers))
        passwd = self.dir / "passwd"
        passwd.write_text("".join(password_line(u, pw) for u, pw in users.items()))
        passwd.chmod(0o600)
        conf = render_config(
            config_dir=self.dir,
            data_dir=self.dir / "data",
            ports={1883: self.port},
            log_file=self.dir / "mosquitto.log",
            run_as=getpass.getuser() if os.geteuid() == 0 else None,
        )
        if stock:
            conf = "".join(line + "\n" for line in conf.splitlines() if not line.startswith(TUNING))
        (self.dir / "mosquitto.conf").write_text(conf)
        self.proc: Proc | None = None

    def start(self, binary: str) -> Broker:
        self.proc = Proc(
            "mosquitto", [binary, "-c", str(self.dir / "mosquitto.conf")], self.dir / "stderr.log"
        )
        wait_port(self.port, proc=self.proc.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


# --------------------------------------------------------------------------- /proc


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a system under test may run worker processes)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo and len(out) < 10_000:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of one process, in KiB."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Usage:
    """CPU seconds and peak RSS of a process tree between `begin()` and the last `sample()`.

    Why sampling: processes of the tree may start during the case (workers),
    so the tree is walked again at each sample; a process that vanished keeps
    its last reading.
    """

    def __init__(self, pid: int, *, tree: bool = True) -> None:
        self.pid = pid
        self.tree = tree
        self._start: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._hwm: dict[int, int] = {}

    def _pids(self) -> list[int]:
        return process_tree(self.pid) if self.tree else [self.pid]

    def begin(self) -> None:
        for p in self._pids():
            t = cpu_ticks(p)
            if t is not None:
                self._start[p] = t
                self._last[p] = t
        self.sample()

    def sample(self) -> None:
        for p in self._pids():
            t = cpu_ticks(p)
            h = vm_hwm_kb(p)
            if t is not None:
                self._start.setdefault(p, 0)  # born during the case: all its CPU counts
                self._last[p] = t
            if h is not None:
                self._hwm[p] = max(self._hwm.get(p, 0), h)

    @property
    def cpu_s(self) -> float:
        return sum(self._last[p] - self._start[p] for p in self._last) / CLK_TCK

    @property
    def peak_rss_kb(self) -> int:
        """Sum of each process's VmHWM (exact for one process, an upper bound for several)."""
        return sum(self._hwm.values())

    @property
    def processes(self) -> int:
        return len(self._last)


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy (user, nice, system) and stolen, from /proc/stat.

    Why: other work on a shared machine shows as busy time none of our
    processes account for; the report shows it so a disturbed run is seen.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system = (int(x) for x in fields[:3])
    steal = int(fields[7]) if len(fields) > 7 else 0
    return (user + nice + system) / CLK_TCK, steal / CLK_TCK


class TcpProxy:
    """A TCP proxy on loopback, to a broker or Redis: it can hold each piece of data
    `delay` seconds (a LAN), drop its connections (`drop`), and refuse new ones until
    `mend()` (`cut`: a network cut, one way). `sent` logs what clients sent."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.target, self.delay = port, delay
        self.srv = socket.create_server((HOST, 0))
        self.port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.sent = bytearray()
        self.accepted = 0
        self.refusing = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
            except OSError:
                return
            try:
                if self.refusing:
                    raise ConnectionRefusedError
                upstream = socket.create_connection((HOST, self.target))
            except OSError:  # cut, or the server is away: so is this connection
                client.close()
                continue
            with self.lock:
                self.accepted += 1
                self.conns += [client, upstream]
            for a, b, log in ((client, upstream, self.sent), (upstream, client, None)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._pump, args=(a, b, log), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, log: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                if log is not None:
                    log += data
                if self.delay:
                    time.sleep(self.delay)
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self.refusing = True
        self.drop()

    def mend(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.srv.close()
        self.drop()
