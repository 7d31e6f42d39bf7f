"""`python -m bench.starts`: what starting API calls costs the bridge's HTTP client.

Why: at a burst of new requests the bridge's time to first chunk is the CPU of
all their starts (docs/performance.md, "Fair start"), and the largest part of a
start is the HTTP client. This measures that part alone, in one process and
without MQTT: `--starts` streamed calls at once against the mock LLM (1 token
each), first on new connections (a burst after a quiet time), then `--rounds`
times on the warm connections. It runs the bridge's own `Upstream` with its
connections in one pool (httpx's default, the baseline) and in pools of
`SHARD_CONNECTIONS` (what the bridge uses), side by side in the same run.

`--idle S` adds the first call after S seconds without any, over TLS (the mock
with a certificate of a local CA): with httpx's 5 s keep-alive the connection
is gone and the call pays a new TCP and TLS handshake; with the bridge's
`BRIDGE_UPSTREAM_KEEPALIVE` (60 s) it reuses the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.procs import HOST, free_port, python_proc, wait_port
from bridge.core.netio import SHARD_CONNECTIONS, AsyncioTransport, ShardedTransport
from bridge.core.settings import Settings
from bridge.core.upstream import Upstream

API_KEY = "sk-bench-starts-" + secrets.token_hex(6)
BODY = {"stream": True, "messages": [{"role": "user", "content": "[mock tokens=1] hi"}]}


def _transport(kind: str, connections: int) -> httpx.AsyncBaseTransport:
    if kind == "one pool":
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return AsyncioTransport(limits=limits, trust_env=False)
    return ShardedTransport.open(connections)


async def _measure(kind: str, base_url: str, starts: int, rounds: int) -> dict[str, Any]:
    settings = Settings(openai_base_url=base_url, openai_api_key=API_KEY, openai_model="m")
    connections = settings.max_streams + 8  # as the bridge sizes its client
    up = Upstream(settings, transport=_transport(kind, connections))
    written: list[float] = []

    async def one(t0: float) -> None:
        def sent() -> None:
            written.append(time.monotonic() - t0)

        async with up.stream(dict(BODY), sent=sent) as events:
            async for _event in events:
                pass

    try:
        cpu, t0 = time.process_time(), time.monotonic()
        await asyncio.gather(*[one(t0) for _ in range(starts)])
        cold_cpu = time.process_time() - cpu
        cold_last = max(written)
        cpu = time.process_time()
        for _ in range(rounds):
            t0 = time.monotonic()
            await asyncio.gather(*[one(t0) for _ in range(starts)])
        warm_cpu = time.process_time() - cpu
    finally:
        await up.aclose()
    return {
        "system": kind,
        "cold_cpu_ms": cold_cpu * 1000,
        "cold_last_written_ms": cold_last * 1000,
        "warm_us_per_call": warm_cpu / (starts * rounds) * 1e6,
    }


async def _after_idle(base_url: str, ca: Path, keepalive: float, idle: float) -> dict[str, Any]:
    """One call, `idle` seconds of nothing, then the call measured: its wall time to the
    first event and the CPU the process spent on it."""
    settings = Settings(
        openai_base_url=base_url, openai_api_key=API_KEY, openai_model="m",
        upstream_ca_file=ca, upstream_keepalive=keepalive,
    )  # fmt: skip
    up = Upstream(settings)

    async def one() -> float:
        t0 = time.monotonic()
        async with up.stream(dict(BODY)) as events:
            first = 0.0
            async for _event in events:
                first = first or time.monotonic() - t0
        return first

    try:
        await one()
        await asyncio.sleep(idle)
        cpu = time.process_time()
        first = await one()
        cpu = time.process_time() - cpu
    finally:
        await up.aclose()
    return {"first_event_ms": first * 1000, "cpu_ms": cpu * 1000}


def _idle_rows(idle: float, tmp: Path) -> None:
    from bridge.ops.tlsgen import make_certificates

    issued = make_certificates(tmp / "certs")
    port = free_port()
    mock = python_proc(
        "mock-llm-tls",
        ["bridge.dev.mock_llm", "--host", HOST, "--port", str(port), "--api-key", API_KEY,
         "--tls-cert", str(issued.server_cert), "--tls-key", str(issued.server_key)],
        tmp / "mock-tls.log",
    )  # fmt: skip
    try:
        wait_port(port, proc=mock.proc)
        url = f"https://localhost:{port}/v1"
        print(f"\nthe first call after {idle:g} s without any, over TLS ({url})")
        print(f"{'keep-alive':>10}  {'to first event ms':>17} {'CPU ms':>7}")
        for keepalive in (5.0, Settings.model_fields["upstream_keepalive"].default):
            r = asyncio.run(_after_idle(url, issued.ca_cert, keepalive, idle))
            print(f"{keepalive:>9g}s  {r['first_event_ms']:>17.1f} {r['cpu_ms']:>7.1f}")
    finally:
        mock.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.starts", description=__doc__)
    ap.add_argument("--starts", default="100,500", help="calls at once, comma-separated")
    ap.add_argument("--rounds", type=int, default=10, help="warm rounds per size")
    ap.add_argument(
        "--idle", type=float, default=0.0, metavar="S",
        help="also time the first call after S s idle over TLS, keep-alive 5 s vs the bridge's",
    )  # fmt: skip
    args = ap.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-starts-") as tmp:
        mock = python_proc(
            "mock-llm",
            ["bridge.dev.mock_llm", "--host", HOST, "--port", str(port), "--api-key", API_KEY],
            Path(tmp) / "mock.log",
        )
        try:
            wait_port(port, proc=mock.proc)
            base_url = f"http://{HOST}:{port}/v1"
            print(f"pools of {SHARD_CONNECTIONS} against one pool; mock LLM on {base_url}")
            print(f"{'starts':>6}  {'system':<12} {'burst CPU ms':>12} {'last written ms':>15}"
                  f" {'warm µs/call':>12}")  # fmt: skip
            for n in (int(x) for x in args.starts.split(",")):
                for kind in ("one pool", f"pools of {SHARD_CONNECTIONS}"):
                    r = asyncio.run(_measure(kind, base_url, n, args.rounds))
                    cold, last = r["cold_cpu_ms"], r["cold_last_written_ms"]
                    print(f"{n:>6}  {kind:<12} {cold:>12.0f} {last:>15.0f} "
                          f"{r['warm_us_per_call']:>12.0f}")  # fmt: skip
        finally:
            mock.stop()
        if args.idle > 0:
            _idle_rows(args.idle, Path(tmp))


if __name__ == "__main__":
    main()
