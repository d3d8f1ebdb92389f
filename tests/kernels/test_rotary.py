"""Rotary embedding (and the fused rotary + KV-cache write): reference against transformers' rotate_half
formulation, Triton against the reference. q and k are strided views of one fused qkv tensor, as in the
model."""

import pytest
import torch

from pdserve.kernels.rotary import (
    apply_rotary,
    apply_rotary_and_write_kv,
    apply_rotary_and_write_kv_ref,
    apply_rotary_ref,
)
from tests.kernels.paged import tol

MAX_POS = 64


def cos_sin_cache(max_pos, d, base=10000.0, device="cpu"):
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def _qkv(T, hq, hk, d, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn((T, hq + 2 * hk, d), generator=gen).to(dtype).to(device)
    positions = torch.randint(0, MAX_POS, (T,), generator=gen).to(device)
    return positions, qkv


def _split(qkv, hq, hk):
    return qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]


def test_ref_matches_transformers():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    positions, qkv = _qkv(7, 6, 3, 16, torch.float32, seed=0)
    q, k, _ = _split(qkv.clone(), 6, 3)
    freqs = cos_sin_cache(MAX_POS, 16)[positions]
    cos = torch.cat((freqs[:, :8], freqs[:, :8]), -1)[None]  # HF repeats the frequencies over both halves
    sin = torch.cat((freqs[:, 8:], freqs[:, 8:]), -1)[None]
    want_q, want_k = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    apply_rotary_ref(positions, q, k, cos_sin_cache(MAX_POS, 16))
    torch.testing.assert_close(q, want_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, want_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(6, 3, 16), (5, 1, 32)])
def test_triton_matches_ref(heads, dtype):
    hq, hk, d = heads
    positions, qkv = _qkv(7, hq, hk, d, dtype, seed=1)
    want, got = qkv.clone(), qkv.clone()
    apply_rotary_ref(positions, *_split(want, hq, hk)[:2], cos_sin_cache(MAX_POS, d))
    apply_rotary(positions, *_split(got, hq, hk)[:2], cos_sin_cache(MAX_POS, d))
    torch.testing.assert_close(got, want, **tol(dtype))
    assert torch.equal(got[:, hq + hk :], qkv[:, hq + hk :])  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(6, 3, 16), (5, 1, 32)])
def test_fused_write_matches_ref(heads, dtype):
    hq, hk, d = heads
    T, N, B = 7, 3, 16
    positions, qkv = _qkv(T, hq, hk, d, dtype, seed=2)
    slots = torch.randperm(N * B)[:T]
    slots[3] = -1  # padding: not written
    caches = {name: torch.full((2, N, B, hk, d), float("nan"), dtype=dtype) for name in ("want", "got")}
    tensors = {"want": qkv.clone(), "got": qkv.clone()}
    for name, fn in (("want", apply_rotary_and_write_kv_ref), ("got", apply_rotary_and_write_kv)):
        q, k, v = _split(tensors[name], hq, hk)
        fn(positions, q, k, v, caches[name][0], caches[name][1], slots, cos_sin_cache(MAX_POS, d))
    torch.testing.assert_close(tensors["got"], tensors["want"], **tol(dtype))
    torch.testing.assert_close(caches["got"], caches["want"], equal_nan=True, **tol(dtype))
    assert caches["got"].isnan().sum() == 2 * (N * B - (T - 1)) * hk * d


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
@pytest.mark.parametrize("heads", [(32, 8, 128), (14, 2, 64)], ids=["llama8b", "qwen0.5b"])
def test_triton_matches_ref_gpu(heads, tokens):
    hq, hk, d = heads
    positions, qkv = _qkv(tokens, hq, hk, d, torch.bfloat16, seed=3, device="cuda")
    positions = positions * 100  # spread over a long context
    cache = cos_sin_cache(100 * MAX_POS, d, base=500000.0, device="cuda")
    N, B = tokens // 16 + 2, 16
    slots = torch.randperm(N * B, device="cuda")[:tokens]
    kv = {n: torch.zeros((2, N, B, hk, d), dtype=torch.bfloat16, device="cuda") for n in ("want", "got")}
    tensors = {"want": qkv.clone(), "got": qkv.clone()}
    for name, fn in (("want", apply_rotary_and_write_kv_ref), ("got", apply_rotary_and_write_kv)):
        q, k, v = _split(tensors[name], hq, hk)
        fn(positions, q, k, v, kv[name][0], kv[name][1], slots, cache)
    torch.testing.assert_close(tensors["got"], tensors["want"], **tol(torch.bfloat16))
    torch.testing.assert_close(kv["got"], kv["want"], **tol(torch.bfloat16))
