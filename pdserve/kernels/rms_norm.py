"""RMSNorm with an optional fused residual add, in the order and rounding of Hugging Face's RMSNorms.

    s   = x + residual                          (rounded to x.dtype; returned as the new residual)
    out = weight * (s * rsqrt(mean(s^2) + eps)).to(x.dtype)   (normalised in fp32; LlamaRMSNorm's order)
    out = (weight * (s * rsqrt(mean(s^2) + eps))).to(x.dtype) (a float32 weight: Gemma's order)

The output has x's dtype. Llama's family keeps the weight in the activation dtype and rounds the normalised
value before multiplying; Gemma's norms multiply by (1 + w) in fp32 and round once, so the engine keeps their
weight (the 1 folded in) in float32, and a float32 weight selects that order. In an fp32 model both agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import check, check_float, check_rows, check_same_device, next_pow2

MAX_HIDDEN = 65536  # one row per program, held in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H] input
    res_ptr,  # [T, H] residual (read only when HAS_RESIDUAL)
    w_ptr,  # [H]
    out_ptr,  # [T, H] normalised output
    res_out_ptr,  # [T, H] x + residual (written only when HAS_RESIDUAL)
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,  # row strides, in elements
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_FIRST: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    s = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        s_rounded = (s + r.to(tl.float32)).to(x.dtype)  # HF adds in the activation dtype
        tl.store(res_out_ptr + row * stride_res_out + cols, s_rounded, mask=mask)
        s = s_rounded.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / H + eps)
    normed = s * inv_rms
    if ROUND_FIRST:  # Llama's order: back to the activation dtype before the weight multiply
        normed = normed.to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [T, H], weight [H], residual [T, H] or None -> out, or (out, new_residual) when residual is given."""
    check_rows("x", x, 2)
    check_float("x", x)
    T, H = x.shape
    check(
        weight.shape == (H,) and weight.is_contiguous(),
        f"weight: expected contiguous [{H}], got {tuple(weight.shape)}",
    )
    check(H <= MAX_HIDDEN, f"hidden size {H} above {MAX_HIDDEN}")
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    has_residual = residual is not None
    if has_residual:
        check_rows("residual", residual, 2)
        check(
            residual.shape == x.shape and residual.dtype == x.dtype,
            "residual must match x in shape and dtype",
        )
        check_same_device(x, weight, residual)
        new_residual = torch.empty_like(out)
    else:
        check_same_device(x, weight)
        residual = new_residual = out  # placeholders; the kernel does not touch them
    if T == 0:
        return (out, new_residual) if has_residual else out
    block_h = next_pow2(H)
    _rms_norm_kernel[(T,)](
        x,
        residual,
        weight,
        out,
        new_residual,
        x.stride(0),
        residual.stride(0),
        out.stride(0),
        new_residual.stride(0),
        H,
        float(eps),
        HAS_RESIDUAL=has_residual,
        ROUND_FIRST=weight.dtype != torch.float32,
        BLOCK_H=block_h,
        num_warps=min(max(block_h // 256, 1), 16),
    )
    return (out, new_residual) if has_residual else out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Plain-torch reference; same signature and results as `rms_norm`."""
    s = x if residual is None else x + residual
    sf = s.float()
    normed = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32:  # Gemma's order: the fp32 product, rounded once
        out = (weight * normed).to(x.dtype)
    else:
        out = (weight * normed.to(x.dtype)).to(x.dtype)
    return out if residual is None else (out, s)
