"""`python -m bench.store`: how long a request's shared-store calls hold the event loop.

Why: in a worker group every request talks to the shared store (Redis) from
the event loop: its duplicate claim and hold, the group's counters, the
device's busy count. Each call is a round trip; with Redis on another host
each one stops every stream of the worker for that long. This runs the
calls a request makes in a group with default settings (`bridge/core/service.py`
and `bridge/plugins/state.py`), through the bridge's own `Guarded` and
`RedisStore`, against a real `redis-server`: directly on loopback, and
through a proxy that delays each direction by half of `--rtt-ms` (Redis on a
LAN), and with the SQLite store of workers on one host. Each with the writes
nobody waits for made on the loop (the baseline) and by the store's writer
thread (what the bridge does), in the same run.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.procs import HOST, TcpProxy, free_port, wait_port
from bridge.core.shared import Guarded, Held, RedisStore, SqliteStore, Store


def one_request(g: Guarded, worker: str, i: int) -> None:
    """The store calls of one request that ends `done`, in the bridge's order."""
    device, key, busy = f"d{i % 50}", f"r{i}", f"busy:d{i % 50}"
    held = Held(device, key, f"llm/{device}/res/{key}", None)
    g.take(worker, held, b"digest", time.time(), 600)  # Bridge.submit: claimed and held
    g.add_counts({"requests": 1})  # StatePlugin.started
    g.open_stream(busy, key, "t", worker, 0)
    g.unhold(worker, device, key)  # Bridge._end
    g.add_counts({"errors": 0, "tokens_total": 12})  # StatePlugin.finished
    g.close_stream(busy, key, "t")  # and how many still run


def measure(make: Callable[[], Store], defer: bool, requests: int) -> float:
    """Seconds the caller spent in the store's calls, per request."""
    g = Guarded(make(), "w1", defer=defer)
    for i in range(10):  # connections made, scripts loaded
        one_request(g, "w1", -1 - i)
    g.flush()
    spent = 0.0
    for i in range(requests):
        start = time.perf_counter()
        one_request(g, "w1", i)
        spent += time.perf_counter() - start
    g.close()
    return spent / requests


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rtt-ms", type=float, default=0.5, help="round trip to Redis on a LAN")
    args = ap.parse_args()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    proxy = None
    try:
        wait_port(port)
        proxy = TcpProxy(port, delay=args.rtt_ms / 2000)  # half of it each way
        folder = Path(tempfile.mkdtemp(prefix="bench-store-"))

        def redis_at(p: int) -> Callable[[], Store]:
            return lambda: RedisStore(f"redis://{HOST}:{p}/0", "b" + secrets.token_hex(4), 5)

        ways = [
            ("Redis on loopback", redis_at(port)),
            (f"Redis +{args.rtt_ms:g} ms round trip", redis_at(proxy.port)),
            ("SQLite (one host)", lambda: SqliteStore(folder / f"{secrets.token_hex(4)}.db")),
        ]
        print(f"{'store':<28} {'writes on the loop':>20} {'writer thread':>16} {'ratio':>7}")
        for name, make in ways:
            on_loop = measure(make, False, args.requests)
            deferred = measure(make, True, args.requests)
            print(f"{name:<28} {on_loop * 1e6:>17.0f} µs {deferred * 1e6:>13.0f} µs"
                  f" {deferred / on_loop:>7.2f}")  # fmt: skip
        print("(time a request's store calls hold the event loop, per request)")
    finally:
        if proxy is not None:
            proxy.close()
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    main()
