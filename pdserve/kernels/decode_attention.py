"""Paged decode attention: one query per sequence, at position seq_lens[s] - 1, attending to all seq_lens[s]
keys, or with `sliding_window=W > 0` to the last W of them (keys max(0, seq_lens[s] - W)..seq_lens[s] - 1);
`softcap=c > 0` caps each score s at c * tanh(s / c) before the softmax. Both are described in
prefill_attention's doc, and both are off at 0.

The Triton version is split-K (flash-decoding): each (sequence, kv head) context is cut into partitions
computed in parallel, each leaving an unnormalised partial output with its running max and sum, and a reduce
kernel merges them. It is GQA-aware: one program handles all q heads of a kv head, so each K/V block is read
once for the whole group. No host sync and CUDA-graph safe: the number of partitions depends only on shapes
(batch, kv heads, the block table's width) and the window; each sequence then cuts its own context into that
many equal partitions inside the kernel, so a short context in a wide table still spreads over every partition
instead of landing whole in the first one. With a window the partitions cover only the keys the query sees, so
table entries before the window are never read and a long context costs only the window.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import check, interpreting, next_pow2, num_sms
from pdserve.kernels.prefill_attention import attend_tile, check_paged_args, score_scales, window_start


@triton.jit
def _partition_len(context, num_splits, BLOCK_N: tl.constexpr):
    """This sequence's tokens per partition: the keys its query sees over num_splits, rounded up to whole
    tiles (>= 1 tile)."""
    per_split = (context + num_splits - 1) // num_splits
    return tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N, 1) * BLOCK_N


@triton.jit
def _decode_partial_kernel(
    q_ptr,  # [S, Hq, D]
    k_cache_ptr,
    v_cache_ptr,  # [N, B, Hk, D]
    bt_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32
    part_out_ptr,  # [S, Hq, SPLITS, D] fp32, unnormalised
    part_ml_ptr,  # [2, S, Hq, SPLITS] fp32: running max (log2 units), then running sum
    out_ptr,  # [S, Hq, D]: written here, normalised, when DIRECT (one partition: no reduce needed)
    qk_scale,
    cap_log2e,
    window,
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_cn,
    stride_cb,
    stride_ch,
    stride_bt,
    num_seqs,
    num_q_heads,
    group,
    block_size,
    num_splits,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
    DIRECT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    heads = kv_head * group + g
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + s * stride_qs + heads[:, None] * stride_qh + dims[None, :], mask=g_ok[:, None], other=0.0
    )
    # The partitions share out only the keys the query sees: first..seq_len.
    first = window_start(seq_len - 1, window)
    partition = _partition_len(seq_len - first, num_splits, BLOCK_N)
    start = first + split * partition
    end = tl.minimum(start + partition, seq_len)
    m_i = tl.full([BLOCK_G], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    q_pos = tl.zeros([BLOCK_G], tl.int32) + seq_len - 1
    q_lo = tl.zeros([BLOCK_G], tl.int32) + first
    m_i, l_i, acc = attend_tile(
        q,
        m_i,
        l_i,
        acc,
        q_pos,
        q_lo,
        k_cache_ptr,
        v_cache_ptr,
        bt_ptr + s * stride_bt,
        kv_head,
        stride_cn,
        stride_cb,
        stride_ch,
        block_size,
        start,
        end,
        qk_scale,
        cap_log2e,
        D=D,
        BLOCK_N=BLOCK_N,
        FP32_DOT=FP32_DOT,
        SOFTCAP=SOFTCAP,
    )
    if DIRECT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + s * stride_os + heads[:, None] * stride_oh + dims[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None],
        )
    else:
        row = (s * num_q_heads + heads) * num_splits + split  # [BLOCK_G] index into [S, Hq, SPLITS]
        tl.store(part_out_ptr + row[:, None] * D + dims[None, :], acc, mask=g_ok[:, None])
        tl.store(part_ml_ptr + row, m_i, mask=g_ok)
        tl.store(part_ml_ptr + num_seqs * num_q_heads * num_splits + row, l_i, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,  # [S, Hq, SPLITS, D] fp32
    part_ml_ptr,  # [2, S, Hq, SPLITS] fp32
    seq_lens_ptr,  # [S] int32
    out_ptr,  # [S, Hq, D]
    window,
    stride_os,
    stride_oh,
    num_seqs,
    num_q_heads,
    num_splits,
    D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + s)
    context = seq_len - window_start(seq_len - 1, window)
    partition = _partition_len(context, num_splits, BLOCK_N)
    used = (context + partition - 1) // partition  # partitions that saw at least one key
    sp = tl.arange(0, BLOCK_SPLITS)
    ok = sp < used
    row = (s * num_q_heads + head) * num_splits + sp
    m = tl.load(part_ml_ptr + row, mask=ok, other=float("-inf"))
    l_sum = tl.load(part_ml_ptr + num_seqs * num_q_heads * num_splits + row, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # an empty context: no partitions, no NaN
    w = tl.where(ok, tl.exp2(m - m_max), 0.0)
    dims = tl.arange(0, D)
    acc = tl.load(part_out_ptr + row[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
    denom = tl.sum(w * l_sum, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + s * stride_os + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


def plan_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device
) -> int:
    """Split-K partitions per (sequence, kv head): enough programs to fill the device about twice over, but no
    more than the longest possible context has tiles."""
    want_splits = max(1, math.ceil(2 * num_sms(device) / max(num_seqs * num_kv_heads, 1)))
    return min(want_splits, max(1, math.ceil(max_context / block_n)))


def _blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps)."""
    if interpreting():
        return 16, 1
    return (64, 4) if head_dim <= 128 else (32, 4)


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale: float,
    out=None,
    sliding_window: int = 0,
    softcap: float = 0.0,
):
    """q [S, Hq, D], k/v_cache [N, B, Hk, D], block_tables [S, max_blocks] int32, seq_lens [S] int32 -> [S,
    Hq, D]."""
    check_paged_args(q, k_cache, v_cache, block_tables, seq_lens, out)
    window, qk_scale, cap_log2e = score_scales(scale, sliding_window, softcap)
    S, Hq, D = q.shape
    check(seq_lens.shape[0] == S, f"seq_lens has {seq_lens.shape[0]} entries for {S} queries")
    if out is None:
        out = torch.empty_like(q)
    if S == 0:
        return out
    Hk, block_size = k_cache.shape[2], k_cache.shape[1]
    group = Hq // Hk
    block_n, warps = _blocks(D)
    max_context = max(block_tables.shape[1] * block_size, 1)
    if window > 0:  # a shape-like constant too: the split count still depends on no tensor's contents
        max_context = min(max_context, window)
    splits = plan_splits(S, Hk, max_context, block_n, q.device)
    direct = splits == 1
    part_out = torch.empty((S, Hq, 0 if direct else splits, D), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((2, S, Hq, 0 if direct else splits), dtype=torch.float32, device=q.device)
    _decode_partial_kernel[(S, Hk, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part_out,
        part_ml,
        out,
        qk_scale,
        cap_log2e,
        window,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        S,
        Hq,
        group,
        block_size,
        splits,
        D=D,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_N=block_n,
        FP32_DOT=interpreting() or q.dtype == torch.float32,
        DIRECT=direct,
        SOFTCAP=softcap > 0,  # constexpr: no tanh in the loop without a cap (see prefill_attention)
        num_warps=warps,
        num_stages=2,
    )
    if direct:
        return out
    _decode_reduce_kernel[(S, Hq)](
        part_out,
        part_ml,
        seq_lens,
        out,
        window,
        out.stride(0),
        out.stride(1),
        S,
        Hq,
        splits,
        D=D,
        BLOCK_SPLITS=next_pow2(splits),
        BLOCK_N=block_n,
        num_warps=1 if interpreting() else 4,
    )
    return out


def paged_decode_attention_ref(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale: float,
    out=None,
    sliding_window: int = 0,
    softcap: float = 0.0,
):
    """Plain-torch reference; same signature and results as `paged_decode_attention`. Batched: the context is
    padded to the longest sequence and the padding, like the keys before a window, masked."""
    score_scales(scale, sliding_window, softcap)  # the same argument checks
    S, Hq, D = q.shape
    N, block_size, Hk, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if S == 0:
        return out
    max_len = int(seq_lens.max())
    nblocks = math.ceil(max_len / block_size)
    # Padding entries, and those before a window, may hold anything: clamped into range here, masked below.
    tables = block_tables[:, :nblocks].long().clamp(0, N - 1)
    k = k_cache[tables].flatten(1, 2)[:, :max_len].float()  # [S, L, Hk, D]
    v = v_cache[tables].flatten(1, 2)[:, :max_len].float()
    qf = q.float().view(S, Hk, Hq // Hk, 1, D)
    scores = (qf @ k.permute(0, 2, 3, 1).unsqueeze(2)) * scale  # [S, Hk, G, 1, L]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    kpos = torch.arange(max_len, device=q.device)[None, :]
    visible = kpos < seq_lens[:, None].long()  # [S, L]
    if sliding_window > 0:
        visible &= kpos >= seq_lens[:, None].long() - sliding_window
    scores = scores.masked_fill(~visible[:, None, None, None, :], float("-inf"))
    v = v.masked_fill(~visible[:, :, None, None], 0.0)  # unread slots may hold NaN, and 0 * NaN is NaN
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty context (a padded slot) gives zeros
    o = probs @ v.permute(0, 2, 1, 3).unsqueeze(2)  # [S, Hk, G, 1, D]
    out.copy_(o.reshape(S, Hq, D))
    return out
