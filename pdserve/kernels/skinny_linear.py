"""Linear layer for a handful of rows (decode: one token per sequence): y = x W^T (+ b), W [N, K] row-major.

At batch 1 a decode step is a stream of weight bytes. cuBLAS's tiles for M=1 leave part of the bandwidth
unused (H100, Llama-8B shapes, weights rotated past L2, in CUDA graphs: o_proj 4096x4096 16.6 us = 2.0 TB/s,
lm_head 372 us = 2.8 TB/s; `bench/results/logs/skinny_linear-h100-20261123.log.gz`). Here each program owns
BLOCK_N output features and streams their rows of W along K once, for all rows of x at once (x is tiny and
stays in cache); BLOCK_N=32 x BLOCK_K=512 tiles, 3 stages deep, keep enough bytes in flight: o_proj 14.5 us,
lm_head 340 us. Products accumulate in fp32 (tl.dot on 16-row tiles, the padding rows masked) and the result
is rounded once to the output dtype, as cuBLAS does. For M <= MAX_ROWS only; `pdserve.kernels.dispatch.linear`
decides when it is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels._common import check, check_float, check_rows, interpreting

MAX_ROWS = 16


@triton.jit
def _skinny_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] or a dummy when not HAS_BIAS
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        w = tl.load(
            w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_K]
        x = tl.load(
            x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]
        if FP32_DOT:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _blocks(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if interpreting():
        return 16, 32, 1, 1
    return 32, 512, 4, 3


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), weight [N, K], bias [N] or None -> [M, N] in x.dtype."""
    check_rows("x", x, 2)
    check_rows("weight", weight, 2)
    check_float("x", x)
    M, K = x.shape
    N = weight.shape[0]
    check(weight.shape[1] == K, f"x has {K} features, weight {tuple(weight.shape)}")
    check(M <= MAX_ROWS, f"skinny_linear takes at most {MAX_ROWS} rows, got {M}")
    check(x.dtype == weight.dtype, f"x is {x.dtype}, weight {weight.dtype}")
    check(bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bias must be a contiguous [N]")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    block_n, block_k, warps, stages = _blocks(N, K)
    _skinny_linear_kernel[(triton.cdiv(N, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        FP32_DOT=interpreting() or x.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def skinny_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch reference; same signature and results as `skinny_linear`."""
    return F.linear(x, weight, bias)
