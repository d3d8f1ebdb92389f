"""Builders for the attention tests: random dense K/V per sequence, scattered into a NaN-filled paged cache
through random disjoint block tables, and an independently written dense causal attention to check the
references by."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PAD_BLOCK = 1 << 20  # block-table padding: far out of range, so a kernel that reads it fails loudly


def make_paged(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, device="cpu", spare_blocks=3):
    """-> (dense_k, dense_v lists of [L, Hk, D], k_cache, v_cache [N, B, Hk, D], block_tables [S, max_blocks]
    int32). Unused cache slots hold NaN: a kernel that lets them into its sums gives NaN."""
    need = [math.ceil(L / block_size) for L in seq_lens]
    num_blocks = sum(need) + spare_blocks
    max_blocks = max(need) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(seq_lens), max_blocks), PAD_BLOCK, dtype=torch.int32)
    dense_k, dense_v = [], []
    for s, L in enumerate(seq_lens):
        ids, perm = perm[: need[s]], perm[need[s] :]
        tables[s, : need[s]] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn((L, num_kv_heads, head_dim), generator=gen).to(dtype).to(device)
        v = torch.randn((L, num_kv_heads, head_dim), generator=gen).to(dtype).to(device)
        full, tail = divmod(L, block_size)
        full_ids = torch.tensor(ids[:full], dtype=torch.long, device=device)
        for cache, x in ((k_cache, k), (v_cache, v)):
            cache[full_ids] = x[: full * block_size].reshape(full, block_size, num_kv_heads, head_dim)
            if tail:
                cache[ids[full], :tail] = x[full * block_size :]
        dense_k.append(k)
        dense_v.append(v)
    return dense_k, dense_v, k_cache, v_cache, tables.to(device)


def dense_causal_attention(q, k, v, scale, sliding_window=0, softcap=0.0):
    """q [M, Hq, D] are the last M positions of a context k/v [L, Hk, D] -> [M, Hq, D] fp32, by SDPA with an
    explicit mask (written apart from the kernels' references on purpose). With sliding_window, Hugging Face's
    mask (kv_idx > q_idx - sliding_window); with softcap, Gemma 2's softcap * tanh(scores / softcap), which
    SDPA cannot apply, so then the scores are written out."""
    M, Hq, _ = q.shape
    L, Hk, _ = k.shape
    rep = Hq // Hk
    qh = q.float().transpose(0, 1)  # [Hq, M, D]
    kh = k.float().repeat_interleave(rep, dim=1).transpose(0, 1)
    vh = v.float().repeat_interleave(rep, dim=1).transpose(0, 1)
    q_idx = torch.arange(M, device=q.device)[:, None] + (L - M)
    kv_idx = torch.arange(L, device=q.device)[None, :]
    mask = kv_idx <= q_idx  # [M, L]
    if sliding_window:
        mask = mask & (kv_idx > q_idx - sliding_window)
    if not softcap:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    else:
        scores = torch.einsum("hmd,hld->hml", qh, kh) * scale
        scores = torch.tanh(scores / softcap) * softcap
        out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vh
    return out.transpose(0, 1)


def tol(dtype):
    return {
        torch.float32: dict(atol=1e-4, rtol=1e-4),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]


def poison_before_window(tables, k_cache, first_pos, window, block_size):
    """Overwrite the block-table entries of blocks wholly before each sequence's first visible key (its first
    query at first_pos[s] sees keys from first_pos[s] - window + 1), as the engine may once it frees them:
    alternately PAD_BLOCK (out of range) and the id of an unwritten, NaN-filled block. A kernel that reads one
    fails or returns NaN. -> how many entries were overwritten."""
    unused = sorted(set(range(k_cache.shape[0])) - set(tables.flatten().tolist()))
    poisoned = 0
    for s, pos in enumerate(first_pos):
        for i in range(max(0, pos - window + 1) // block_size):
            tables[s, i] = PAD_BLOCK if poisoned % 2 == 0 else unused[0]
            poisoned += 1
    return poisoned
