"""Rotary position embedding, NeoX / Hugging Face style (rotate_half), applied to q and k in place.

    x1, x2 = x[..., :D/2], x[..., D/2:]
    x      = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)

`cos_sin_cache[pos]` holds the D/2 cosines then the D/2 sines for position pos (fp32). q and k may be strided
views (slices of a fused qkv projection): only their last dim must be contiguous. `apply_rotary_and_write_kv`
also writes the rotated k and v into the paged cache in the same pass (one read of k instead of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import check, check_float, check_rows, check_same_device, next_pow2
from pdserve.kernels.kv_cache_write import check_kv_cache_args, write_kv_cache_ref


@triton.jit
def _rotate_heads(
    x_ptr,
    tok,
    stride_t,
    stride_h,
    num_heads,
    cos,
    sin,  # x [T, H, D]; cos/sin [HALF] fp32
    cache_ptr,
    blk,
    off,
    stride_cn,
    stride_cb,
    stride_ch,
    do_write,  # optional copy of the result into the cache
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WRITE: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    for h0 in range(0, num_heads, BLOCK_H):
        h = h0 + heads
        mask = h[:, None] < num_heads
        p1 = x_ptr + tok * stride_t + h[:, None] * stride_h + dims[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty)
        o2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty)
        tl.store(p1, o1, mask=mask)
        tl.store(p1 + HALF, o2, mask=mask)
        if WRITE:
            # One comparison, not `mask & do_write`: kv_cache_write.py says why.
            write_mask = h[:, None] < tl.where(do_write, num_heads, 0)
            c1 = cache_ptr + blk * stride_cn + off * stride_cb + h[:, None] * stride_ch + dims[None, :]
            tl.store(c1, o1.to(cache_ptr.dtype.element_ty), mask=write_mask)
            tl.store(c1 + HALF, o2.to(cache_ptr.dtype.element_ty), mask=write_mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,  # [T] int64
    q_ptr,  # [T, Hq, D], rotated in place
    k_ptr,  # [T, Hk, D], rotated in place
    cs_ptr,  # [max_pos, D] fp32: cos then sin
    v_ptr,  # [T, Hk, D] (read only when WRITE_KV)
    k_cache_ptr,
    v_cache_ptr,  # [N, B, Hk, D] (written only when WRITE_KV)
    slot_ptr,  # [T] int64 (read only when WRITE_KV)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_cn,
    stride_cb,
    stride_ch,  # cache strides (shared by k_cache and v_cache)
    Hq,
    Hk,
    block_size,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WRITE_KV: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + dims)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + dims)
    slot = tok * 0 - 1
    if WRITE_KV:
        slot = tl.load(slot_ptr + tok).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    do_write = slot >= 0
    _rotate_heads(
        q_ptr,
        tok,
        stride_qt,
        stride_qh,
        Hq,
        cos,
        sin,
        k_cache_ptr,
        blk,
        off,
        stride_cn,
        stride_cb,
        stride_ch,
        do_write,
        HALF=HALF,
        BLOCK_H=BLOCK_H,
        WRITE=False,
    )
    _rotate_heads(
        k_ptr,
        tok,
        stride_kt,
        stride_kh,
        Hk,
        cos,
        sin,
        k_cache_ptr,
        blk,
        off,
        stride_cn,
        stride_cb,
        stride_ch,
        do_write,
        HALF=HALF,
        BLOCK_H=BLOCK_H,
        WRITE=WRITE_KV,
    )
    if WRITE_KV:
        heads = tl.arange(0, BLOCK_H)
        full = tl.arange(0, 2 * HALF)
        for h0 in range(0, Hk, BLOCK_H):
            h = h0 + heads
            mask = h[:, None] < tl.where(do_write, Hk, 0)  # one comparison: kv_cache_write.py says why
            v = tl.load(v_ptr + tok * stride_vt + h[:, None] * stride_vh + full[None, :], mask=mask)
            dst = v_cache_ptr + blk * stride_cn + off * stride_cb + h[:, None] * stride_ch + full[None, :]
            tl.store(dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_rotary_args(positions, q, k, cos_sin_cache) -> None:
    check_rows("q", q, 3)
    check_rows("k", k, 3)
    check_float("q", q)
    check_float("k", k)
    T, _, D = q.shape
    check(k.shape[0] == T and k.shape[2] == D, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    check(D >= 2 and D & (D - 1) == 0, f"head dim {D} must be a power of two")
    check(
        positions.shape == (T,) and positions.dtype in (torch.int64, torch.int32),
        "positions: expected [T] int",
    )
    check(positions.is_contiguous(), "positions must be contiguous")
    check(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == D, f"cos_sin_cache: expected [max_pos, {D}]")
    check(
        cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1,
        "cos_sin_cache: contiguous fp32",
    )
    check_same_device(positions, q, k, cos_sin_cache)


def _launch(positions, q, k, cos_sin_cache, v, k_cache, v_cache, slot_mapping, write_kv: bool) -> None:
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if T == 0:
        return
    block_h = min(next_pow2(max(Hq, Hk)), max(1, 4096 // D))
    _rotary_kernel[(T,)](
        positions,
        q,
        k,
        cos_sin_cache,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        Hq,
        Hk,
        k_cache.shape[1],
        HALF=D // 2,
        BLOCK_H=block_h,
        WRITE_KV=write_kv,
        num_warps=4,
    )


def apply_rotary(positions, q, k, cos_sin_cache) -> None:
    """positions [T] int64, q [T, Hq, D], k [T, Hk, D], cos_sin_cache [max_pos, D] fp32. Rotates q and k in
    place."""
    _check_rotary_args(positions, q, k, cos_sin_cache)
    dummy_cache = k.unsqueeze(1)  # [T, 1, Hk, D]; never touched when WRITE_KV is off
    _launch(positions, q, k, cos_sin_cache, k, dummy_cache, dummy_cache, positions, write_kv=False)


def apply_rotary_and_write_kv(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache) -> None:
    """`apply_rotary`, then the rotated k and v written to the cache at slot_mapping (negative = skip); one
    pass."""
    _check_rotary_args(positions, q, k, cos_sin_cache)
    check_kv_cache_args(k, v, k_cache, v_cache, slot_mapping)
    _launch(positions, q, k, cos_sin_cache, v, k_cache, v_cache, slot_mapping, write_kv=True)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def apply_rotary_ref(positions, q, k, cos_sin_cache) -> None:
    """Plain-torch reference; same signature and effect as `apply_rotary`."""
    cs = cos_sin_cache.index_select(0, positions.long())  # [T, D]
    half = cs.shape[1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    _rotate_ref(q, cos, sin)
    _rotate_ref(k, cos, sin)


def apply_rotary_and_write_kv_ref(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache) -> None:
    """Plain-torch reference; same signature and effect as `apply_rotary_and_write_kv`."""
    apply_rotary_ref(positions, q, k, cos_sin_cache)
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
