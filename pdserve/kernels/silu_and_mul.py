"""SiLU-and-mul, the gated MLP's activation: silu(x[:, :I]) * x[:, I:], computed in fp32, returned in
x.dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels._common import check, check_float, check_rows, interpreting, next_pow2


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2I]: gate columns then up columns
    out_ptr,  # [T, I]
    stride_x,
    stride_out,  # row strides, in elements
    I,  # noqa: E741  (the intermediate size, as in the [T, 2I] shapes above)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> [T, I]."""
    check_rows("x", x, 2)
    check_float("x", x)
    T, two_i = x.shape
    check(two_i % 2 == 0, f"x: last dim {two_i} is not even")
    inter = two_i // 2
    out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T == 0 or inter == 0:
        return out
    block = min(next_pow2(inter), 256 if interpreting() else 2048)
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
        x,
        out,
        x.stride(0),
        out.stride(0),
        inter,
        BLOCK=block,
        num_warps=4,
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference; same signature and results as `silu_and_mul`."""
    inter = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)
