"""Plots of bench result files (PNG, matplotlib's file-only backend): every record's ratio to its ceiling.
matplotlib is not a dependency: without it a plot is skipped with a line saying so, and the JSON stays.
Standalone (prints, no bench.common import): bench/common.py's command line calls it."""

from __future__ import annotations

import json
import os


def pyplot_or_none(hint: str):
    """matplotlib.pyplot on the file-only backend, or None (with a line saying so and `hint`) where it is
    absent: matplotlib is not a dependency, and a benchmark's JSON must not be lost for want of a plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print(f"matplotlib is not importable: no plot ({hint})", flush=True)
        return None
    return plt


def plot_ratios(json_path: str, png_path: str | None = None) -> str | None:
    """A bar chart of every record's ratio to its ceiling (and its speedup over the baseline, where there is
    one). Returns the PNG's path, or None when matplotlib is not importable."""
    plt = pyplot_or_none("run `python bench/common.py plot FILE.json` where it is")
    if plt is None:
        return None
    with open(json_path, encoding="utf-8") as f:
        doc = json.load(f)
    recs = [
        r
        for r in doc["records"]
        if isinstance(r.get("ratio"), (int, float)) and not r["metric"].startswith("hf_")
    ]
    if not recs:
        return None
    labels = [short_label(r) for r in recs]
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(recs)), 5.5))
    ax.bar(
        range(len(recs)),
        [r["ratio"] for r in recs],
        color="tab:blue",
        label="fraction of floor (1.0 = at limit)",
    )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(recs)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("value vs ceiling measured in the same run")
    ax.set_title(
        f"{doc['bench']} on {doc.get('device_name', doc['device'])} ({doc['date']}, {doc['commit'][:12]})"
    )
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
    print(f"plot: {png_path}", flush=True)
    return png_path


def short_label(rec: dict) -> str:
    p = rec.get("params") or {}
    bits = [rec["metric"].replace("_ms", "").replace("_tok_s", "")]
    for key in ("model", "kernel", "tokens", "batch", "context", "mode"):
        if key in p:
            bits.append(f"{p[key]}")
    return " ".join(bits)
