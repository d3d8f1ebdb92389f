"""Kernel micro-benchmarks: each Triton kernel beside its torch reference at Llama-3.1-8B shapes (32 q heads,
8 kv heads, head_dim 128, hidden 4096, intermediate 14336, block size 16, bf16), 2048 tokens where a size is
asked.

Each case records the Triton time (`value`), the floor (`ceiling`: bytes moved / measured copy bandwidth, or
FLOP / matmul rate for prefill attention), the reference's time (`baseline`), and in params the achieved GB/s
or TFLOP/s and the largest difference from the reference on the same inputs (fresh copies for in-place
kernels). Gather/scatter of 2048 tokens of KV (256 MiB over 32 layers, or one layer's 8 MiB) also get a GB/s
record beside the copy ceiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from bench.common import capture_graph, time_fn
from pdserve.benchmarks.results import log

REAL = dict(
    hq=32, hk=8, d=128, bs=16, hidden=4096, inter=14336, tokens=2048, ctx=2048, batches=(1, 64), layers=32
)
TOY = dict(hq=4, hk=2, d=16, bs=16, hidden=64, inter=96, tokens=48, ctx=64, batches=(1, 3), layers=2)


@dataclass
class Case:
    kernel: str
    case: str
    triton: Callable[[], object]
    ref: Callable[[], object]
    compare: Callable[[], tuple[float, float]]  # (max abs diff, max abs of the reference's output)
    nbytes: float  # bytes read + written by one call
    flop: float = 0.0


def _diff(a, b) -> tuple[float, float]:
    return float((a.float() - b.float()).abs().max()), float(b.float().abs().max())


def _shuffled_tables(torch, seqs: int, blocks_per_seq: int, num_blocks: int, device):
    perm = torch.randperm(num_blocks, device=device)[: seqs * blocks_per_seq]
    return perm.view(seqs, blocks_per_seq).to(torch.int32).contiguous()


def attention_cases(torch, s: dict, dtype, device) -> list[Case]:
    from pdserve.kernels import decode_attention as da
    from pdserve.kernels import prefill_attention as pa

    hq, hk, d, bs = s["hq"], s["hk"], s["d"], s["bs"]
    es, scale, cases = torch.empty((), dtype=dtype).element_size(), s["d"] ** -0.5, []
    for batch in s["batches"]:
        ctx = s["ctx"]
        nb = math.ceil(ctx / bs)
        k = torch.randn(batch * nb + 1, bs, hk, d, dtype=dtype, device=device)
        v = torch.randn_like(k)
        table = _shuffled_tables(torch, batch, nb, k.shape[0], device)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, hq, d, dtype=dtype, device=device)
        args = (q, k, v, table, lens, scale)
        cases.append(
            Case(
                "decode_attention",
                f"b{batch} ctx{ctx}",
                lambda a=args: da.paged_decode_attention(*a),
                lambda a=args: da.paged_decode_attention_ref(*a),
                lambda a=args: _diff(da.paged_decode_attention(*a), da.paged_decode_attention_ref(*a)),
                nbytes=2 * batch * ctx * hk * d * es + 2 * q.numel() * es,
                flop=4.0 * batch * ctx * hq * d,
            )
        )
    for prefix, tokens in ((0, s["tokens"]), (s["tokens"] * 3 // 4, s["tokens"] // 4)):
        ctx = prefix + tokens
        nb = math.ceil(ctx / bs)
        k = torch.randn(nb + 1, bs, hk, d, dtype=dtype, device=device)
        v = torch.randn_like(k)
        table = _shuffled_tables(torch, 1, nb, k.shape[0], device)
        cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
        lens = torch.tensor([ctx], dtype=torch.int32, device=device)
        q = torch.randn(tokens, hq, d, dtype=dtype, device=device)
        args = (q, k, v, table, cu, lens, scale)
        pairs = tokens * prefix + tokens * (tokens + 1) / 2
        cases.append(
            Case(
                "prefill_attention",
                f"{tokens} tokens after {prefix}",
                lambda a=args: pa.paged_prefill_attention(*a),
                lambda a=args: pa.paged_prefill_attention_ref(*a),
                lambda a=args: _diff(pa.paged_prefill_attention(*a), pa.paged_prefill_attention_ref(*a)),
                nbytes=2 * ctx * hk * d * es + 2 * q.numel() * es,
                flop=4.0 * pairs * hq * d,
            )
        )
    return cases


def elementwise_cases(torch, s: dict, dtype, device) -> list[Case]:
    from pdserve.kernels import kv_cache_write as kw
    from pdserve.kernels import rms_norm as rn
    from pdserve.kernels import rotary as ro
    from pdserve.kernels import silu_and_mul as sm

    T, H, inter, hq, hk, d, bs = s["tokens"], s["hidden"], s["inter"], s["hq"], s["hk"], s["d"], s["bs"]
    es = torch.empty((), dtype=dtype).element_size()
    x, res = torch.randn(T, H, dtype=dtype, device=device), torch.randn(T, H, dtype=dtype, device=device)
    w = torch.randn(H, dtype=dtype, device=device)
    gate_up = torch.randn(T, 2 * inter, dtype=dtype, device=device)
    cases = [
        Case(
            "rms_norm",
            f"{T}x{H} +residual",
            lambda: rn.rms_norm(x, w, 1e-5, res),
            lambda: rn.rms_norm_ref(x, w, 1e-5, res),
            lambda: _diff(rn.rms_norm(x, w, 1e-5, res)[0], rn.rms_norm_ref(x, w, 1e-5, res)[0]),
            nbytes=4 * T * H * es,
        ),
        Case(
            "silu_and_mul",
            f"{T}x{inter}",
            lambda: sm.silu_and_mul(gate_up),
            lambda: sm.silu_and_mul_ref(gate_up),
            lambda: _diff(sm.silu_and_mul(gate_up), sm.silu_and_mul_ref(gate_up)),
            nbytes=3 * T * inter * es,
        ),
    ]
    # rotary, alone and fused with the KV write; the KV write alone
    positions = torch.arange(T, dtype=torch.int64, device=device)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.outer(torch.arange(max(T, 8192), dtype=torch.float32, device=device), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()
    q, k, v = (torch.randn(T, n, d, dtype=dtype, device=device) for n in (hq, hk, hk))
    nb = math.ceil(T / bs)
    k_cache = torch.zeros(nb * 2, bs, hk, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    blocks = torch.randperm(nb * 2, device=device)[:nb]
    slots = (blocks[positions // bs] * bs + positions % bs).contiguous()

    def rotary_pair(fused: bool):
        def go(fn):
            qc, kc, kcache, vcache = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
            if fused:
                fn(positions, qc, kc, v, kcache, vcache, slots, cos_sin)
            else:
                fn(positions, qc, kc, cos_sin)
            return torch.cat([qc.flatten(), kc.flatten(), kcache.flatten(), vcache.flatten()])

        t_fn, r_fn = (
            (ro.apply_rotary_and_write_kv, ro.apply_rotary_and_write_kv_ref)
            if fused
            else (ro.apply_rotary, ro.apply_rotary_ref)
        )
        return lambda: _diff(go(t_fn), go(r_fn))

    def write_pair():
        def go(fn):
            kcache, vcache = k_cache.clone(), v_cache.clone()
            fn(k, v, kcache, vcache, slots)
            return torch.cat([kcache.flatten(), vcache.flatten()])

        return lambda: _diff(go(kw.write_kv_cache), go(kw.write_kv_cache_ref))

    qk_bytes = 2 * (q.numel() + k.numel()) * es + T * d * 4
    cases += [
        Case(
            "rotary",
            f"{T} tokens q{hq} k{hk}",
            lambda: ro.apply_rotary(positions, q, k, cos_sin),
            lambda: ro.apply_rotary_ref(positions, q, k, cos_sin),
            rotary_pair(False),
            nbytes=qk_bytes,
        ),
        Case(
            "rotary_and_write_kv",
            f"{T} tokens q{hq} k{hk}",
            lambda: ro.apply_rotary_and_write_kv(positions, q, k, v, k_cache, v_cache, slots, cos_sin),
            lambda: ro.apply_rotary_and_write_kv_ref(positions, q, k, v, k_cache, v_cache, slots, cos_sin),
            rotary_pair(True),
            nbytes=qk_bytes + 3 * k.numel() * es,
        ),
        Case(
            "kv_cache_write",
            f"{T} tokens kv{hk}",
            lambda: kw.write_kv_cache(k, v, k_cache, v_cache, slots),
            lambda: kw.write_kv_cache_ref(k, v, k_cache, v_cache, slots),
            write_pair(),
            nbytes=4 * k.numel() * es,
        ),
    ]
    return cases


def _replayed(device, calls: Callable[[], object]) -> Callable[[], object]:
    """On a GPU: `calls` captured in a CUDA graph at the first call and replayed from then on, so a
    few-microsecond kernel is timed without the host's launch cost between the timing events (decode runs
    these kernels inside graphs too). Captured lazily: one case's graphs live only while that case runs."""
    if device.type != "cuda":
        return calls
    graph = None

    def replay():
        nonlocal graph
        if graph is None:
            graph = capture_graph(calls, device)
        graph.replay()

    return replay


