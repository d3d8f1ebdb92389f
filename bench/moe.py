#!/usr/bin/env python
"""Fused MoE (pdserve/kernels/fused_moe.py) on one GPU at real expert shapes, beside floors measured in the
same run and the torch loop over experts (fused_moe_ref) as the baseline.

Shapes: Qwen3-30B-A3B (128 experts, top 8, hidden 2048, intermediate 768) and Mixtral-8x7B (8 experts, top 2,
hidden 4096, intermediate 14336); bf16, random weights, routing = softmax top-k of Gaussian logits.
  decode   1, 8, 64 tokens. Floor: the weights of the distinct experts the routing picked (plus x and out),
           read once at the device copy bandwidth. Several routings are cycled, one per call, so that a call's
           experts are not left in L2 by the call before (a model's layers never share experts either). Timed
           as CUDA-graph replays, as the engine's decode runs; the eager time (host launches included) is in
           params.
  prefill  512, 2048, 8192 tokens. Floor: 6 T K H I FLOP (three projections per (token, expert) pair) at the
           rate of a large bf16 matmul.
Both floors are computed for every case; the larger is the record's `ceiling`, ratio = ceiling / ours (1.0 =
at the floor). Copy bandwidth and matmul rate are measured first (bench/common.py's definitions). Each case
also checks ours against the reference on the same inputs (max |diff| in params).

    python bench/moe.py                                         # everything (~1-2 min on an H100/H200)
    python bench/moe.py --shapes qwen3-30b-a3b --decode 1 --prefill 2048
    python bench/moe.py --smoke --out /tmp/moe                  # CPU, toy shape, Triton interpreter
Results: bench/results/moe-<device>-<YYYYMMDD>.json (the format in docs/architecture.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]  # see bench/engine.py
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import (  # noqa: E402
    capture_graph,
    device_results,
    guarded,
    is_cuda,
    measure_copy_bandwidth,
    measure_matmul_rate,
    time_fn,
)
from pdserve.benchmarks.results import log  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768),
    "mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096, inter=14336),
}
TOY = dict(experts=8, top_k=2, hidden=48, inter=40)


@dataclass
class Bench:
    args: argparse.Namespace
    device: object
    dtype: object
    results: object
    copy_bw: float = 0.0
    matmul_rate: float = 0.0
    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    ap.add_argument("--decode", nargs="*", type=int, default=[1, 8, 64], help="decode token counts")
    ap.add_argument("--prefill", nargs="*", type=int, default=[512, 2048, 8192], help="prefill token counts")
    ap.add_argument("--routings", type=int, default=8, help="decode: routings cycled, one per call")
    ap.add_argument("--iters", type=int, default=20, help="timed calls (or graph replays) per case")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy shape, Triton interpreter: the code runs")
    ap.add_argument("--out", default=os.path.join(_HERE, "results"))
    return ap.parse_args(argv)


def make_inputs(torch, shape: dict, tokens: int, routings: int, bench: Bench):
    """Weights once per shape are the caller's; here: hidden [T, H] and `routings` (weights, ids) pairs."""
    from pdserve.kernels.fused_moe import select_experts

    hidden = torch.randn(tokens, shape["hidden"], dtype=bench.dtype, device=bench.device)
    routes = [
        select_experts(torch.randn(tokens, shape["experts"], device=bench.device), shape["top_k"], True)
        for _ in range(routings)
    ]
    return hidden, routes


def floors(torch, shape: dict, tokens: int, routes, bench: Bench) -> dict:
    """Bytes a call must read and write (the distinct experts' weights, x, out; averaged over the routings),
    its FLOP, and the two floors in ms."""
    es = torch.empty((), dtype=bench.dtype).element_size()
    H, inter, K = shape["hidden"], shape["inter"], shape["top_k"]
    active = sum(len(torch.unique(ids)) for _, ids in routes) / len(routes)
    nbytes = active * 3 * H * inter * es + 2 * tokens * H * es
    flop = 6.0 * tokens * K * H * inter
    return dict(
        active_experts=active,
        bytes=nbytes,
        flop=flop,
        bytes_floor_ms=nbytes / bench.copy_bw * 1e3,
        flop_floor_ms=flop / bench.matmul_rate * 1e3,
    )


def time_ours(torch, hidden, w13, w2, routes, bench: Bench) -> tuple[float, float, int]:
    """(graph ms per call, eager ms per call, n): each timed call runs fused_moe once per routing."""
    from pdserve.kernels.fused_moe import fused_moe

    out = torch.empty_like(hidden)

    def calls():
        for weights, ids in routes:
            fused_moe(hidden, w13, w2, weights, ids, out=out)

    iters, n = bench.args.iters, len(routes)
    eager = time_fn(calls, bench.device, warmup=1 if bench.args.smoke else 3, iters=iters, max_seconds=5.0)
    if not is_cuda(bench.device):
        return eager["median_ms"] / n, eager["median_ms"] / n, eager["n"]
    graph = capture_graph(calls, bench.device)
    replay = time_fn(graph.replay, bench.device, warmup=3, iters=iters, max_seconds=5.0)
    del graph
    return replay["median_ms"] / n, eager["median_ms"] / n, replay["n"]


def compare(hidden, w13, w2, route) -> tuple[float, float]:
    """(max |ours - reference|, max |reference|) on one routing."""
    from pdserve.kernels.fused_moe import fused_moe, fused_moe_ref

    want = fused_moe_ref(hidden, w13, w2, *route).float()
    return float((fused_moe(hidden, w13, w2, *route).float() - want).abs().max()), float(want.abs().max())


