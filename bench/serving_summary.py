"""bench/serving.py's comparisons, from the records: baselines linked into each record, a Markdown report.

Records of one comparison share `comparison` (pd-2gpu, routing, ...) and every record of a non-baseline run
names its baseline's run in `baseline_run`; its `baseline` is that run's figure with the same metric and other
params."""

from __future__ import annotations

from collections import defaultdict

from pdserve.benchmarks.results import fmt

IDENTITY_SKIP = ("run", "baseline_run")
SLO_ATTAINED = 0.9


def _peer_key(rec: dict, run: str) -> str:
    p = {k: v for k, v in rec["params"].items() if k not in IDENTITY_SKIP}
    return f"{rec['metric']}|{run}|{sorted(p.items(), key=lambda kv: kv[0])}"


def link_baselines(records: list[dict]) -> None:
    by_key = {_peer_key(r, r["params"].get("run", "")): r for r in records}
    for r in records:
        base_run = r["params"].get("baseline_run")
        if base_run and base_run != r["params"].get("run"):
            peer = by_key.get(_peer_key(r, base_run))
            r["baseline"] = peer["value"] if peer else None


def _value(index: dict, metric: str, run: str, rate: str, **extra):
    rec = index.get((metric, run, rate, tuple(sorted(extra.items()))))
    return rec["value"] if rec else None


def _index(records: list[dict]) -> dict:
    index = {}
    for r in records:
        p = r["params"]
        extra = tuple(sorted((k, p[k]) for k in ("stat", "slo", "phase") if k in p))
        index[(r["metric"], p.get("run"), p.get("request_rate"), extra)] = r
    return index


def _rate_sort(rate: str) -> float:
    return float(rate)


def comparison_table(records: list[dict], slo_names: list[str]) -> list[str]:
    index = _index(records)
    runs = sorted(
        {r["params"]["run"] for r in records},
        key=lambda run: (run == records[0]["params"].get("baseline_run"), run),
    )
    rates = sorted({r["params"]["request_rate"] for r in records}, key=_rate_sort)
    head = (
        ["run", "rate", "req/s"]
        + [f"goodput {s}" for s in slo_names]
        + ["TTFT p99 ms", "TPOT p99 ms", "ITL p99 ms", "hit fraction", "errors"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for rate in rates:
            thr = _value(index, "request_throughput", run, rate)
            if thr is None:
                continue
            row = [run, rate, fmt(thr)] + [fmt(_value(index, "goodput", run, rate, slo=s)) for s in slo_names]
            row += [fmt(_value(index, f"{m}_ms", run, rate, stat="p99")) for m in ("ttft", "tpot", "itl")]
            row += [
                fmt(_value(index, "prefix_hit_fraction", run, rate)),
                fmt(_value(index, "failed_requests", run, rate)),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def capacity_lines(records: list[dict], slo_names: list[str]) -> list[str]:
    """Per run and SLO: the highest rate at which at least 90% of requests met it."""
    best: dict[tuple[str, str], float] = defaultdict(float)
    for r in records:
        if r["metric"] == "slo_attainment" and r["value"] is not None and r["value"] >= SLO_ATTAINED:
            key = (r["params"]["run"], r["params"]["slo"])
            best[key] = max(best[key], float(r["params"]["request_rate"]))
    runs = sorted({r["params"]["run"] for r in records})
    return [
        f"- {run}: " + ", ".join(f"{s}: {fmt(best.get((run, s)) or None)} req/s" for s in slo_names)
        for run in runs
    ]


def markdown_report(doc: dict, slo_text: dict[str, str]) -> str:
    by_comparison: dict[str, list[dict]] = defaultdict(list)
    for r in doc["records"]:
        if "comparison" in r["params"] and "request_rate" in r["params"]:
            by_comparison[r["params"]["comparison"]].append(r)
    out = [
        f"# serving on {doc.get('device_name', doc['device'])} ({doc['date']}, {doc['commit'][:12]})",
        "",
        f"Command: `{doc['command']}`",
        "",
        "SLOs: " + "; ".join(f"**{name}** {text}" for name, text in slo_text.items()),
        "",
    ]
    for comparison, recs in by_comparison.items():
        slo_names = sorted({r["params"]["slo"] for r in recs if "slo" in r["params"]})
        out += [
            f"## {comparison}",
            "",
            *comparison_table(recs, slo_names),
            "",
            f"Highest rate with >= {SLO_ATTAINED:.0%} of requests within the SLO:",
            "",
            *capacity_lines(recs, slo_names),
            "",
        ]
    oracle = [r for r in doc["records"] if r["metric"] in ("prefix_hit_oracle_lru", "prefix_hit_upper_bound")]
    if oracle:
        out += (
            ["## prefix-cache oracle", ""]
            + [
                f"- {r['metric']} @ {r['params'].get('request_rate')} req/s: {fmt(r['value'])}"
                for r in oracle
            ]
            + [""]
        )
    return "\n".join(out)