def linear_cases(torch, s: dict, dtype, device) -> list[Case]:
    """Decode-size linears (one row) at Llama's projection shapes: the skinny kernel beside cuBLAS (F.linear).
    Each call runs over enough copies of the weight to pass L2 (a model's layers never share one)."""
    import torch.nn.functional as F

    from pdserve.kernels import skinny_linear as sl

    H, inter = s["hidden"], s["inter"]
    es, cases = torch.empty((), dtype=dtype).element_size(), []
    for label, (n, k) in (("o_proj", (H, H)), ("gate_up_proj", (2 * inter, H)), ("down_proj", (H, inter))):
        copies = max(2, math.ceil(120e6 / (n * k * es))) if device.type == "cuda" else 2
        weights = [torch.randn(n, k, dtype=dtype, device=device) / math.sqrt(k) for _ in range(copies)]
        x = torch.randn(1, k, dtype=dtype, device=device)
        ours = _replayed(device, lambda ws=weights, x=x: [sl.skinny_linear(x, w) for w in ws])
        ref = _replayed(device, lambda ws=weights, x=x: [F.linear(x, w) for w in ws])
        cases.append(
            Case(
                "skinny_linear",
                f"1x{k} @ {n}x{k} ({label}), x{copies} weights",
                ours,
                ref,
                lambda w=weights[0], x=x: _diff(sl.skinny_linear(x, w), F.linear(x, w)),
                nbytes=copies * (n * k + k + n) * es,
            )
        )
    return cases


