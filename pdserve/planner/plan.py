"""How many prefill and decode nodes a workload needs, from a node's measured profile (profile.py).

The model, per split of `nodes` into P prefill and D decode nodes (D >= 1; P = 0 is colocated serving):

- Disaggregated (P >= 1). A prefill node serves prompts one at a time: service time s = prefill_ms(I), load
  rho = (R / P) s, and TTFT = s + the M/D/1 queue's mean wait rho s / (2 (1 - rho)) + one decode step. A
  decode node runs B requests at once, where B is Little's law's fixed point B = (R / D) O itl(B) (the
  smallest, found by iterating from 0), and every step costs itl(B, I + O/2): that is the ITL, every token's.
- Colocated (P = 0). Each node also prefills its share of prompts, in chunks of max_num_batched_tokens that
  ride with the decode batch: a mixed step costs itl(B) + prefill_ms(chunk). The p99 ITL is the mixed step's
  once more than 1 % of steps are mixed, else the pure step's; the mean ITL (1 / steps per second) feeds
  Little's law; TTFT = a prompt's chunks as mixed steps + the queue's mean wait (rho = the time spent
  prefilling).
- Limits: a node's KV cache holds B (I + O) tokens; a queue's load stays below 1; TTFT <= the TTFT goal;
  ITL <= the ITL goal.

A split's capacity is the highest rate at which every limit holds (bisection); its predicted goodput at the
asked rate is min(rate, capacity), and its binding constraint is the limit that breaks just above the
capacity. The plan is the split of highest goodput (then more capacity, then fewer prefill nodes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pdserve.planner.profile import Profile
from pdserve.wire.errors import ConfigError

MIXED_SHARE_P99 = 0.01  # more than this share of mixed steps puts a mixed step at the p99 ITL


@dataclass(frozen=True)
class Workload:
    rate: float  # requests per second
    input_len: int
    output_len: int
    ttft_ms: float
    itl_ms: float

    def check(self) -> None:
        for name in ("rate", "input_len", "output_len", "ttft_ms", "itl_ms"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Outcome:
    """One split at one rate: the predicted latencies and the first limit broken (None: all hold)."""

    ttft_ms: float
    itl_ms: float
    decode_batch: float
    broken: str | None


@dataclass(frozen=True)
class Split:
    prefill_nodes: int
    decode_nodes: int
    capacity_req_s: float  # the highest rate at which every limit holds
    goodput_req_s: float  # predicted at the asked rate
    binding: str  # the limit that breaks just above the capacity
    at_rate: Outcome  # predicted at min(asked rate, capacity)


def evaluate(profile: Profile, w: Workload, prefill: int, decode: int, rate: float) -> Outcome:
    if prefill:
        return _disaggregated(profile, w, prefill, decode, rate)
    return _colocated(profile, w, decode, rate)


def _disaggregated(profile: Profile, w: Workload, prefill: int, decode: int, rate: float) -> Outcome:
    context = w.input_len + w.output_len / 2
    batch = _little(
        lambda b: rate / decode * w.output_len * profile.itl_ms(b, context) / 1e3, _kv_batch(profile, w)
    )
    if batch is None:
        return Outcome(math.inf, math.inf, math.inf, "decode KV cache")
    itl = profile.itl_ms(batch, context)
    s = profile.prefill_ms(w.input_len)
    rho = rate / prefill * s / 1e3
    if rho >= 1:
        return Outcome(math.inf, itl, batch, "prefill throughput")
    ttft = s + rho * s / (2 * (1 - rho)) + itl
    return Outcome(ttft, itl, batch, _slo_broken(w, ttft, itl))


def _colocated(profile: Profile, w: Workload, nodes: int, rate: float) -> Outcome:
    context = w.input_len + w.output_len / 2
    chunk = min(w.input_len, profile.max_num_batched_tokens)
    chunks = math.ceil(w.input_len / profile.max_num_batched_tokens)
    mixed_per_s = rate / nodes * chunks

    def steps(batch: float) -> tuple[float, float, float] | None:
        """(pure step ms, mixed step ms, steps per second), None when prefills leave no time to decode."""
        pure = profile.itl_ms(batch, context)
        mixed = pure + profile.prefill_ms(chunk)
        spare = 1 - mixed_per_s * mixed / 1e3  # the share of each second left for pure steps
        if spare <= 0:
            return None
        return pure, mixed, mixed_per_s + spare / (pure / 1e3)

    def concurrency(batch: float) -> float:
        got = steps(batch)
        return math.inf if got is None else rate / nodes * w.output_len / got[2]

    if steps(0.0) is None:
        return Outcome(math.inf, math.inf, 0.0, "prefill throughput")
    batch = _little(concurrency, _kv_batch(profile, w))
    got = steps(batch) if batch is not None else None
    if got is None:
        return Outcome(
            math.inf, math.inf, math.inf, "decode KV cache" if batch is None else "prefill throughput"
        )
    pure, mixed, per_s = got
    itl = mixed if mixed_per_s / per_s > MIXED_SHARE_P99 else pure
    rho = mixed_per_s * mixed / 1e3
    ttft = chunks * mixed + rho * chunks * mixed / (2 * (1 - rho))
    return Outcome(ttft, itl, batch, _slo_broken(w, ttft, itl))


def _kv_batch(profile: Profile, w: Workload) -> float:
    return profile.kv_cache_tokens / (w.input_len + w.output_len)


def _little(concurrency, limit: float) -> float | None:
    """The smallest B = concurrency(B) (concurrency grows with B), iterating from 0; None past `limit`."""
    batch = 0.0
    for _ in range(500):
        nxt = concurrency(batch)
        if nxt > limit:
            return None
        if abs(nxt - batch) < 1e-9 * max(1.0, nxt):
            return nxt
        batch = nxt
    return batch


def _slo_broken(w: Workload, ttft: float, itl: float) -> str | None:
    if ttft > w.ttft_ms:
        return "TTFT goal"
    if itl > w.itl_ms:
        return "ITL goal"
    return None


def capacity(profile: Profile, w: Workload, prefill: int, decode: int) -> tuple[float, str]:
    """(the highest rate at which every limit holds, the limit that breaks above it)."""
    hi = 1.0
    while evaluate(profile, w, prefill, decode, hi).broken is None:
        hi *= 2
        if hi > 1e7:
            return math.inf, "none"
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if evaluate(profile, w, prefill, decode, mid).broken is None:
            lo = mid
        else:
            hi = mid
    return lo, evaluate(profile, w, prefill, decode, hi).broken or "none"


def plan(profile: Profile, w: Workload, gpus: int) -> tuple[Split, list[Split]]:
    """(the best split of `gpus`, every split considered)."""
    w.check()
    tp = profile.tensor_parallel_size
    nodes = gpus // tp
    if nodes < 1:
        raise ConfigError(f"--gpus {gpus} holds no node of the profile's {tp} GPUs")
    splits = []
    for prefill in range(nodes):
        decode = nodes - prefill
        cap, binding = capacity(profile, w, prefill, decode)
        at = evaluate(profile, w, prefill, decode, min(w.rate, cap) if cap > 0 else w.rate)
        splits.append(Split(prefill, decode, cap, min(w.rate, cap), binding, at))
    best = max(splits, key=lambda s: (s.goodput_req_s, s.capacity_req_s, -s.prefill_nodes))
    return best, splits


def split_dict(split: Split) -> dict:
    """A split as JSON (an unbounded figure is null: JSON has no infinity)."""
    d = asdict(split)
    d["at_rate"] = {k: _finite(v) for k, v in d["at_rate"].items()}
    return {k: _finite(v) for k, v in d.items()}


def _finite(value):
    return None if isinstance(value, float) and math.isinf(value) else value
