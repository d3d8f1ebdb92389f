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


@pytest.mark.parametrize("model,cls", [("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ref_with_float32_weight_matches_gemma(model, cls, dtype):
    """Gemma's (1 + w) norm: transformers multiplies in fp32 and rounds once; the engine's weight is 1 + w in
    fp32, which selects that order. Bit-exact, where rounding first (Llama's order, 1 + w in bf16) is not."""
    module = pytest.importorskip(f"transformers.models.{model}.modeling_{model}")
    x, residual, _ = _inputs(9, 2304, dtype, seed=3)
    w = (0.3 * torch.randn(2304, generator=torch.Generator().manual_seed(4))).to(dtype)
    norm = getattr(module, cls)(2304, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(residual + x)
        got, _ = rms_norm_ref(x, 1.0 + w.float(), 1e-6, residual)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        rounded_weight = rms_norm_ref(x + residual, (1.0 + w.float()).to(dtype), 1e-6)
        assert not torch.equal(rounded_weight, want), "the test should tell the two orders apart"


@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_with_float32_weight_matches_ref(with_residual):
    """The kernel's Gemma order (fp16 here: the interpreter computes bf16 wrongly)."""
    x, residual, _ = _inputs(7, 100, torch.float16, seed=5)
    weight = 1.0 + 0.3 * torch.randn(100, generator=torch.Generator().manual_seed(6))
    res = residual if with_residual else None
    want = rms_norm_ref(x, weight, 1e-6, res)
    got = rms_norm(x, weight, 1e-6, res)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **tol(torch.float16))