def block_copy_cases(torch, s: dict, dtype, device) -> list[Case]:
    """2048 tokens of KV: every layer's K and V at once ([2L, N, blk] view of the engine's cache), and one
    layer."""
    from pdserve.kernels import block_copy as bc

    bs, hk, d, layers = s["bs"], s["hk"], s["d"], s["layers"]
    nb = math.ceil(s["tokens"] / bs)
    cache = torch.randn(layers * 2, nb * 4, bs, hk, d, dtype=dtype, device=device)
    ids = torch.randperm(nb * 4, device=device)[:nb].to(torch.int64).contiguous()
    cases = []
    for label, view in (("all layers", cache), ("one layer", cache[:2])):
        out = torch.empty((view.shape[0], nb, *view.shape[2:]), dtype=dtype, device=device)
        src = torch.randn_like(out)
        moved = 2 * out.numel() * out.element_size()
        mib = out.numel() * out.element_size() / 2**20

        def scatter_cmp(v=view, src=src):
            a, b = v.clone(), v.clone()
            bc.scatter_blocks(src, ids, a)
            bc.scatter_blocks_ref(src, ids, b)
            return _diff(a, b)

        cases += [
            Case(
                "gather_blocks",
                f"{s['tokens']} tokens, {label} ({mib:.0f} MiB)",
                lambda v=view, o=out: bc.gather_blocks(v, ids, o),
                lambda v=view, o=out: bc.gather_blocks_ref(v, ids, o),
                lambda v=view: _diff(bc.gather_blocks(v, ids), bc.gather_blocks_ref(v, ids)),
                nbytes=moved,
            ),
            Case(
                "scatter_blocks",
                f"{s['tokens']} tokens, {label} ({mib:.0f} MiB)",
                lambda v=view, x=src: bc.scatter_blocks(x, ids, v),
                lambda v=view, x=src: bc.scatter_blocks_ref(x, ids, v),
                scatter_cmp,
                nbytes=moved,
            ),
        ]
    return cases


