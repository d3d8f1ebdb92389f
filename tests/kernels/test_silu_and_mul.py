"""SiLU-and-mul: reference against the formula, Triton against the reference."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from tests.kernels.paged import tol


def _x(T, inter, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (
        (3 * torch.randn((T, 2 * inter + 3), generator=gen)).to(dtype).to(device)[:, : 2 * inter]
    )  # strided


def test_ref_matches_formula():
    x = _x(5, 37, torch.float64, seed=0)
    want = F.silu(x[:, :37]) * x[:, 37:]
    torch.testing.assert_close(silu_and_mul_ref(x.float()).double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [37, 300])
def test_triton_matches_ref(inter, dtype):
    x = _x(7, inter, dtype, seed=1)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
@pytest.mark.parametrize("inter", [14336, 4864])
def test_triton_matches_ref_gpu(inter, tokens):
    x = _x(tokens, inter, torch.bfloat16, seed=2, device="cuda")
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **tol(torch.bfloat16))
