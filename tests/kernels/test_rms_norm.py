"""RMSNorm (+ residual): reference against transformers' LlamaRMSNorm, Triton against the reference."""

import pytest
import torch

from pdserve.kernels.rms_norm import rms_norm, rms_norm_ref
from tests.kernels.paged import tol


def _inputs(T, H, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn((T, H + 5), generator=gen).to(dtype).to(device)
    x = wide[:, 2 : H + 2]  # a strided view
    residual = torch.randn((T, H), generator=gen).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype).to(device)
    return x, residual, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ref_matches_transformers(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, residual, weight = _inputs(7, 48, dtype, seed=0)
    norm = llama.LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        torch.testing.assert_close(rms_norm_ref(x, weight, 1e-5), norm(x), atol=0, rtol=0)
        out, new_residual = rms_norm_ref(x, weight, 1e-5, residual)
        torch.testing.assert_close(new_residual, residual + x, atol=0, rtol=0)
        torch.testing.assert_close(out, norm(residual + x), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [48, 100])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_ref(with_residual, hidden, dtype):
    x, residual, weight = _inputs(7, hidden, dtype, seed=1)
    res = residual if with_residual else None
    want = rms_norm_ref(x, weight, 1e-6, res)
    got = rms_norm(x, weight, 1e-6, res)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
@pytest.mark.parametrize("hidden", [4096, 896])
def test_triton_matches_ref_gpu(hidden, tokens):
    x, residual, weight = _inputs(tokens, hidden, torch.bfloat16, seed=2, device="cuda")
    torch.testing.assert_close(
        rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), **tol(torch.bfloat16)
    )
    (out, new_res), (want, want_res) = (
        rms_norm(x, weight, 1e-5, residual),
        rms_norm_ref(x, weight, 1e-5, residual),
    )
    torch.testing.assert_close(new_res, want_res, atol=0, rtol=0)
    torch.testing.assert_close(out, want, **tol(torch.bfloat16))
