"""Skinny linear (decode-size rows against a big weight): Triton against F.linear, and when dispatch uses
it."""

import pytest
import torch
import torch.nn.functional as F

import pdserve.kernels.dispatch as dispatch
from pdserve.kernels import skinny_linear as sk
from pdserve.kernels.skinny_linear import skinny_linear, skinny_linear_ref
from tests.kernels.paged import tol


def _args(M, N, K, dtype, bias, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((M, K + 5), generator=gen)[:, :K]  # strided rows
    w = torch.randn((N, K), generator=gen) / K**0.5
    b = torch.randn(N, generator=gen) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(w), cast(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "M,N,K,bias", [(1, 37, 45, True), (5, 50, 100, False), (16, 33, 70, True), (3, 1, 17, False)]
)
def test_triton_matches_ref(M, N, K, bias, dtype):
    x, w, b = _args(M, N, K, dtype, bias, seed=M * 100 + N)
    torch.testing.assert_close(skinny_linear(x, w, b), skinny_linear_ref(x, w, b), **tol(dtype))


def test_ref_is_linear():
    x, w, b = _args(4, 9, 11, torch.float64, True, seed=1)
    torch.testing.assert_close(skinny_linear_ref(x, w, b), x @ w.T + b)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x, w: (torch.randn(17, 8), torch.randn(4, 8)), "at most 16 rows"),
        (lambda x, w: (x, torch.randn(4, 9)), "features"),
        (lambda x, w: (x, w.half()), "weight"),
    ],
)
def test_bad_arguments_are_refused(bad, match):
    x, w = bad(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=match):
        skinny_linear(x, w)


def test_dispatch_routes_only_small_batches_with_big_weights(monkeypatch):
    calls = []
    real = sk.skinny_linear
    monkeypatch.setattr(sk, "skinny_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setenv("PDSERVE_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "SKINNY_MIN_WEIGHT", 40 * 30)
    big = torch.randn(40, 30)
    small = torch.randn(39, 30)
    for rows, weight in ((1, big), (16, big), (17, big), (1, small)):
        x = torch.randn(rows, 30)
        torch.testing.assert_close(dispatch.linear(x, weight), F.linear(x, weight), **tol(torch.float32))
    assert calls == [1, 16]  # 17 rows and the small weight went to F.linear
    monkeypatch.setenv("PDSERVE_KERNELS", "ref")
    dispatch.linear(torch.randn(1, 30), big)
    assert calls == [1, 16]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("N,K", [(4096, 4096), (6144, 4096), (4096, 14336), (151936, 896), (1000, 333)])
def test_triton_matches_ref_gpu(M, N, K):
    x, w, b = _args(M, N, K, torch.bfloat16, N == 6144, seed=M, device="cuda")
    torch.testing.assert_close(skinny_linear(x, w, b), skinny_linear_ref(x, w, b), **tol(torch.bfloat16))
