"""Turning raw measurements into the table, the ratios and the targets' PASS/MISS.

Why separate: the numbers are computed once here, the same way for every
system, and printed and saved from the same dictionaries.
"""

from __future__ import annotations

from typing import Any

KB = 1024


def percentile(values: list[int] | list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0-100) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return float(ordered[int(rank) - 1])


def quantiles(values: list[int] | list[float], scale: float = 1.0) -> list[float]:
    """The nearest-rank percentiles 0, 1, ..., 100 of `values` (times `scale`): the
    distribution in 101 numbers, from which `--plot` draws its CDF; [] when empty."""
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered)
    return [round(ordered[max(1, -(-n * q // 100)) - 1] * scale, 3) for q in range(101)]


def summarize(raw: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """The figures of one (case, system) run, from the load generators' merged results."""
    wall_s = max(raw["last_end_ns"] - raw["first_sent_ns"], 1) / 1e9
    ms = 1e-6
    ttfc = raw["ttfc_ns"]
    lat = raw["latency_ns"]

    def pct(values: list[int], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(v * ms, 3)

    return {
        "requests": raw["requests"],
        "finished": raw["finished"],
        "unfinished": raw["requests"] - raw["finished"],
        "errors": raw["error_count"],
        "error_codes": raw["errors"],
        "chunks": raw["chunks"],
        "tokens": raw["tokens"],
        "expected_tokens": raw["expected_tokens"],
        "wall_s": round(wall_s, 3),
        "chunks_per_s": round(raw["chunks"] / wall_s, 1),
        "ttfc_p50_ms": pct(ttfc, 50),
        "ttfc_p99_ms": pct(ttfc, 99),
        # the two parts of TTFC, split at the mock's stamp on the first token
        "ttfc_in_p99_ms": pct(raw.get("ttfc_in_ns", []), 99),
        "ttfc_out_p99_ms": pct(raw.get("ttfc_out_ns", []), 99),
        "latency_p50_ms": pct(lat, 50),
        "latency_p99_ms": pct(lat, 99),
        "latency_samples": len(lat),
        "ttfc_cdf_ms": quantiles(ttfc, ms),
        "latency_cdf_ms": quantiles(lat, ms),
        "lost": raw["lost"],
        "repeated": raw["repeated"],
        "out_of_order": raw["out_of_order"],
        "strays": raw["strays"],
        "failure": raw["failure"],
        **usage,
    }


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def label(system: str, broker: str, workers: int, brokers: list[str]) -> str:
    """A system's name in the table: `ours`, `ours-w2` (2 workers), `/stock` on stock Mosquitto
    when the run has both brokers (or only stock)."""
    name = system if workers == 1 else f"{system}-w{workers}"
    return f"{name}/stock" if broker == "stock" else name


def systems_of(res: dict[str, Any]) -> list[str]:
    """The labels measured for one case, in the order they ran."""
    return [k for k in res if k != "case"]


def case_name(case: dict[str, Any]) -> str:
    return f"C={case['streams']} {case['tokens']}tok {case['delay_ms']}ms"


HEADER = (
    f"{'case':<21} {'system':<14} {'req':>5} {'chunks/s':>9} {'TTFC p50/p99 ms':>16} "
    f"{'+lat p50/p99 ms':>16} {'CPU s':>6} {'us/chunk':>8} {'ms/req':>6} {'RSS MB':>7} "
    f"{'lost/rep/ooo':>12} {'err':>4} {'load%':>5} {'other':>5}"
)


def cpu_per_chunk_us(r: dict[str, Any]) -> float | None:
    """The system's CPU time per chunk delivered, in microseconds (all its processes)."""
    return r["cpu_s"] * 1e6 / r["chunks"] if r.get("chunks") else None


def cpu_per_request_ms(r: dict[str, Any]) -> float | None:
    return r["cpu_s"] * 1e3 / r["finished"] if r.get("finished") else None


def row(case: dict[str, Any], system: str, r: dict[str, Any]) -> str:
    ttfc = f"{_f(r['ttfc_p50_ms'])}/{_f(r['ttfc_p99_ms'])}"
    lat = f"{_f(r['latency_p50_ms'])}/{_f(r['latency_p99_ms'])}"
    integrity = f"{r['lost']}/{r['repeated']}/{r['out_of_order']}"
    err = r["errors"] + r["unfinished"]
    return (
        f"{case_name(case):<21} {system:<14} {r['requests']:>5} {r['chunks_per_s']:>9.0f} "
        f"{ttfc:>16} {lat:>16} {r['cpu_s']:>6.1f} {_f(cpu_per_chunk_us(r)):>8} "
        f"{_f(cpu_per_request_ms(r), 2):>6} {r['peak_rss_kb'] / KB:>7.1f} "
        f"{integrity:>12} {err:>4} {r['load_cpu_pct']:>5.0f} {r['other_cpu_per_s']:>5.2f}"
    )


def _find(results: list[dict[str, Any]], pred: Any, key: Any) -> dict[str, Any] | None:
    found = [r for r in results if pred(r["case"])]
    return max(found, key=lambda r: key(r["case"])) if found else None


def targets(results: list[dict[str, Any]], ceiling: float | None) -> list[dict[str, Any]]:
    """The issue's targets, each judged on the case that asks for it (or its nearest stand-in).

    In a run without the exact case (e.g. `--quick`), the stand-in is the case
    with the most streams of the same kind and the row says which it was.
    """
    out: list[dict[str, Any]] = []

    def add(name: str, res: dict[str, Any] | None, value: float | None, fmt: str, ok: Any) -> None:
        out.append(
            {
                "target": name,
                "case": case_name(res["case"]) if res else "-",
                "value": value,
                "shown": "-" if value is None else fmt.format(value),
                "result": "n/a" if value is None else ("PASS" if ok(value) else "MISS"),
            }
        )

    big = _find(results, lambda c: c["delay_ms"] == 0, lambda c: c["streams"])
    ours = big and big.get("ours")
    base = big and big.get("baseline")
    add(
        "chunks/s >= 3x baseline (C=500, 0 ms)",
        big,
        _ratio(ours and ours["chunks_per_s"], base and base["chunks_per_s"]),
        "{:.2f}x",
        lambda v: v >= 3,
    )
    add(
        "chunks/s >= 50% of broker ceiling (C=500, 0 ms)",
        big,
        _ratio(ours and ours["chunks_per_s"], ceiling),
        "{:.0%}",
        lambda v: v >= 0.5,
    )
    lat = _find(
        results,
        lambda c: c["delay_ms"] > 0,
        lambda c: (c["streams"] == 100, -abs(c["streams"] - 100)),
    )
    lat_ours = lat and lat.get("ours")
    add(
        "p99 added latency per chunk < 5 ms (C=100, 20 ms)",
        lat,
        lat_ours and lat_ours["latency_p99_ms"],
        "{:.2f} ms",
        lambda v: v < 5,
    )
    one = _find(results, lambda c: c["streams"] == 1, lambda c: -c["delay_ms"])
    one_ours = one and one.get("ours")
    add(
        "time to first chunk p99 < 10 ms (C=1, 0 ms)",
        one,
        one_ours and one_ours["ttfc_p99_ms"],
        "{:.2f} ms",
        lambda v: v < 10,
    )
    small = _find(
        results, lambda c: c["delay_ms"] == 0 and c["streams"] == 1, lambda c: c["tokens"]
    )
    grow: float | None = None
    extra_streams = big["case"]["streams"] - small["case"]["streams"] if big and small else 0
    if big and small and extra_streams > 0 and big.get("ours") and small.get("ours"):
        grow = (big["ours"]["peak_rss_kb"] - small["ours"]["peak_rss_kb"]) / extra_streams
    add(
        "peak RSS growth < 50 KB per stream (C=1 -> C=500, 0 ms)",
        big,
        grow,
        "{:.1f} KB",
        lambda v: v < 50,
    )
    stock = big and big.get("ours/stock")
    add(
        "stock broker chunks/s >= 90% of tuned (C=500, 0 ms)",
        big,
        _ratio(stock and stock["chunks_per_s"], ours and ours["chunks_per_s"]),
        "{:.0%}",
        lambda v: v >= 0.9,
    )
    lat_stock = lat and lat.get("ours/stock")
    add(
        "stock broker: TTFC p99 < 100 ms (C=100, 20 ms)",
        lat,
        lat_stock and lat_stock["ttfc_p99_ms"],
        "{:.1f} ms",
        lambda v: v < 100,
    )
    base_stock = lat and lat.get("baseline/stock")
    add(
        "stock broker: TTFC p99 below the naive bridge's (C=100, 20 ms)",
        lat,
        _ratio(lat_stock and lat_stock["ttfc_p99_ms"], base_stock and base_stock["ttfc_p99_ms"]),
        "{:.2f}x",
        lambda v: v < 1,
    )
    two = big and big.get("ours-w2")
    add(
        "2 workers / 1 worker chunks/s (C=500, 0 ms; 2 cores shared)",
        big,
        _ratio(two and two["chunks_per_s"], ours and ours["chunks_per_s"]),
        "{:.2f}x",
        lambda v: v > 1,
    )
    return out


def render(run: dict[str, Any]) -> str:
    """The whole printed report."""
    lines: list[str] = []
    env = run["environment"]
    lines.append(
        f"bench: {env['cpus']} CPUs ({env['cpu_model']}), Python {env['python']}, "
        f"paho {env['paho']}, openai {env['openai']}, {env['mosquitto']}, commit {env['commit']}"
    )
    lines.append("")
    lines.append(HEADER)
    lines.append("-" * len(HEADER))
    for res in run["results"]:
        for system in systems_of(res):
            lines.append(row(res["case"], system, res[system]))
    ceil = run.get("ceiling")
    if ceil:
        runs = ", ".join(
            f"{c['msgs_per_s']:.0f} (other {c['other_cpu_per_s']:.2f})" for c in ceil["runs"]
        )
        lines.append(
            f"{'broker ceiling':<21} {'paho':<9} {ceil['count']:>5} {ceil['msgs_per_s']:>9.0f}"
            f"  msgs/s, QoS {ceil['qos']}, {ceil['payload_bytes']} B payloads, 1 publisher"
            f" -> 1 subscriber"
        )
        lines.append(f"{'':<21} runs: {runs}")
    lines.append("")
    ceiling = ceil["msgs_per_s"] if ceil else None
    lines.append(
        f"{'case':<21} {'ours/baseline':>14} {'ours/ceiling':>13} {'baseline/ceiling':>17}"
    )
    for res in run["results"]:
        o, b = res.get("ours"), res.get("baseline")
        ob = _ratio(o and o["chunks_per_s"], b and b["chunks_per_s"])
        oc = _ratio(o and o["chunks_per_s"], ceiling)
        bc = _ratio(b and b["chunks_per_s"], ceiling)
        lines.append(
            f"{case_name(res['case']):<21} {_f(ob, 2) + 'x':>14} "
            f"{'-' if oc is None else f'{oc:.0%}':>13} {'-' if bc is None else f'{bc:.0%}':>17}"
        )
    lines.append("")
    lines.append(f"{'target':<64} {'case':<21} {'measured':>10}  result")
    for t in run["targets"]:
        lines.append(f"{t['target']:<64} {t['case']:<21} {t['shown']:>10}  {t['result']}")
    bad = [
        f"{case_name(res['case'])} {system}"
        for res in run["results"]
        for system in systems_of(res)
        if res.get(system)
        and (
            res[system]["lost"]
            or res[system]["repeated"]
            or res[system]["out_of_order"]
            or res[system]["errors"]
            or res[system]["unfinished"]
        )
    ]
    lines.append("")
    lines.append(
        "integrity: every chunk delivered once, in order"
        if not bad
        else f"INTEGRITY FAILURES: {'; '.join(bad)}"
    )
    hot = [
        f"{case_name(res['case'])} {system} ({res[system]['load_cpu_pct']:.0f}%)"
        for res in run["results"]
        for system in systems_of(res)
        if res.get(system) and res[system]["load_max_proc_pct"] >= 90
    ]
    if hot:
        lines.append(
            "warning: a load generator process used >= 90% of a core in: "
            + "; ".join(hot)
            + " (it may have limited the rate; try --load-procs 2)"
        )
    merged = [
        f"{case_name(res['case'])} {system}"
        for res in run["results"]
        for system in systems_of(res)
        if res.get(system) and res[system]["chunks"] != res[system]["tokens"]
    ]
    if merged:
        lines.append(
            "note: these systems merged tokens into fewer chunks, so chunks/s is not comparable"
            " as is: " + "; ".join(merged)
        )
    noisy = [
        f"{case_name(res['case'])} {system} ({res[system]['other_cpu_per_s']:.2f})"
        for res in run["results"]
        for system in systems_of(res)
        if res.get(system) and res[system]["other_cpu_per_s"] >= 0.2
    ]
    if noisy:
        lines.append(
            "warning: other work on the machine used >= 0.2 core during: "
            + "; ".join(noisy)
            + " (figures of those cases are disturbed)"
        )
    return "\n".join(lines)
