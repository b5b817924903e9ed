"""The README's chart of a benchmark run: ratios ours/baseline against their targets, and latencies."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

# Per scenario, the ratios worth a bar (the targets' metrics and the stable CPU figure).
RATIO_BARS = {
    "idle_tls": ["rss_per_conn_kib", "idle_cpu_s"],
    "dm_relay_tls": ["deliveries_per_s", "cpu_per_delivery_us"],
    "paced_latency_tls": ["p99_ms", "cpu_per_delivery_us"],
    "broadcast_tls": ["deliveries_per_s", "cpu_per_delivery_us", "presence_per_s"],
    "reconnect_storm": ["back_after_start_s", "storm_p99_ms"],
    "offline_backlog": ["store_per_s", "deliver_per_s"],
    "p2p_direct": ["bulk_mb_per_s", "rtt_p99_ms"],
}
# The absolute latency targets for our server, in ms.
TARGET_MS = {
    ("paced_latency_tls", "p50_ms"): 1.5,
    ("paced_latency_tls", "p99_ms"): 5.0,
    ("reconnect_storm", "storm_p99_ms"): 20.0,
    ("p2p_direct", "rtt_p99_ms"): 2.0,
}
LATENCY_BARS = {
    "paced_latency_tls": ["p50_ms", "p99_ms"],
    "reconnect_storm": ["calm_p99_ms", "storm_p99_ms"],
    "p2p_direct": ["rtt_p50_ms", "rtt_p99_ms"],
}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def write_chart(results: dict, path: Path) -> None:
    scenarios = results["scenarios"]
    labels, values, colours = [], [], []
    for name, metrics in RATIO_BARS.items():
        entry = scenarios.get(name)
        if not entry:
            continue
        for metric in metrics:
            ratio = entry["ratio"].get(metric)
            if not _finite(ratio):
                continue
            target = next((t for t in entry["targets"] if t["metric"] == metric and t["of"] == "ratio"), None)
            better = "higher" if metric.endswith("_per_s") else "lower"
            labels.append(f"{name}\n{metric} ({better} is better)")
            values.append(ratio)
            colours.append("grey" if target is None else ("tab:green" if target["met"] else "tab:red"))

    latency_labels, ours_ms, base_ms, bounds = [], [], [], []
    for name, metrics in LATENCY_BARS.items():
        entry = scenarios.get(name)
        if not entry:
            continue
        for metric in metrics:
            ours, base = entry["ours"].get(metric), entry["baseline"].get(metric)
            if _finite(ours):
                latency_labels.append(f"{name}\n{metric}")
                ours_ms.append(ours)
                base_ms.append(base if _finite(base) else math.nan)
                bounds.append(TARGET_MS.get((name, metric)))

    figure, (left, right) = plt.subplots(
        1, 2, figsize=(14, max(4, 0.45 * max(len(labels), len(latency_labels)) + 2)),
        gridspec_kw={"width_ratios": [3, 2]},
    )
    machine = results.get("machine", {})
    figure.suptitle(
        f"p2pchat benchmark ({results.get('run', {}).get('mode', '?')}, medians of "
        f"{results.get('run', {}).get('rounds', '?')} interleaved rounds) on {machine.get('cores', '?')} cores "
        f"{machine.get('cpu', '')}",
        fontsize=10,
    )
    _ratio_panel(left, labels, values, colours)
    _latency_panel(right, latency_labels, ours_ms, base_ms, bounds)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _ratio_panel(axes, labels: list[str], values: list[float], colours: list[str]) -> None:
    if not labels:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no ratios in this run", ha="center", transform=axes.transAxes)
        return
    positions = range(len(labels))
    axes.barh(positions, values, color=colours)
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    # Within about one decade matplotlib labels the minor ticks too, and they overlap.
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("ours / baseline (log scale; green: target met, red: missed, grey: no target)")
    for y, value in zip(positions, values):
        axes.annotate(f"{value:.2f}x", (value, y), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=7)


def _latency_panel(axes, labels: list[str], ours_ms: list[float], base_ms: list[float],
                   bounds: list[float | None]) -> None:
    if not labels:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no latency figures in this run", ha="center", transform=axes.transAxes)
        return
    positions = range(len(labels))
    axes.barh([p - 0.2 for p in positions], ours_ms, height=0.4, label="ours")
    axes.barh([p + 0.2 for p in positions], base_ms, height=0.4, label="baseline")
    for y, bound in zip(positions, bounds):
        if bound is not None:
            axes.plot([bound, bound], [y - 0.45, y + 0.45], color="black", linewidth=1.5)
    for y, value in zip(positions, ours_ms):
        axes.annotate(f"{value:.3g}", (value, y - 0.2), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=7)
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("milliseconds (log scale; black mark: our target)")
    axes.legend(fontsize=8)
