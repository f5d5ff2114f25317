"""Benchmark outputs: a markdown table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

COLUMNS = [
    ("system", "system"),
    ("concurrency", "clients"),
    ("requests", "requests"),
    ("tokens_per_s", "tok/s"),
    ("tokens_per_s_range", "tok/s range (rounds)"),
    ("requests_per_s", "req/s"),
    ("latency_p50_s", "p50 latency s"),
    ("latency_p95_s", "p95 latency s"),
    ("ttft_p50_s", "p50 TTFT s"),
    ("ttft_p95_s", "p95 TTFT s"),
    ("itl_p50_s", "p50 ITL s"),
    ("itl_p95_s", "p95 ITL s"),
    ("step_p50_s", "median step s"),
    ("mean_batch_rows", "mean batch rows"),
    ("peak_kv_mb", "peak KV MB"),
    ("tokens_per_cpu_s", "tok per CPU s"),
    ("other_cores_busy", "other jobs (cores busy)"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        row = {**row, "peak_kv_mb": round(row["peak_kv_bytes"] / 1e6, 1) if row.get("peak_kv_bytes") else None}
        if row.get("tokens_per_s_range"):
            low, high = row["tokens_per_s_range"]
            row["tokens_per_s_range"] = f"{low}-{high} ({row['rounds']})"
        lines.append("| " + " | ".join("" if row.get(k) is None else str(row[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (system, clients): the run with the median tokens/s (the lower middle for an even count of
    rounds), with the range over rounds when there was more than one."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["concurrency"]), []).append(row)
    table = []
    for runs in groups.values():
        speeds = sorted(r["tokens_per_s"] for r in runs)
        middle = statistics.median_low(speeds)
        row = {k: v for k, v in next(r for r in runs if r["tokens_per_s"] == middle).items() if k != "round"}
        row["rounds"] = len(runs)
        if len(runs) > 1:
            row["tokens_per_s_range"] = [speeds[0], speeds[-1]]
        table.append(row)
    return table


def ratios_table(ratios: dict[str, float | None], ranges: dict[str, list[float]] | None = None) -> str:
    """Ratios of tokens/s; with `ranges` (several rounds) the value is the median of the rounds' ratios."""
    ranges = ranges or {}
    lines = ["| ratio (tokens/s) | value | range over rounds |", "|---|---|---|"]
    for name, value in ratios.items():
        spread = f"{ranges[name][0]:.2f}-{ranges[name][1]:.2f}x" if name in ranges else ""
        lines.append(f"| {name} | {'n/a' if value is None else f'{value:.2f}x'} | {spread} |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Throughput and p95 latency against concurrency, one line per system (a single point for one-off runs)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to a file
    import matplotlib.pyplot as plt

    systems = sorted({r["system"] for r in rows}, key=[r["system"] for r in rows].index)
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in systems:
        points = sorted((r for r in rows if r["system"] == system), key=lambda r: r["concurrency"])
        x = [p["concurrency"] for p in points]
        throughput.plot(x, [p["tokens_per_s"] for p in points], marker="o", label=system)
        latency.plot(x, [p["latency_p95_s"] for p in points], marker="o", label=system)
    concurrencies = sorted({r["concurrency"] for r in rows})
    for axis, label in ((throughput, "generated tokens / s"), (latency, "p95 latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    throughput.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
