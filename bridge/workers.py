"""`llm-bridge run --workers N`: N bridge processes of one group on this host, kept running.

Python runs one event loop on one core; a second core needs a second process.
Each worker is a whole bridge with its own MQTT client id (and broker user, as
a broker with `use_username_as_clientid` requires), joined to the group's
shared subscription (docs/scaling.md). A worker that dies is started again at
once under the same id: the broker keeps the requests it assigned to that
session while the worker was away and delivers them to the new process, which
also reads the dead one's journal and answers its interrupted requests.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from bridge.core.group import worker_name, worker_url

log = logging.getLogger("bridge.workers")

#: Seconds between two starts of the same worker (a worker that cannot start
#: at all must not spin the host).
RESTART_DELAY = 1.0


def worker_env(
    env: dict[str, str], index: int, group: str, client_id: str, url: str
) -> dict[str, str]:
    out = dict(env)
    out["BRIDGE_GROUP"] = group
    out["BRIDGE_CLIENT_ID"] = worker_name(client_id, index)
    out["BRIDGE_MQTT_URL"] = worker_url(url, index, env)
    return out


def supervise(  # noqa: PLR0913  # the group, its users and the worker command
    count: int,
    group: str,
    client_id: str,
    mqtt_url: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
) -> int:
    """Run `count` workers until SIGTERM or SIGINT; restart any that exits meanwhile."""
    base_env = dict(os.environ if env is None else env)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    stopping = False

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(i: int) -> None:
        e = worker_env(base_env, i, group, client_id, mqtt_url)
        procs[i] = subprocess.Popen([sys.executable, "-m", "bridge", "run", *argv], env=e)
        started[i] = time.monotonic()
        log.info("worker %s started (pid %d)", e["BRIDGE_CLIENT_ID"], procs[i].pid)

    for i in range(1, count + 1):
        start(i)
    while not stopping:
        time.sleep(0.2)
        for i, proc in list(procs.items()):
            rc = proc.poll()
            if rc is None or stopping:
                continue
            name = worker_name(client_id, i)
            log.error("worker %s exited with %s; starting it again", name, rc)
            wait = RESTART_DELAY - (time.monotonic() - started[i])
            if wait > 0:
                time.sleep(wait)
            start(i)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    status = 0
    for proc in procs.values():
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        status = status or (proc.returncode if proc.returncode and proc.returncode > 0 else 0)
    return status
