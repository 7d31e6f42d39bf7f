"""`python -m bench --plot DIR`: the run's figures as PNG charts (matplotlib).

One chart per measure (chunks/s, time to first chunk p99, CPU per chunk), a
group of bars per case and one bar per system, so stock against tuned Mosquitto
and one worker against two are side by side as in the table. And the latency
distributions: for the time to first chunk and for the added latency per
chunk, one panel per case with one CDF per system (from the percentiles 0-100
the run keeps of each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report

CHARTS = (
    ("chunks_per_s", "chunks/s", "chunks per second (higher is better)"),
    ("ttfc_p99_ms", "ms", "time to first chunk, p99 (lower is better)"),
    ("cpu_per_chunk_us", "µs", "CPU per chunk of the system under test (lower is better)"),
)


CDFS = (
    ("ttfc_cdf_ms", "time to first chunk"),
    ("latency_cdf_ms", "added latency per chunk (API token -> device)"),
)


def _value(r: dict[str, Any], key: str) -> float:
    if key == "cpu_per_chunk_us":
        return report.cpu_per_chunk_us(r) or 0.0
    return float(r.get(key) or 0.0)


def save(run: dict[str, Any], out: Path) -> list[Path]:
    """Write one PNG per chart into `out`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    results = run["results"]
    labels = list(dict.fromkeys(s for res in results for s in report.systems_of(res)))
    cases = [report.case_name(res["case"]) for res in results]
    paths = []
    width = 0.8 / max(len(labels), 1)
    for key, unit, title in CHARTS:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
        for i, name in enumerate(labels):
            xs = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(cases))]
            ys = [_value(res[name], key) if res.get(name) else 0.0 for res in results]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(cases)), cases, rotation=15)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    for key, title in CDFS:
        name = key.removesuffix("_ms")
        paths.append(_cdf(plt, results, labels, key=key, title=title, path=out / f"{name}.png"))
    return paths


def _cdf(
    plt: Any, results: list[dict[str, Any]], labels: list[str], *, key: str, title: str, path: Path
) -> Path:
    """One panel per case, a CDF per system; the x axis is logarithmic (ms)."""
    cols = min(3, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    fractions = [q / 100 for q in range(101)]
    for ax, res in zip(axes.flat, results, strict=False):
        for name in labels:
            values = (res.get(name) or {}).get(key) or []
            if values:
                ax.step([max(v, 0.01) for v in values], fractions, where="post", label=name)
        ax.set_xscale("log")
        ax.set_title(report.case_name(res["case"]), fontsize="medium")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    axes.flat[0].set_ylabel("fraction")
    axes.flat[0].legend(fontsize="x-small")
    fig.suptitle(f"{title}: CDF (left and higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
