"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): every token's top-k experts, each a gated MLP, summed with the
router's weights. Expert weights are stacked: w13 [E, 2I, H] (gate rows 0..I-1, then up rows), w2 [E, H, I].

    out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x)),  e = topk_ids[t, k]

A loop over experts (the reference below) launches a handful of small GEMMs per expert, and at decode reads
each active expert's weights at whatever efficiency a GEMM of a few rows gets. The kernel instead runs one
grouped GEMM launch per projection for all experts:

1. Routing, on the device with torch ops and no host sync. The T*K (token, slot) pairs, numbered p = t*K + k,
   are sorted by expert; each expert's run of pairs is padded up to a multiple of BLOCK_M, so every tile of
   BLOCK_M sorted rows belongs to one expert. `row_pair[r]` is the pair sorted row r holds (T*K for a padding
   row) and `tile_expert[i]` the expert of tile i. How many tiles there are is known only on the device, so
   the grid is an upper bound from shapes alone (each of at most min(E, T*K) experts wastes under one tile of
   padding) and the spare tiles, marked with expert E, return at once. No sync means the step can sit in a
   CUDA graph.
2. gate_up: act[r] = silu(gate) * up for each sorted row, both halves in one program (two accumulators over
   the same x tile), so the [T*K, 2I] gate_up product never goes to memory.
3. down: slot[p] = topk_weights[p] * (w2[e] @ act[r]), written back in pair order.
4. out[t] = sum over k of slot[t*K + k] (a torch sum; with K == 1 step 3 writes `out` directly).

Products accumulate in fp32. fp16/bf16 operands go to the tensor cores as they are; act and the slots are
rounded to the input dtype once, as a model's own projections would be. fp32 operands use IEEE fp32 dots (not
TF32), so fp32 results match the reference to ~1e-5. Token ids must lie in [0, E): checking that would need a
host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels._common import (
    check,
    check_float,
    check_rows,
    check_same_device,
    interpreting,
    next_pow2,
    num_sms,
)


