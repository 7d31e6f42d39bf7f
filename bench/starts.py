"""`python -m bench.starts`: what starting API calls costs the bridge's HTTP client.

Why: at a burst of new requests the bridge's time to first chunk is the CPU of
all their starts (docs/performance.md, "Fair start"), and the largest part of a
start is the HTTP client. This measures that part alone, in one process and
without MQTT: `--starts` streamed calls at once against the mock LLM (1 token
each), first on new connections (a burst after a quiet time), then `--rounds`
times on the warm connections. It runs the bridge's own `Upstream` with its
connections in one pool (httpx's default, the baseline) and in pools of
`SHARD_CONNECTIONS` (what the bridge uses), side by side in the same run.
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.starts", description=__doc__)
    ap.add_argument("--starts", default="100,500", help="calls at once, comma-separated")
    ap.add_argument("--rounds", type=int, default=10, help="warm rounds per size")
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


if __name__ == "__main__":
    main()
