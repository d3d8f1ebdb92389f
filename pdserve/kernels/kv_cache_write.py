"""Write a step's keys and values into the paged KV cache through a slot mapping.

slot = block_id * block_size + offset; a negative slot (padding) is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import check, check_float, check_rows, check_same_device, next_pow2


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [T, Hk, D]
    value_ptr,  # [T, Hk, D]
    k_cache_ptr,  # [N, B, Hk, D]
    v_cache_ptr,  # [N, B, Hk, D]
    slot_ptr,  # [T] int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,  # key/value strides, in elements
    stride_cn,
    stride_cb,
    stride_ch,  # cache strides (shared by k_cache and v_cache)
    Hk,
    block_size,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, D)
    for h0 in range(0, Hk, BLOCK_H):
        h = h0 + heads
        # One comparison, not `(h < Hk) & (slot >= 0)`: a block mask and-ed with a scalar bool comes out int32
        # under triton 3.9's interpreter, which then refuses it as a mask.
        mask = h[:, None] < tl.where(slot >= 0, Hk, 0)
        k = tl.load(key_ptr + tok * stride_kt + h[:, None] * stride_kh + dims[None, :], mask=mask)
        v = tl.load(value_ptr + tok * stride_vt + h[:, None] * stride_vh + dims[None, :], mask=mask)
        dst = blk * stride_cn + off * stride_cb + h[:, None] * stride_ch + dims[None, :]
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_kv_cache_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    for name, t, nd in (
        ("key", key, 3),
        ("value", value, 3),
        ("k_cache", k_cache, 4),
        ("v_cache", v_cache, 4),
    ):
        check_rows(name, t, nd)
        check_float(name, t)
    check(key.shape == value.shape, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    check(
        k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k_cache and v_cache differ"
    )
    check(
        k_cache.shape[2:] == key.shape[1:],
        f"cache {tuple(k_cache.shape)} does not fit key {tuple(key.shape)}",
    )
    check(slot_mapping.shape == (key.shape[0],), f"slot_mapping: expected [{key.shape[0]}]")
    check(slot_mapping.dtype in (torch.int64, torch.int32), "slot_mapping must be int64 or int32")
    check(slot_mapping.is_contiguous(), "slot_mapping must be contiguous")
    d = key.shape[-1]
    check(d & (d - 1) == 0, f"head dim {d} must be a power of two")
    check_same_device(key, value, k_cache, v_cache, slot_mapping)


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key/value [T, Hk, D] -> k_cache/v_cache [N, B, Hk, D] at slot_mapping [T] (negative = skip). In
    place."""
    check_kv_cache_args(key, value, k_cache, v_cache, slot_mapping)
    T, Hk, D = key.shape
    if T == 0:
        return
    block_h = min(next_pow2(Hk), max(1, 4096 // D))
    _write_kv_cache_kernel[(T,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        Hk,
        k_cache.shape[1],
        D=D,
        BLOCK_H=block_h,
        num_warps=4,
    )


def write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Plain-torch reference; same signature and effect as `write_kv_cache`."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    k_cache[blk, off] = key[keep].to(k_cache.dtype)
    v_cache[blk, off] = value[keep].to(v_cache.dtype)