@triton.jit
def _tile_coords(pid, num_tiles, num_n, GROUP_M: tl.constexpr):
    """Program id -> (m tile, n block), GROUP_M m tiles at a time across every n block: the tiles of a group
    (mostly one expert's, at prefill) read each block of weight columns while it is still in L2."""
    per_group = GROUP_M * num_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(num_tiles - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _mma(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b^T; a [M, K], b [N, K] (weight rows, unit stride along K)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H] hidden states
    w_ptr,  # [E, 2I, H] w13: gate rows 0..I-1, up rows I..2I-1
    act_ptr,  # [R, I] out: silu(gate) * up per sorted row (R = tiles * BLOCK_M)
    row_pair_ptr,  # [R] int64: the pair t*K + k that sorted row r holds; num_pairs for padding
    tile_expert_ptr,  # [tiles] int32: each tile's expert; num_experts for spare tiles
    num_pairs,
    top_k,
    num_experts,
    num_tiles,
    H,
    I,  # noqa: E741  (the intermediate size, as in the shapes above)
    stride_xt,
    stride_we,
    stride_wn,
    stride_ar,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    tile, nblk = _tile_coords(tl.program_id(0), num_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:
        return
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    row_ok = pair < num_pairs  # padding rows load zeros and so store act = 0
    cols = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (pair // top_k).to(tl.int64)[:, None] * stride_xt
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    gate_rows = w_expert + cols.to(tl.int64)[:, None] * stride_wn
    up_rows = w_expert + (cols + I).to(tl.int64)[:, None] * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = col_ok[:, None] & k_ok[None, :]
        acc_gate = _mma(x, tl.load(gate_rows + k[None, :], mask=w_mask, other=0.0), acc_gate, FP32_DOT)
        acc_up = _mma(x, tl.load(up_rows + k[None, :], mask=w_mask, other=0.0), acc_up, FP32_DOT)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(
        act_ptr + rows[:, None] * stride_ar + cols[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=col_ok[None, :],
    )


@triton.jit
def _down_kernel(
    act_ptr,  # [R, I] from _gate_up_kernel
    w_ptr,  # [E, H, I] w2
    dst_ptr,  # [T*K, H] out: row p = pair p's weighted expert output (with K == 1, `out` itself)
    weight_ptr,  # [T*K] fp32 routing weights, pair order
    row_pair_ptr,  # [R] int64, as in _gate_up_kernel
    tile_expert_ptr,  # [tiles] int32, as in _gate_up_kernel
    num_pairs,
    num_experts,
    num_tiles,
    H,
    I,  # noqa: E741
    stride_ar,
    stride_we,
    stride_wn,
    stride_dst,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    tile, nblk = _tile_coords(tl.program_id(0), num_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:
        return
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    row_ok = pair < num_pairs
    cols = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + rows[:, None] * stride_ar  # padding rows hold zeros: no row mask needed
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + ks
        k_ok = k < I
        a = tl.load(a_rows + k[None, :], mask=k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(a, w, acc, FP32_DOT)
    acc *= tl.load(weight_ptr + pair, mask=row_ok, other=0.0)[:, None]
    tl.store(
        dst_ptr + pair.to(tl.int64)[:, None] * stride_dst + cols[None, :],
        acc.to(dst_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the tiles the sorted, padded rows fill: each expert that has pairs pads fewer than
    block_m rows, and there are at most min(E, pairs) of them."""
    return min(num_pairs, triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m))


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int, num_tiles: int):
    """topk_ids [T, K] -> (row_pair [num_tiles * block_m] int64, tile_expert [num_tiles] int32); see the
    module doc. Device-side torch ops only (no bincount: on CUDA it syncs to size its output)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    sorted_ids, order = torch.sort(flat, stable=True)  # pairs grouped by expert, in pair order within one
    experts = torch.arange(num_experts + 1, dtype=flat.dtype, device=dev)
    bounds = torch.searchsorted(sorted_ids, experts)  # [E + 1]: where each expert's pairs start
    counts = bounds.diff()
    tiles = (counts + (block_m - 1)) // block_m
    tile_end = tiles.cumsum(0)
    # sorted position i of expert e goes to padded row i + (first row of e's tiles - first position of e)
    shift = (tile_end - tiles) * block_m - bounds[:-1]
    rows = torch.arange(num_pairs, device=dev) + shift[sorted_ids]
    row_pair = torch.full((num_tiles * block_m,), num_pairs, dtype=torch.int64, device=dev)
    row_pair.scatter_(0, rows, order)
    # tile i belongs to the first expert whose tiles end after i; past the last used tile that is E (spare)
    tile_ids = torch.arange(num_tiles, device=dev)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True, out_int32=True)
    return row_pair, tile_expert


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Tile height: the rows an expert gets on average, rounded up to a power of two, 16 (the smallest tl.dot
    takes) to 128; decode's few rows an expert take one 16-row tile."""
    if interpreting():
        return 16
    return min(max(next_pow2(num_pairs // max(min(num_experts, num_pairs), 1)), 16), 128)


def gemm_config(block_m: int, num_tiles: int, n: int, gate_up: bool, dtype: torch.dtype, device) -> dict:
    """BLOCK_N, BLOCK_K, GROUP_M and launch options for one GEMM with `n` output columns. gate_up keeps two
    accumulators, so its BLOCK_N is half the down GEMM's for the same registers. Chosen by reasoning (Hopper:
    228 KB shared memory, 64K registers an SM), not yet by a sweep on a GPU."""
    if interpreting():
        return dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # IEEE fp32 dots run on the FMA units, operands in registers: small tiles
        return dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    if block_m <= 32:
        # A stream of weight bytes: enough programs to keep every SM loading (narrower columns when the
        # tiles are few), each with several BLOCK_K-deep stages in flight.
        wide = num_tiles * triton.cdiv(n, 64) >= 2 * num_sms(device)
        return dict(BLOCK_N=64 if wide else 32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    block_n = 64 if gate_up else 128
    return dict(BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=4 if block_m == 64 else 8, num_stages=4)


def check_moe_args(hidden, w13, w2, topk_weights, topk_ids, out) -> None:
    check_rows("hidden", hidden, 2)
    check_rows("w13", w13, 3)
    check_rows("w2", w2, 3)
    check_float("hidden", hidden)
    T, H = hidden.shape
    E, I2, _ = w13.shape
    check(
        w13.dtype == hidden.dtype and w2.dtype == hidden.dtype,
        f"w13 {w13.dtype}, w2 {w2.dtype}: expected hidden's dtype {hidden.dtype}",
    )
    check(w13.shape[2] == H and I2 % 2 == 0, f"w13 {tuple(w13.shape)}: expected [E, 2I, {H}]")
    check(
        w2.shape == (E, H, I2 // 2),
        f"w2 {tuple(w2.shape)}: expected [{E}, {H}, {I2 // 2}] for w13 {tuple(w13.shape)}",
    )
    check(
        topk_ids.dim() == 2 and topk_ids.shape[0] == T, f"topk_ids {tuple(topk_ids.shape)}: expected [{T}, K]"
    )
    check(
        topk_ids.dtype in (torch.int32, torch.int64),
        f"topk_ids: expected int32 or int64, got {topk_ids.dtype}",
    )
    check(
        topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32,
        f"topk_weights: expected float32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} "
        f"{tuple(topk_weights.shape)}",
    )
    if out is not None:
        check_rows("out", out, 2)
        check(
            out.shape == hidden.shape and out.dtype == hidden.dtype,
            "out must match hidden in shape and dtype",
        )
    check_same_device(hidden, w13, w2, topk_weights, topk_ids, *([] if out is None else [out]))


def _gate_up(hidden, w13, row_pair, tile_expert, top_k: int, block_m: int, tiles: int) -> torch.Tensor:
    """-> act [tiles * block_m, I]: silu(gate) * up for every sorted row (zeros in padding rows)."""
    E, inter = w13.shape[0], w13.shape[1] // 2
    act = torch.empty((tiles * block_m, inter), dtype=hidden.dtype, device=hidden.device)
    cfg = gemm_config(block_m, tiles, inter, True, hidden.dtype, hidden.device)
    _gate_up_kernel[(tiles * triton.cdiv(inter, cfg["BLOCK_N"]),)](
        hidden,
        w13,
        act,
        row_pair,
        tile_expert,
        hidden.shape[0] * top_k,
        top_k,
        E,
        tiles,
        hidden.shape[1],
        inter,
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        act.stride(0),
        BLOCK_M=block_m,
        FP32_DOT=interpreting() or hidden.dtype == torch.float32,
        **cfg,
    )
    return act


def _down(act, w2, topk_weights, row_pair, tile_expert, block_m: int, tiles: int, out: torch.Tensor) -> None:
    """out[t] = sum over k of topk_weights[t, k] * w2[e] @ act[row of pair (t, k)]."""
    (T, K), (E, H, inter) = topk_weights.shape, w2.shape
    slots = out if K == 1 else torch.empty((T * K, H), dtype=out.dtype, device=out.device)
    cfg = gemm_config(block_m, tiles, H, False, out.dtype, out.device)
    _down_kernel[(tiles * triton.cdiv(H, cfg["BLOCK_N"]),)](
        act,
        w2,
        slots,
        topk_weights.reshape(-1),
        row_pair,
        tile_expert,
        T * K,
        E,
        tiles,
        H,
        inter,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        slots.stride(0),
        BLOCK_M=block_m,
        FP32_DOT=interpreting() or out.dtype == torch.float32,
        **cfg,
    )
    if K > 1:
        torch.sum(slots.view(T, K, H), dim=1, out=out)


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, out=None):
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, K] fp32, topk_ids [T, K] int ->
    out [T, H] (written into `out` when given)."""
    check_moe_args(hidden, w13, w2, topk_weights, topk_ids, out)
    T, H = hidden.shape
    E, inter, K = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    if out is None:
        out = torch.empty_like(hidden)
    if T == 0 or H == 0:
        return out
    if K == 0 or inter == 0:
        return out.zero_()
    block_m = block_m_for(T * K, E)
    tiles = max_tiles(T * K, E, block_m)
    row_pair, tile_expert = sort_by_expert(topk_ids, E, block_m, tiles)
    act = _gate_up(hidden, w13, row_pair, tile_expert, K, block_m, tiles)
    _down(act, w2, topk_weights, row_pair, tile_expert, block_m, tiles, out)
    return out


def fused_moe_ref(hidden, w13, w2, topk_weights, topk_ids, out=None):
    """Plain-torch reference; same signature and results as `fused_moe`: a loop over the experts that have
    tokens. Projections in the input dtype (fp32 accumulation inside the matmul), the activation and the
    weighted sum in fp32."""
    T, H = hidden.shape
    inter, K = w2.shape[2], topk_ids.shape[1]
    acc = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    ids = topk_ids.reshape(-1).long()
    weights = topk_weights.reshape(-1).float()
    token_of = torch.arange(T * K, device=hidden.device) // K
    for e in ids.unique().tolist():
        pairs = (ids == e).nonzero().squeeze(1)
        tokens = token_of[pairs]
        gate_up = hidden.index_select(0, tokens) @ w13[e].T  # [n, 2I]
        act = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(hidden.dtype)
        acc.index_add_(0, tokens, (act @ w2[e].T).float() * weights[pairs, None])
    if out is None:
        return acc.to(hidden.dtype)
    return out.copy_(acc)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """router_logits [T, E] -> (topk_weights [T, K] fp32, topk_ids [T, K] int32): softmax over the experts in
    fp32, the top_k largest, divided by their sum when `renormalize` (Mixtral always; Qwen3-MoE when
    norm_topk_prob)."""
    check(router_logits.dim() == 2, f"router_logits: expected [T, E], got {tuple(router_logits.shape)}")
    check(0 < top_k <= router_logits.shape[1], f"top_k {top_k} with {router_logits.shape[1]} experts")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
