"""Figures of one benchmark run at one request rate, from the per-request results (`vllm bench serve`'s
definitions, plus the token-pacing SLO and the server-reported phases pdserve adds).

- Goodput (requests/s): requests that finished and met every SLO given (--goodput ttft:MS tpot:MS itl:MS),
  over the run's duration. `itl:MS` bounds each request's own p99 inter-token gap: a request whose stream
  stalled for one long gap (a prefill stealing its decode step) fails it even when its mean TPOT looks fine.
- Prefix-cache hit fraction: cached prompt tokens over prompt tokens, over the requests whose usage reported
  both.
- Prefill capacity bound (requests/s): prefill workers / mean server-reported prefill seconds, the rate at
  which the prefill side saturates at this prompt length if it ran requests one after another; None when the
  server reports no prefill times.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Optional

from pdserve.benchmarks.serving_client import RequestResult

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")
PHASES = ("prefill_queue", "prefill", "transfer", "exposed_transfer", "decode_queue")
SLO_KEYS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def parse_slos(items: Optional[list[str]]) -> dict[str, float]:
    """['ttft:1000', 'tpot:50'] -> {'ttft': 1.0, 'tpot': 0.05} (seconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"--goodput {item!r}: the bound must be positive")
        slos[key] = ms / 1e3
    return slos


def request_p99_itl(r: RequestResult) -> float:
    return percentile(r.itls, 99) if r.itls else 0.0


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.ok:
        return False
    figures = {
        "ttft": r.ttft if r.ttft is not None else r.e2e,
        "tpot": r.tpot or 0.0,
        "itl": request_p99_itl(r),
        "e2el": r.e2e,
    }
    return all(figures[k] <= bound for k, bound in slos.items())


def latency_samples(ok: list[RequestResult]) -> dict[str, list[float]]:
    return {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2el": [r.e2e for r in ok],
    }


def summarize(values: list[float]) -> dict[str, Optional[float]]:
    """mean and percentiles, in milliseconds; None when there is no sample."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    return {
        "mean": statistics.fmean(values) * 1e3,
        **{f"p{q}": percentile(values, q) * 1e3 for q in PERCENTILES},
    }


def compute_figures(
    results: list[RequestResult], duration_s: float, slos: dict[str, float], prefill_workers: int = 1
) -> dict:
    ok = [r for r in results if r.ok]
    duration_s = max(duration_s, 1e-9)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    output = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if meets_slos(r, slos))
    fig = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error_kind for r in results if not r.ok)),
        "duration_s": duration_s,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output / duration_s,
        "total_token_throughput": (prompt + output) / duration_s,
        "good_requests": good,
        "goodput": good / duration_s if slos else None,
        "slo_attainment": good / len(results) if slos and results else None,
        "latency_ms": {name: summarize(v) for name, v in latency_samples(ok).items()},
    }
    fig.update(cache_figures(ok))
    fig.update(phase_figures(ok, prefill_workers))
    return fig


def cache_figures(ok: list[RequestResult]) -> dict:
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    cached = sum(r.cached_tokens for r in reported)
    prompt = sum(r.prompt_tokens for r in reported)
    return {
        "cached_tokens": cached if reported else None,
        "prefix_hit_fraction": cached / prompt if prompt else None,
    }


def phase_figures(ok: list[RequestResult], prefill_workers: int) -> dict:
    timed = [r.timings for r in ok if r.timings]
    phases = {k: statistics.fmean(float(t.get(k, 0.0)) for t in timed) * 1e3 for k in PHASES} if timed else {}
    prefill_s = phases.get("prefill", 0.0) / 1e3
    bound = prefill_workers / prefill_s if prefill_s > 0 else None
    return {"phases_ms": phases, "prefill_capacity_rps": bound}
