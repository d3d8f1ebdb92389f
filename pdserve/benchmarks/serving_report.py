"""A serving run's figures as result records (the project's results format, bench/common.py) and as the
summary table `pdserve bench` prints.

Every record's params name the run (`run`: which server or configuration), the request rate as text ("4",
"inf": record identity ignores float params) and the workload, so one file holds several runs and rates side
by side. The ceiling of the throughput and goodput records is the prefill capacity bound where the server
reports prefill times; `baseline` is filled later by whoever compares runs (bench/serving.py).
"""

from __future__ import annotations

import math
from typing import Optional

from pdserve.benchmarks.results import fmt, make_record
from pdserve.benchmarks.serving_metrics import LATENCIES, PERCENTILES

STATS = ("mean",) + tuple(f"p{q}" for q in PERCENTILES)


def rate_label(rate: float) -> str:
    if math.isinf(rate):
        return "inf"
    return f"{rate:g}"


def _ratio(value, ceiling) -> Optional[float]:
    if value is None or not ceiling:
        return None
    return value / ceiling


def figure_records(fig: dict, params: dict) -> list[dict]:
    """One record per figure; `params` names the run, rate and workload (and the SLO for goodput)."""
    bound = fig.get("prefill_capacity_rps")
    recs = [
        make_record(
            "request_throughput",
            fig["request_throughput"],
            "req/s",
            bound,
            _ratio(fig["request_throughput"], bound),
            params=params,
        ),
        make_record("output_throughput", fig["output_throughput"], "tok/s", params=params),
        make_record("total_token_throughput", fig["total_token_throughput"], "tok/s", params=params),
        make_record("completed_requests", fig["completed"], "requests", params=params),
        make_record("failed_requests", fig["failed"], "requests", params=params),
        make_record("prompt_tokens", fig["prompt_tokens"], "tokens", params=params),
        make_record("output_tokens", fig["output_tokens"], "tokens", params=params),
    ]
    if fig.get("cached_tokens") is not None:
        recs.append(make_record("cached_tokens", fig["cached_tokens"], "tokens", params=params))
    if fig.get("goodput") is not None:
        recs.append(
            make_record(
                "goodput", fig["goodput"], "req/s", bound, _ratio(fig["goodput"], bound), params=params
            )
        )
        recs.append(make_record("slo_attainment", fig["slo_attainment"], "fraction", params=params))
    for name in LATENCIES:
        for stat in STATS:
            value = fig["latency_ms"][name][stat]
            if value is not None:
                recs.append(make_record(f"{name}_ms", value, "ms", params={**params, "stat": stat}))
    if fig.get("prefix_hit_fraction") is not None:
        recs.append(make_record("prefix_hit_fraction", fig["prefix_hit_fraction"], "fraction", params=params))
    for phase, ms in fig.get("phases_ms", {}).items():
        recs.append(make_record("phase_ms", ms, "ms", params={**params, "phase": phase}))
    for kind, count in sorted(fig["errors"].items()):
        recs.append(make_record("errors", count, "requests", params={**params, "kind": kind}))
    return recs


def summary_lines(fig: dict, label: str, rate: float) -> list[str]:
    """The table printed after each rate (the same rows `vllm bench serve` prints, plus pdserve's)."""
    title = f" Serving benchmark: {label} @ {rate_label(rate)} req/s "
    lines = [
        f"{title:=^64}",
        _row("Successful requests", fig["completed"]),
        _row("Failed requests", fig["failed"]),
        _row("Benchmark duration (s)", fig["duration_s"]),
        _row("Total input tokens", fig["prompt_tokens"]),
        _row("Total generated tokens", fig["output_tokens"]),
        _row("Request throughput (req/s)", fig["request_throughput"]),
        _row("Output token throughput (tok/s)", fig["output_throughput"]),
        _row("Total token throughput (tok/s)", fig["total_token_throughput"]),
    ]
    if fig.get("goodput") is not None:
        lines += [
            _row("Request goodput (req/s)", fig["goodput"]),
            _row("SLO attainment", fig["slo_attainment"]),
        ]
    if fig.get("prefill_capacity_rps") is not None:
        lines.append(_row("Prefill capacity bound (req/s)", fig["prefill_capacity_rps"]))
    if fig.get("prefix_hit_fraction") is not None:
        lines.append(_row("Prefix cache hit fraction", fig["prefix_hit_fraction"]))
    for kind, count in sorted(fig["errors"].items()):
        lines.append(_row(f"Errors: {kind}", count))
    names = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for name in LATENCIES:
        lines.append(f"{names[name]:-^64}")
        for stat in STATS:
            lines.append(
                _row(
                    f"{stat.capitalize() if stat == 'mean' else stat.upper()} {name.upper()} (ms)",
                    fig["latency_ms"][name][stat],
                )
            )
    if fig.get("phases_ms"):
        lines.append(f"{' Server-reported phases (mean ms) ':-^64}")
        lines += [_row(phase, ms) for phase, ms in fig["phases_ms"].items()]
    lines.append("=" * 64)
    return lines


def _row(name: str, value) -> str:
    text = "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else fmt(value))
    return f"{name:<46}{text:>18}"
