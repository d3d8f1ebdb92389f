"""KV-cache write through a slot mapping: reference against a per-token loop, Triton against the reference."""

import pytest
import torch

from pdserve.kernels.kv_cache_write import write_kv_cache, write_kv_cache_ref


def _inputs(T, hk, d, N, B, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn((T, 2 * hk + 1, d), generator=gen).to(dtype).to(device)
    key, value = kv[:, :hk], kv[:, hk : 2 * hk]  # strided views
    slots = torch.randperm(N * B, generator=gen)[:T].to(device)
    slots[T // 2] = -1
    cache = torch.full((2, N, B, hk, d), float("nan"), dtype=dtype, device=device)
    return key, value, cache, slots


def test_ref_matches_loop():
    key, value, cache, slots = _inputs(9, 3, 16, 2, 16, torch.float32, seed=0)
    want = cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want[0, slot // 16, slot % 16] = key[t]
            want[1, slot // 16, slot % 16] = value[t]
    write_kv_cache_ref(key, value, cache[0], cache[1], slots)
    torch.testing.assert_close(cache, want, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(3, 16), (1, 32), (5, 16)])
def test_triton_matches_ref(heads, dtype):
    key, value, cache, slots = _inputs(9, *heads, 2, 16, dtype, seed=1)
    want = cache.clone()
    write_kv_cache_ref(key, value, want[0], want[1], slots)
    write_kv_cache(key, value, cache[0], cache[1], slots)
    torch.testing.assert_close(cache, want, atol=0, rtol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
@pytest.mark.parametrize("heads", [(8, 128), (2, 64)], ids=["llama8b", "qwen0.5b"])
def test_triton_matches_ref_gpu(heads, tokens):
    key, value, cache, slots = _inputs(
        tokens, *heads, tokens // 16 + 2, 16, torch.bfloat16, seed=2, device="cuda"
    )
    want = cache.clone()
    write_kv_cache_ref(key, value, want[0], want[1], slots)
    write_kv_cache(key, value, cache[0], cache[1], slots)
    torch.testing.assert_close(cache, want, atol=0, rtol=0, equal_nan=True)
