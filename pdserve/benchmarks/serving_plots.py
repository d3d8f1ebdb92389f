"""Plots of serving results files: latency percentiles and goodput against request rate (one line per run),
and the server-reported phases per run and rate as stacked bars. Needs matplotlib; without it nothing is drawn
and a line says so (the JSON holds every figure)."""

from __future__ import annotations

import json
import math
from collections import defaultdict

from pdserve.benchmarks.plots import pyplot_or_none
from pdserve.benchmarks.results import log
from pdserve.benchmarks.serving_metrics import LATENCIES, PHASES

LATENCY_TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _rate_value(text: str, finite_max: float) -> float:
    rate = float(text)
    return finite_max * 2 if math.isinf(rate) else rate  # rate inf sits right of the largest finite rate


def series(records: list[dict], metric: str, **match) -> dict[str, list[tuple[float, float]]]:
    """run -> [(rate, value)] sorted by rate, for the records of `metric` whose params contain `match`."""
    picked = [
        r
        for r in records
        if r["metric"] == metric
        and r.get("value") is not None
        and all(r["params"].get(k) == v for k, v in match.items())
    ]
    finite = [float(r["params"]["request_rate"]) for r in picked if r["params"]["request_rate"] != "inf"]
    finite_max = max(finite, default=1.0)
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in picked:
        out[r["params"]["run"]].append((_rate_value(r["params"]["request_rate"], finite_max), r["value"]))
    return {run: sorted(points) for run, points in out.items()}


def plot_serving(json_path: str, png_path: str) -> str | None:
    plt = pyplot_or_none("the JSON file has every figure")
    if plt is None:
        return None
    with open(json_path, encoding="utf-8") as f:
        doc = json.load(f)
    groups: dict[str, list[dict]] = defaultdict(list)  # one row of panels per comparison (bench/serving.py)
    for r in doc["records"]:
        if "request_rate" in r.get("params", {}):
            groups[r["params"].get("comparison", "")].append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 6, figsize=(26, 4.6 * len(groups)), squeeze=False)
    for row, (comparison, recs) in zip(axes, groups.items(), strict=False):
        for ax, name in zip(row, LATENCIES, strict=False):
            _latency_panel(ax, recs, name)
        _goodput_panel(row[4], recs)
        _phase_panel(row[5], recs)
        for ax in row:
            ax.set_title(f"{comparison} {ax.get_title()}".strip(), fontsize=9)
    fig.suptitle(
        f"{doc['bench']} on {doc.get('device_name', doc['device'])} ({doc['date']}, {doc['commit'][:12]})"
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    log(f"plot: {png_path}")
    return png_path


def _latency_panel(ax, recs: list[dict], name: str) -> None:
    colors = {}
    for stat, style in (("p99", "-"), ("p50", "--")):
        for run, points in series(recs, f"{name}_ms", stat=stat).items():
            (line,) = ax.plot(
                *zip(*points, strict=False),
                style,
                marker="o",
                ms=3,
                color=colors.get(run),
                label=f"{run} {stat}",
            )
            colors[run] = line.get_color()
    ax.set_title(f"{LATENCY_TITLES[name]} (p99 solid, p50 dashed)")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=6)


def _goodput_panel(ax, recs: list[dict]) -> None:
    goodput = defaultdict(list)  # (run, slo) -> points: several SLOs may share a file
    for r in recs:
        if r["metric"] == "goodput":
            goodput[(r["params"]["run"], r["params"].get("slo", ""))].append(r)
    for (run, slo), rs in sorted(goodput.items()):
        points = series(rs, "goodput").get(run, [])
        ax.plot(*zip(*points, strict=False), "-", marker="o", ms=3, label=f"{run} goodput {slo}")
    for points in series(recs, "request_throughput").values():
        ax.plot(*zip(*points, strict=False), ":", color="grey", lw=0.8)
    ax.set_title("goodput (throughput dotted)")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.legend(fontsize=6)


def _phase_panel(ax, recs: list[dict]) -> None:
    by_bar: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in recs:
        if r["metric"] == "phase_ms":
            p = r["params"]
            by_bar[(p["run"], p["request_rate"])][p["phase"]] = r["value"]
    if not by_bar:
        ax.set_title("server-reported phases: none reported")
        return
    bars = sorted(by_bar)
    bottom = [0.0] * len(bars)
    for phase in PHASES:
        if phase == "exposed_transfer":
            continue  # part of transfer: stacking both would count it twice
        heights = [by_bar[b].get(phase, 0.0) for b in bars]
        ax.bar(range(len(bars)), heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=False)]
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([f"{run}@{rate}" for run, rate in bars], rotation=60, fontsize=6, ha="right")
    ax.set_title("server-reported phases per request (mean)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=6)
