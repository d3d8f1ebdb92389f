"""Chunked-prefill paged attention: reference against dense causal attention, Triton against the reference."""

import pytest
import torch

from pdserve.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from tests.kernels.paged import dense_causal_attention, make_paged, tol

B = 16
# (query lengths, cached prefix lengths) per sequence: q_len 1 and > 1, prefixes off and on block boundaries.
CASES = {
    "mixed": ([1, 7, 19], [0, 13, 21]),
    "one-seq-aligned-prefix": ([5], [32]),
    "many": ([1, 1, 3, 17, 2], [30, 0, 5, 1, 47]),
}


def _inputs(q_lens, prefixes, hq, hk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefixes, q_lens, strict=False)]
    dense_k, dense_v, k_cache, v_cache, tables = make_paged(seq_lens, hk, d, B, dtype, gen)
    T = sum(q_lens)
    # q is a strided view, as a slice of a fused qkv projection would be.
    qkv = torch.randn((T, hq + 2 * hk, d), generator=gen).to(dtype)
    q = qkv[:, :hq]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, dense_k, dense_v, k_cache, v_cache, tables, cu, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ref_matches_dense(case, dtype):
    q_lens, prefixes = CASES[case]
    q, dk, dv, kc, vc, tables, cu, seq_lens = _inputs(q_lens, prefixes, 6, 3, 16, dtype, seed=1)
    out = paged_prefill_attention_ref(q, kc, vc, tables, cu, seq_lens, 0.25)
    for s in range(len(q_lens)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        want = dense_causal_attention(q[rows], dk[s], dv[s], 0.25)
        torch.testing.assert_close(out[rows].float(), want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(6, 3), (5, 1)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_ref(case, heads, dtype):
    q_lens, prefixes = CASES[case]
    d = 32 if heads == (5, 1) else 16
    q, _, _, kc, vc, tables, cu, seq_lens = _inputs(q_lens, prefixes, *heads, d, dtype, seed=2)
    want = paged_prefill_attention_ref(q, kc, vc, tables, cu, seq_lens, d**-0.5)
    out = torch.full_like(want, float("nan"))
    got = paged_prefill_attention(q, kc, vc, tables, cu, seq_lens, d**-0.5, out=out)
    assert got is out
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("context", [512, 2048])
@pytest.mark.parametrize("heads", [(32, 8, 128), (14, 2, 64)], ids=["llama8b", "qwen0.5b"])
def test_triton_matches_ref_gpu(heads, context, batch):
    hq, hk, d = heads
    gen = torch.Generator().manual_seed(3)
    # Half the sequences prefill from scratch, half run a chunk over a cached prefix that ends mid-block.
    q_lens = [context if s % 2 == 0 else 300 + s for s in range(batch)]
    prefixes = [0 if s % 2 == 0 else context - 300 - s - 5 for s in range(batch)]
    if sum(q_lens) > 16384:  # keep T realistic for one step's token budget
        q_lens = [max(1, n * 16384 // sum(q_lens)) for n in q_lens]
    seq_lens = [p + n for p, n in zip(prefixes, q_lens, strict=False)]
    _, _, kc, vc, tables = make_paged(seq_lens, hk, d, 16, torch.bfloat16, gen, device="cuda")
    q = torch.randn((sum(q_lens), hq, d), generator=gen).to(torch.bfloat16).cuda()
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    sl = torch.tensor(seq_lens, dtype=torch.int32).cuda()
    want = paged_prefill_attention_ref(q, kc, vc, tables, cu, sl, d**-0.5)
    got = paged_prefill_attention(q, kc, vc, tables, cu, sl, d**-0.5)
    torch.testing.assert_close(got, want, **tol(torch.bfloat16))
