"""Paged attention for prefill chunks over a cached prefix (chunked prefill), causal within the chunk.

Sequence s owns query rows cu_query_lens[s]:cu_query_lens[s+1] (q_len of them) and has seq_lens[s] tokens of
context, this chunk included (its K/V are already in the cache). Query i sits at position seq_lens[s] - q_len
+ i and attends to keys 0..position, read through block_tables[s]. GQA: q head h reads kv head h // (Hq //
Hk). Softmax in fp32.

Two options, both off at 0, for Gemma 2/3, Mistral and Qwen:
- `sliding_window=W > 0`: the query at position p sees only keys p - W < j <= p, W of them counting itself
  (Hugging Face's `kv_idx > q_idx - sliding_window`). The kernels read nothing before a tile's first visible
  key, so a long context costs only the window, and the block-table entries for blocks wholly before the
  window may hold anything (the engine puts freed ids there: see pdserve/wire/sliding_window.py).
- `softcap=c > 0`: each score s = scale * q.k becomes c * tanh(s / c) before masking and softmax (Gemma 2's
  attn_logit_softcapping).

The Triton grid needs no host sync: tiles of BLOCK_M query rows are numbered so that sequence s starts at tile
cu_query_lens[s] // BLOCK_M + s, an upper bound on the tiles before it; the grid is T // BLOCK_M + S tiles and
the few spare tiles do nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import check, check_float, check_rows, check_same_device, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def tanh(x):
    """fp32 tanh from exp2, which every Triton 3.x and its interpreter have (tl has no tanh, and libdevice's
    does not run in the interpreter). exp2 of -2|x| log2(e) lies in (0, 1]: no overflow at any |x|."""
    t = tl.exp2(-2.8853900817779268 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def window_start(pos, window):
    """The first key position a query at `pos` sees: pos - window + 1, clamped at 0; 0 when window is 0."""
    return tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)


@triton.jit
def attend_tile(
    q,
    m_i,
    l_i,
    acc,  # q [M, D]; running max (log2 units), sum and output [M, D], fp32
    q_pos,  # [M] position of each query row; keys at positions <= q_pos are visible
    q_lo,  # [M] first key position each row sees (0 without a sliding window)
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,  # cache [N, B, Hk, D]; this sequence's block table row
    kv_head,
    stride_cn,
    stride_cb,
    stride_ch,
    block_size,
    start,
    end,
    qk_scale,
    cap_log2e,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Online-softmax update over keys start..end (end <= context length), BLOCK_N keys per step. Scores in
    log2 units are q.k * qk_scale, or with SOFTCAP cap_log2e * tanh(q.k * qk_scale) (see `score_scales`)."""
    dims = tl.arange(0, D)
    for k0 in range(start, end, BLOCK_N):
        kpos = k0 + tl.arange(0, BLOCK_N)
        kv_ok = kpos < end
        blk = tl.load(bt_row_ptr + kpos // block_size, mask=kv_ok, other=0).to(tl.int64)
        row = blk * stride_cn + (kpos % block_size).to(tl.int64) * stride_cb + kv_head * stride_ch
        # Masked-off rows load zeros: an unwritten cache slot may hold NaN, and 0 * NaN would leak into acc.
        k = tl.load(k_cache_ptr + row[:, None] + dims[None, :], mask=kv_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + dims[None, :], mask=kv_ok[:, None], other=0.0)
        if FP32_DOT:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:  # bf16/fp16 products are exact in fp32, and the tensor cores accumulate in fp32
            qk = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            qk = cap_log2e * tanh(qk * qk_scale)
        else:
            qk = qk * qk_scale
        visible = (kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] >= q_lo[:, None]) & kv_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,
    v_cache_ptr,  # [N, B, Hk, D]
    bt_ptr,  # [S, max_blocks] int32
    cu_ptr,  # [S + 1] int32
    seq_lens_ptr,  # [S] int32
    out_ptr,  # [T, Hq, D]
    qk_scale,
    cap_log2e,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cn,
    stride_cb,
    stride_ch,
    stride_bt,
    num_seqs,
    group,
    block_size,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FP32_DOT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = (head // group).to(tl.int64)
    # 1. Which sequence, and which of its tiles: the last sequence whose first tile is at or before this one.
    seqs = tl.arange(0, BLOCK_S)
    seq_ok = seqs < num_seqs
    firsts = tl.load(cu_ptr + seqs, mask=seq_ok, other=0) // BLOCK_M + seqs
    s = tl.sum(((firsts <= tile) & seq_ok).to(tl.int32), axis=0) - 1
    q_start = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    local = tile - (q_start // BLOCK_M + s)
    # 2. This tile's query rows and how far into the context the last of them sees.
    rows = local * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = seq_len - q_len + rows
    kv_end = tl.minimum(seq_len, seq_len - q_len + (local + 1) * BLOCK_M)
    kv_end = tl.where(local * BLOCK_M < q_len, kv_end, 0)
    # The first row sees furthest back. Starting exactly there (not at a tile boundary below it) means no key,
    # and so no block-table entry, before the window is ever loaded, without an extra load mask.
    kv_start = window_start(seq_len - q_len + local * BLOCK_M, window)
    # 3. Attend, then normalise and store.
    dims = tl.arange(0, D)
    tok = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a row with nothing visible yet must not make NaNs
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m_i, l_i, acc = attend_tile(
        q,
        m_i,
        l_i,
        acc,
        q_pos,
        window_start(q_pos, window),
        k_cache_ptr,
        v_cache_ptr,
        bt_ptr + s.to(tl.int64) * stride_bt,
        kv_head,
        stride_cn,
        stride_cb,
        stride_ch,
        block_size,
        kv_start,
        kv_end,
        qk_scale,
        cap_log2e,
        D=D,
        BLOCK_N=BLOCK_N,
        FP32_DOT=FP32_DOT,
        SOFTCAP=SOFTCAP,
    )
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_ot + head * stride_oh + dims[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def check_paged_args(q, k_cache, v_cache, block_tables, seq_lens, out) -> None:
    for name, t, nd in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        check_rows(name, t, nd)
        check_float(name, t)
    check(
        k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k_cache and v_cache differ"
    )
    hq, d = q.shape[1], q.shape[2]
    hk = k_cache.shape[2]
    check(k_cache.shape[3] == d, f"head dim: q has {d}, cache has {k_cache.shape[3]}")
    check(d >= 16 and d & (d - 1) == 0, f"head dim {d} must be a power of two >= 16")
    check(hq % hk == 0, f"{hq} q heads are not a multiple of {hk} kv heads")
    check(
        block_tables.dim() == 2 and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1,
        "block_tables: expected [S, max_blocks] int32 with contiguous rows",
    )
    check(
        seq_lens.dim() == 1 and seq_lens.dtype == torch.int32 and seq_lens.is_contiguous(),
        "seq_lens: [S] int32",
    )
    check(seq_lens.shape[0] == block_tables.shape[0], "seq_lens and block_tables disagree on S")
    if out is not None:
        check_rows("out", out, 3)
        check(out.shape == q.shape and out.dtype == q.dtype, "out must match q in shape and dtype")
    check_same_device(q, k_cache, v_cache, block_tables, seq_lens)


def _blocks(num_tokens: int, num_seqs: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps); tiny under the interpreter, where every program costs."""
    if interpreting():
        return 16, 16, 1
    avg = max(num_tokens // max(num_seqs, 1), 1)
    block_m = min(max(next_pow2(avg), 16), 128 if head_dim <= 64 else 64)
    return block_m, 64, 4 if block_m <= 64 else 8


def score_scales(scale: float, sliding_window: int, softcap: float) -> tuple[int, float, float]:
    """Checks the options -> (window, qk_scale, cap_log2e) for the kernels. The online softmax works in log2
    units (exp2 is the fast instruction), so a score s = scale * q.k enters as s * log2(e). The cap applies to
    the natural-units score, so with one the kernel takes tanh(q.k * scale / c) and multiplies by c * log2(e)
    after; without one, q.k * scale * log2(e) exactly as before the option existed."""
    check(int(sliding_window) == sliding_window and sliding_window >= 0, f"sliding_window={sliding_window!r}")
    check(math.isfinite(softcap) and softcap >= 0, f"softcap={softcap!r}")
    if softcap > 0:
        return int(sliding_window), float(scale) / softcap, float(softcap) * LOG2E
    return int(sliding_window), float(scale) * LOG2E, 0.0


def paged_prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_query_lens,
    seq_lens,
    scale: float,
    out=None,
    sliding_window: int = 0,
    softcap: float = 0.0,
):
    """q [T, Hq, D] -> out [T, Hq, D]; see the module doc for the other arguments."""
    check_paged_args(q, k_cache, v_cache, block_tables, seq_lens, out)
    window, qk_scale, cap_log2e = score_scales(scale, sliding_window, softcap)
    S = seq_lens.shape[0]
    check(
        cu_query_lens.shape == (S + 1,)
        and cu_query_lens.dtype == torch.int32
        and cu_query_lens.is_contiguous(),
        f"cu_query_lens: expected [{S + 1}] int32",
    )
    T, Hq, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or S == 0:
        return out
    block_m, block_n, warps = _blocks(T, S, D)
    grid = (T // block_m + S, Hq)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_query_lens,
        seq_lens,
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
        Hq // k_cache.shape[2],
        k_cache.shape[1],
        D=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_S=next_pow2(S),
        FP32_DOT=interpreting() or q.dtype == torch.float32,
        # A constexpr, so that without a cap the loop has no tanh in it at all (it would cost as much as the
        # softmax's exp2). The window stays a runtime value: it costs a compare per score.
        SOFTCAP=softcap > 0,
        num_warps=warps,
        num_stages=2,
    )
    return out


def gather_context(cache: torch.Tensor, table_row: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    """cache [N, B, Hk, D], one block table row -> the entries of tokens start..length, [length - start, Hk,
    D]. Table entries for blocks before `start` are not read."""
    B = cache.shape[1]
    first, nblocks = start // B, math.ceil(length / B)
    return cache[table_row[first:nblocks].long()].flatten(0, 1)[start - first * B : length - first * B]


def attend_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_start: int = 0,
) -> torch.Tensor:
    """q [M, Hq, D], k/v [L, Hk, D] for key positions k_start.., q_pos [M] -> [M, Hq, D] in fp32; key j is
    visible to row i when j <= q_pos[i], and with a window when j > q_pos[i] - sliding_window."""
    M, Hq, D = q.shape
    L, Hk, _ = k.shape
    qf = q.float().view(M, Hk, Hq // Hk, D).permute(1, 2, 0, 3)  # [Hk, G, M, D]
    kf = k.float().permute(1, 0, 2).unsqueeze(1)  # [Hk, 1, L, D]
    vf = v.float().permute(1, 0, 2).unsqueeze(1)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [Hk, G, M, L]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    kpos = torch.arange(k_start, k_start + L, device=q.device)[None, :]
    visible = kpos <= q_pos[:, None]
    if sliding_window > 0:
        visible &= kpos > q_pos[:, None] - sliding_window
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (probs @ vf).permute(2, 0, 1, 3).reshape(M, Hq, D)


def paged_prefill_attention_ref(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_query_lens,
    seq_lens,
    scale: float,
    out=None,
    sliding_window: int = 0,
    softcap: float = 0.0,
):
    """Plain-torch reference; same signature and results as `paged_prefill_attention`. Like the kernel, it
    reads no key before the chunk's first visible one."""
    score_scales(scale, sliding_window, softcap)  # the same argument checks
    if out is None:
        out = torch.empty_like(q)
    cu = cu_query_lens.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = cu[s], cu[s + 1]
        if q1 == q0:
            continue
        first_q = seq_len - (q1 - q0)
        start = max(0, first_q - sliding_window + 1) if sliding_window > 0 else 0
        k = gather_context(k_cache, block_tables[s], seq_len, start)
        v = gather_context(v_cache, block_tables[s], seq_len, start)
        q_pos = torch.arange(first_q, seq_len, device=q.device)
        o = attend_ref(q[q0:q1], k, v, q_pos, scale, sliding_window, softcap, k_start=start)
        out[q0:q1] = o.to(out.dtype)
    return out