def run_case(torch, bench: Bench, name: str, shape: dict, w13, w2, phase: str, tokens: int) -> None:
    from pdserve.kernels.fused_moe import fused_moe_ref

    routings = bench.args.routings if phase == "decode" else 1
    hidden, routes = make_inputs(torch, shape, tokens, routings, bench)
    f = floors(torch, shape, tokens, routes, bench)
    diff, scale = compare(hidden, w13, w2, routes[0])
    ours_ms, eager_ms, n = time_ours(torch, hidden, w13, w2, routes, bench)
    ref = time_fn(
        lambda: [fused_moe_ref(hidden, w13, w2, *r) for r in routes], bench.device, 1, 5, max_seconds=5.0
    )
    ref_ms = ref["median_ms"] / routings
    floor_ms = max(f["bytes_floor_ms"], f["flop_floor_ms"])
    params = dict(
        model=name,
        phase=phase,
        tokens=tokens,
        **shape,
        dtype=str(bench.dtype).replace("torch.", ""),
        routings=routings,
        timing="cuda graph replay" if is_cuda(bench.device) else "eager",
        eager_ms=round(eager_ms, 4),
        ref_ms=round(ref_ms, 4),
        speedup_vs_ref=round(ref_ms / ours_ms, 2),
        active_experts=f["active_experts"],
        bytes_floor_ms=round(f["bytes_floor_ms"], 5),
        flop_floor_ms=round(f["flop_floor_ms"], 5),
        achieved_GBps=round(f["bytes"] / ours_ms / 1e6, 1),
        achieved_tflops=round(f["flop"] / ours_ms / 1e9, 2),
        max_abs_diff=diff,
        ref_max_abs=scale,
        matches_ref=diff <= 2e-2 * max(scale, 1.0),
        n=n,
        floor="max(distinct experts' weight bytes + x + out / copy bandwidth, 6TKHI FLOP / matmul rate)",
    )
    ratio = floor_ms / ours_ms
    bench.results.add(
        "moe_ms",
        round(ours_ms, 5),
        "ms",
        ceiling=round(floor_ms, 5),
        ratio=round(ratio, 4),
        baseline=round(ref_ms, 5),
        params=params,
    )
    bench.rows.append((name, phase, tokens, ours_ms, eager_ms, floor_ms, ratio, ref_ms, params))


def measure_ceilings(bench: Bench) -> None:
    bench.copy_bw = measure_copy_bandwidth(bench.device)
    bench.results.add(
        "copy_bandwidth_GBps",
        round(bench.copy_bw / 1e9, 1),
        "GB/s",
        params={"what": "device copy of 1 GiB (64 MiB on CPU), read + write bytes counted"},
    )
    bench.matmul_rate = measure_matmul_rate(bench.device)
    bench.results.add(
        "matmul_TFLOPs",
        round(bench.matmul_rate / 1e12, 1),
        "TFLOP/s",
        params={"what": "square matmul 8192^3 bf16 (512^3 fp32 on CPU)"},
    )


def run_shape(torch, bench: Bench, name: str, shape: dict, decode: list, prefill: list) -> None:
    E, H, inter = shape["experts"], shape["hidden"], shape["inter"]
    log(f"--- {name}: {E} experts, top {shape['top_k']}, H={H}, I={inter}")
    w13 = torch.randn(E, 2 * inter, H, dtype=bench.dtype, device=bench.device).mul_(H**-0.5)
    w2 = torch.randn(E, H, inter, dtype=bench.dtype, device=bench.device).mul_(inter**-0.5)
    for phase, counts in (("decode", decode), ("prefill", prefill)):
        for tokens in counts:
            with guarded(f"{name} {phase} {tokens} tokens", bench.failures, bench.device):
                run_case(torch, bench, name, shape, w13, w2, phase, tokens)


def print_table(bench: Bench) -> None:
    print(
        f"\ncopy {bench.copy_bw / 1e9:.0f} GB/s, matmul {bench.matmul_rate / 1e12:.0f} TFLOP/s "
        "(measured above); ratio = floor / ours"
    )
    head = ("shape", "phase", "tokens", "ours ms", "eager ms", "floor ms", "ratio", "ref ms", "x ref")
    print(
        "{:15s} {:8s} {:>6s} {:>9s} {:>9s} {:>9s} {:>6s} {:>9s} {:>6s}  active  GB/s  TFLOP/s".format(*head)
    )
    for name, phase, tokens, ours, eager, floor, ratio, ref, p in bench.rows:
        print(
            f"{name:15s} {phase:8s} {tokens:6d} {ours:9.4f} {eager:9.4f} {floor:9.4f} {ratio:6.2f} "
            f"{ref:9.4f} {ref / ours:6.1f}  {p['active_experts']:6.1f} {p['achieved_GBps']:5.0f} "
            f"{p['achieved_tflops']:8.1f}{'' if p['matches_ref'] else '  MISMATCH'}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, shapes = torch.device("cpu"), torch.float32, {"toy": TOY}
        decode, prefill, args.iters, args.routings = [1, 3], [20], min(args.iters, 3), 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/moe.py needs a CUDA device (or --smoke on CPU)")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        shapes, decode, prefill = {n: SHAPES[n] for n in args.shapes}, args.decode, args.prefill
    bench = Bench(args, device, dtype, device_results("moe", device, args.out))
    torch.manual_seed(0)
    measure_ceilings(bench)
    for name, shape in shapes.items():
        with guarded(f"{name} weights", bench.failures, device):
            run_shape(torch, bench, name, shape, decode, prefill)
    print_table(bench)
    log(f"results: {bench.results.path}")
    for f in bench.failures:
        log(f"FAILED: {f}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
