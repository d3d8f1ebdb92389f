"""The kernel entry points the engine calls: each runs the Triton kernel when its first tensor is on CUDA,
else the plain-torch reference. `PDSERVE_KERNELS=triton|ref|auto` (default auto) overrides, read at every
call, so tests can force Triton under TRITON_INTERPRET on CPU."""

from __future__ import annotations

import os

import torch

from pdserve.kernels import block_copy, decode_attention, kv_cache_write, prefill_attention, rotary
from pdserve.kernels import fused_moe as _moe
from pdserve.kernels import rms_norm as _rms
from pdserve.kernels import silu_and_mul as _silu
from pdserve.kernels import skinny_linear as _skinny

_MODES = ("auto", "triton", "ref")

# Weights from this many elements up go to the skinny kernel at decode batch sizes: there it beats cuBLAS by
# up to 12% (Llama-8B: o_proj, down_proj, lm_head; gate_up even); on smaller ones (Qwen-0.5B) it was not
# faster.
SKINNY_MIN_WEIGHT = 1 << 24


def kernels_mode() -> str:
    """$PDSERVE_KERNELS: auto (Triton on GPU tensors, the torch references on CPU ones), triton or ref."""
    mode = os.environ.get("PDSERVE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"PDSERVE_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    mode = kernels_mode()
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def rms_norm(x, weight, eps: float, residual=None):
    return (_rms.rms_norm if use_triton(x) else _rms.rms_norm_ref)(x, weight, eps, residual)


def apply_rotary(positions, q, k, cos_sin_cache) -> None:
    (rotary.apply_rotary if use_triton(positions) else rotary.apply_rotary_ref)(
        positions, q, k, cos_sin_cache
    )


def apply_rotary_and_write_kv(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache) -> None:
    fn = rotary.apply_rotary_and_write_kv if use_triton(positions) else rotary.apply_rotary_and_write_kv_ref
    fn(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache)


def linear(x, weight, bias=None):
    """y = x W^T + b: the skinny Triton kernel for a few rows of x against a big weight, else cuBLAS/torch."""
    if (
        x.dim() == 2
        and x.shape[0] <= _skinny.MAX_ROWS
        and weight.numel() >= SKINNY_MIN_WEIGHT
        and x.dtype == weight.dtype
        and use_triton(x)
    ):
        return _skinny.skinny_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def silu_and_mul(x):
    return (_silu.silu_and_mul if use_triton(x) else _silu.silu_and_mul_ref)(x)


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, out=None):
    return (_moe.fused_moe if use_triton(hidden) else _moe.fused_moe_ref)(
        hidden, w13, w2, topk_weights, topk_ids, out
    )


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    fn = kv_cache_write.write_kv_cache if use_triton(key) else kv_cache_write.write_kv_cache_ref
    fn(key, value, k_cache, v_cache, slot_mapping)


def paged_prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_query_lens,
    seq_lens,
    scale: float,
    out=None,
    sliding_window=0,
    softcap=0.0,
):
    """sliding_window and softcap (0: off) are explained in kernels/prefill_attention.py's doc."""
    m = prefill_attention
    fn = m.paged_prefill_attention if use_triton(q) else m.paged_prefill_attention_ref
    return fn(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens, scale, out, sliding_window, softcap)


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, scale: float, out=None, sliding_window=0, softcap=0.0
):
    m = decode_attention
    fn = m.paged_decode_attention if use_triton(q) else m.paged_decode_attention_ref
    return fn(q, k_cache, v_cache, block_tables, seq_lens, scale, out, sliding_window, softcap)


def gather_blocks(cache, block_ids, out=None):
    return (block_copy.gather_blocks if use_triton(cache) else block_copy.gather_blocks_ref)(
        cache, block_ids, out
    )


def scatter_blocks(src, block_ids, cache) -> None:
    (block_copy.scatter_blocks if use_triton(src) else block_copy.scatter_blocks_ref)(src, block_ids, cache)


def copy_blocks(src, src_ids, dst, dst_ids) -> None:
    (block_copy.copy_blocks if use_triton(src) else block_copy.copy_blocks_ref)(src, src_ids, dst, dst_ids)


def block_copier(src, dst):
    """A per-(src, dst) copy_blocks (kernels.block_copy.BlockCopier), or the reference where Triton does not
    run."""
    if use_triton(src):
        return block_copy.BlockCopier(src, dst)
    return lambda src_ids, dst_ids: block_copy.copy_blocks_ref(src, src_ids, dst, dst_ids)


__all__ = [
    "linear",
    "rms_norm",
    "apply_rotary",
    "apply_rotary_and_write_kv",
    "silu_and_mul",
    "fused_moe",
    "write_kv_cache",
    "paged_prefill_attention",
    "paged_decode_attention",
    "gather_blocks",
    "scatter_blocks",
    "copy_blocks",
    "block_copier",
    "use_triton",
]