def run_case(bench, case: Case, dtype_name: str) -> None:
    tol = 2e-2 if dtype_name != "float32" else 1e-4
    diff, scale = case.compare()
    matches = diff <= tol * max(scale, 1.0)
    if not matches:
        log(f"  WARNING {case.kernel} [{case.case}]: max |triton - ref| = {diff:.3g} (ref scale {scale:.3g})")
    # the comparison above already ran each kernel once (compiled it); smoke runs skip further warmup
    warm, iters = (0 if bench.sizes.kernel_scale == "toy" else bench.sizes.warmup), bench.sizes.kernel_iters
    t = time_fn(case.triton, bench.device, warmup=warm, iters=iters, max_seconds=3.0)
    r = time_fn(case.ref, bench.device, warmup=min(warm, 1), iters=min(iters, 5), max_seconds=3.0)
    floor_s = max(case.nbytes / bench.copy_bw, case.flop / bench.matmul_rate)
    ms = t["median_ms"]
    params = {
        "kernel": case.kernel,
        "case": case.case,
        "dtype": dtype_name,
        "ref_ms": round(r["median_ms"], 4),
        "speedup_vs_ref": round(r["median_ms"] / ms, 2),
        "achieved_GBps": round(case.nbytes / (ms / 1e3) / 1e9, 1),
        "max_abs_diff": diff,
        "ref_max_abs": scale,
        "matches_ref": matches,
        "n": t["n"],
        "floor": "max(bytes read + written / copy bandwidth, FLOP / matmul rate)",
    }
    if case.flop:
        params["achieved_tflops"] = round(case.flop / (ms / 1e3) / 1e12, 2)
    bench.results.add(
        "kernel_ms",
        round(ms, 5),
        "ms",
        ceiling=round(floor_s * 1e3, 5),
        ratio=round(floor_s * 1e3 / ms, 4),
        baseline=round(r["median_ms"], 5),
        params=params,
    )
    if case.kernel in ("gather_blocks", "scatter_blocks"):
        gbps, ref_gbps = case.nbytes / (ms / 1e3) / 1e9, case.nbytes / (r["median_ms"] / 1e3) / 1e9
        bench.results.add(
            "kv_block_copy_GBps",
            round(gbps, 1),
            "GB/s",
            ceiling=round(bench.copy_bw / 1e9, 1),
            ratio=round(gbps * 1e9 / bench.copy_bw, 4),
            baseline=round(ref_gbps, 1),
            params={
                "kernel": case.kernel,
                "case": case.case,
                "what": "bytes read + written per second, as the copy ceiling counts them",
            },
        )


def run_kernels(bench) -> None:
    import torch

    s = TOY if bench.sizes.kernel_scale == "toy" else REAL
    dtype, device = bench.torch_dtype, bench.device
    torch.manual_seed(0)
    for group in (attention_cases, elementwise_cases, linear_cases, block_copy_cases):
        if bench.out_of_time(f"kernels {group.__name__}"):
            return
        try:
            cases = group(torch, s, dtype, device)
        except Exception as exc:
            bench.failures.append(f"kernels {group.__name__}: {exc!r}")
            log(f"!!! building {group.__name__} FAILED: {exc!r}")
            continue
        for case in cases:
            if bench.out_of_time(f"kernel {case.kernel} [{case.case}]"):
                return
            try:
                run_case(bench, case, bench.dtype_name)
            except Exception as exc:
                bench.failures.append(f"kernel {case.kernel} [{case.case}]: {exc!r}")
                log(f"!!! kernel {case.kernel} [{case.case}] FAILED: {exc!r}")
        del cases
